"""`tonle bench`: Tonle's committed transfers/s and commit latency, measured in the same run as the ceilings
that bound them on this machine (Ed25519 verification on every node, and raw pysyncobj), with the ratios."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey
from prometheus_client.parser import text_string_to_metric_families

from consensus.entries import Transfer, decode_entry, sign_entry, signature_is_valid
from node import bench_raft
from node.cli_support import non_negative, positive
from node.client import AsyncClient, ClientError, new_transfer_id
from config.schema import log_compaction_entries_default
from node.cluster import LocalCluster, local_raft
from node.load import Progress
from node.metrics import stat_fields

# How the run is split; --duration scales every timed phase.
peak_share = 0.35
latency_share = 0.15  # for each of: 1 in flight, 25 %, 50 %, 75 % of peak
ceiling_seconds_max = 5.0
request_entries = 200
requests_in_flight = 8
open_loop_tick_seconds = 0.01
signature_sample = 20_000
# A change in the signature ceiling between the start and the end of a run larger than this is reported: the
# machine's speed moved while the ratios were measured (a shared VM's neighbours), so they are uncertain.
machine_speed_change_noted = 0.10
receipt_sample_transfers = 6_000
# A node's /metrics answers in milliseconds; this bounds a scrape of a node too busy to answer.
metrics_timeout_seconds = 10.0
bench_amount_max = 1000
# The bench network compacts its log where a node does by default, not every 5,000 entries as the test
# harness does to exercise snapshots: a snapshot (a full copy of the state, written and fsynced on every node
# at the same index) would otherwise land in whichever phase crosses that index.
network_raft = replace(local_raft, log_compaction_entries=log_compaction_entries_default)


@dataclass
class Phase:
    """What one load phase measured."""

    name: str
    offered_per_second: float | None = None
    acknowledged: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.acknowledged / self.seconds if self.seconds else 0.0

    def latency_ms(self) -> dict[str, float]:
        values = sorted(self.latencies)
        if not values:
            return {"p50": 0.0, "p99": 0.0, "p999": 0.0}

        def quantile(fraction: float) -> float:
            return round(values[min(len(values) - 1, int(fraction * len(values)))] * 1000, 2)

        return {"p50": quantile(0.50), "p99": quantile(0.99), "p999": quantile(0.999)}


# Ceilings ---------------------------------------------------------------------------------------------


def signature_ceiling(verifying_nodes: int) -> dict[str, float]:
    """Ed25519 verifications per second with every core (PyNaCl releases the GIL, so threads scale), divided
    by the nodes that must each verify every signature: no network of them can commit faster."""
    key = SigningKey.generate()
    entries = [
        decode_entry(sign_entry(Transfer(new_transfer_id(), "a@aba", "b@aba", 1, "KHR"), cluster_id="tonle-bench", signer="aba", signing_key=key))
        for _ in range(signature_sample)
    ]
    threads = os.cpu_count() or 1
    chunks = [entries[start::threads] for start in range(threads)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        started = time.perf_counter()
        list(pool.map(lambda chunk: sum(signature_is_valid(entry) for entry in chunk), chunks))
        elapsed = time.perf_counter() - started
    per_second = len(entries) / elapsed
    return {"verifications_per_second": per_second, "threads": threads, "per_second": per_second / verifying_nodes}


# Load -------------------------------------------------------------------------------------------------


class Workload:
    """Pre-signed transfers between the network's customer accounts, handed out in order."""

    def __init__(self, cluster: LocalCluster, count: int, seed: int, accounts: dict[str, list[str]] | None = None) -> None:
        """`accounts`: by currency, the accounts to pick from (default: the customer accounts of cluster.json)."""
        generator = random.Random(seed)
        by_currency: dict[str, list[str]] = {}
        if accounts is not None:
            by_currency = accounts
        else:
            for account in cluster.customer_accounts():
                by_currency.setdefault(account["currency"], []).append(account["account"])
        keys = {record["id"]: cluster.institution_key(record["id"]) for record in cluster.description["institutions"]}
        currencies = sorted(by_currency)
        progress = Progress(count, "signing  ")
        self._entries: list[bytes] = []
        for number in range(count):
            currency = currencies[number % len(currencies)]
            debit, credit = generator.sample(by_currency[currency], 2)
            signer = debit.rpartition("@")[2]
            body = Transfer(new_transfer_id(), debit, credit, generator.randint(1, bench_amount_max), currency)
            self._entries.append(sign_entry(body, cluster_id=cluster.cluster_id, signer=signer, signing_key=keys[signer]))
            if number % 5000 == 4999:
                progress.advance(5000)
        progress.advance(count % 5000)
        self._next = 0
        self._lock = threading.Lock()

    def take(self, count: int) -> list[bytes]:
        with self._lock:
            taken = self._entries[self._next : self._next + count]
            self._next += len(taken)
        if len(taken) < count:
            raise RuntimeError("the benchmark ran out of pre-signed transfers; lower --duration or raise the estimate")
        return taken


def _record(phase: Phase, results: list[dict[str, Any]], latency: float) -> None:
    for result in results:
        if result["status"] == "applied" and result["result"] in ("ok", "exists"):
            phase.acknowledged += 1
            phase.latencies.append(latency)
        else:
            reason = f"{result['status']}:{result['result']}"
            phase.failed[reason] = phase.failed.get(reason, 0) + 1


async def _submit(phase: Phase, client: AsyncClient, entries: list[bytes]) -> None:
    """One request: its results and latency go into `phase`, or, refused, its entries count as failed."""
    started = time.perf_counter()
    try:
        results = await client.submit(entries)
    except ClientError as error:
        phase.failed[error.code] = phase.failed.get(error.code, 0) + len(entries)
        return
    _record(phase, results, time.perf_counter() - started)


async def closed_loop(addresses: list[str], workload: Workload, seconds: float, batch: int, in_flight: int, name: str) -> Phase:
    phase = Phase(name)
    clients = [AsyncClient(address) for address in addresses]
    end = time.monotonic() + seconds
    progress = Progress(int(seconds), f"{name:<9}")

    async def worker(number: int) -> None:
        client = clients[number % len(clients)]
        while time.monotonic() < end:
            await _submit(phase, client, workload.take(batch))

    async def tick() -> None:
        for _ in range(int(seconds)):
            await asyncio.sleep(1)
            progress.advance(1)

    started = time.perf_counter()
    ticker = asyncio.get_running_loop().create_task(tick())
    await asyncio.gather(*(worker(number) for number in range(in_flight)))
    phase.seconds = time.perf_counter() - started
    ticker.cancel()
    for client in clients:
        client.close()
    return phase


async def open_loop(address: str, workload: Workload, seconds: float, rate: float, name: str) -> Phase:
    """Offer `rate` transfers/s in small requests at a fixed tick, whatever the replies do (an open loop
    shows queueing delay, which a closed loop hides)."""
    phase = Phase(name, offered_per_second=rate)
    client = AsyncClient(address)
    pending: set[asyncio.Task[None]] = set()
    carry = 0.0
    progress = Progress(int(seconds), f"{name:<9}")

    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    next_tick = time.monotonic()
    end = next_tick + seconds
    shown = 0
    while time.monotonic() < end:
        carry += rate * open_loop_tick_seconds
        count = int(carry)
        carry -= count
        if count:
            task = loop.create_task(_submit(phase, client, workload.take(count)))
            pending.add(task)
            task.add_done_callback(pending.discard)
        next_tick += open_loop_tick_seconds
        await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
        if int(time.monotonic() - (end - seconds)) > shown:
            shown += 1
            progress.advance(1)
    if pending:
        await asyncio.gather(*pending)
    phase.seconds = time.perf_counter() - started
    client.close()
    return phase


async def one_in_flight(address: str, workload: Workload, seconds: float) -> Phase:
    phase = Phase("1 in flight")
    client = AsyncClient(address)
    end = time.monotonic() + seconds
    started = time.perf_counter()
    while time.monotonic() < end:
        await _submit(phase, client, workload.take(1))
    phase.seconds = time.perf_counter() - started
    client.close()
    return phase


# Measuring the nodes ---------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = stat_fields(Path(f"/proc/{pid}/stat"))
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def major_faults(pid: int) -> int:
    """Page faults that had to read from disk: a node whose working set is in the page cache makes few."""
    return int(stat_fields(Path(f"/proc/{pid}/stat"))[9])


def node_memory(pid: int) -> dict[str, int]:
    """A node's resident memory (VmRSS) and its two parts: RssAnon, the process heap, and RssFile, pages of
    mapped files, almost all of them LMDB pages the node has read (page cache the kernel can take back)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def _summed_counter(cluster: LocalCluster, family_name: str, labels: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    """One counter family from every node's /metrics, summed over the network's nodes by the `labels` values."""
    totals: dict[tuple[str, ...], float] = {}
    for name in cluster.nodes:
        _code, text = cluster.admin_get(name, "/metrics", timeout_seconds=metrics_timeout_seconds)
        for family in text_string_to_metric_families(text):
            if family.name == family_name:
                for sample in family.samples:
                    key = tuple(sample.labels[label] for label in labels)
                    totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def _thread_cpu_seconds(cluster: LocalCluster) -> dict[tuple[str, str], float]:
    """`tonle_thread_cpu_seconds_total` summed over the network's nodes, by (thread, mode)."""
    return _summed_counter(cluster, "tonle_thread_cpu_seconds", ("thread", "mode"))


def thread_major_faults(cluster: LocalCluster) -> dict[str, float]:
    """`tonle_thread_major_page_faults_total` summed over the network's nodes, by thread job."""
    return {thread: count for (thread,), count in _summed_counter(cluster, "tonle_thread_major_page_faults", ("thread",)).items()}


def entry_hash_index_lag(cluster: LocalCluster) -> int:
    """Raft entries applied but not yet in the entry-hash index, the most of any node: the indexer works
    behind the apply, and a figure measured while it fell ever further behind would leave its work out."""
    lag = 0
    for name in cluster.nodes:
        _code, text = cluster.admin_get(name, "/metrics", timeout_seconds=metrics_timeout_seconds)
        values = {}
        for family in text_string_to_metric_families(text):
            if family.name in ("tonle_raft_applied_index", "tonle_entry_hash_index_raft_index"):
                values[family.name] = family.samples[0].value
        lag = max(lag, int(values["tonle_raft_applied_index"] - values["tonle_entry_hash_index_raft_index"]))
    return lag


def _per_transfer_by_thread(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float], transfers: int) -> dict[str, dict[str, float]]:
    """Microseconds of CPU per committed transfer, all nodes together, by thread and mode."""
    document: dict[str, dict[str, float]] = {}
    for (thread, mode), seconds in sorted(after.items()):
        used = seconds - before.get((thread, mode), 0.0)
        document.setdefault(thread, {})[mode] = round(used / max(1, transfers) * 1e6, 1)
    return document


def _batch_bytes_mean(cluster: LocalCluster, leader: str) -> float:
    _code, text = cluster.admin_get(leader, "/metrics")
    count = total = 0.0
    for line in text.splitlines():
        if line.startswith("tonle_batch_entries_count "):
            count = float(line.split()[1])
        elif line.startswith("tonle_batch_entries_sum "):
            total = float(line.split()[1])
    entry_bytes = 176  # a signed transfer between two customer accounts, as Workload signs them
    return (total / count if count else request_entries) * entry_bytes


def _busy_python_thread(entries: list[bytes], stop: threading.Event) -> None:
    """What a node's intake and verify threads do beside its apply: decode entries and check signatures."""
    while not stop.is_set():
        for raw in entries:
            entry = decode_entry(raw)
            entry.body()
            signature_is_valid(entry)


def receipt_cost(directory: Path) -> dict[str, float]:
    """CPU per transfer of applying batches, in-process on real LMDB: with and without extending the receipt
    tree (what receipts add to each node's apply), and with receipts beside one thread doing a node's other
    Python work. py-lmdb lets go of the GIL in every get and put, and a busy thread takes it each time: the
    apply then waits for that thread and its own CPU grows (README, "Where the time goes")."""
    from config.schema import Currency, Genesis, Institution, Role
    from consensus.batch import Batch, encode_batch
    from consensus.entries import Issue, OpenAccount
    from storage.rules import apply_batch, initialize
    from storage.state import LedgerStore

    key = SigningKey.generate()
    central_bank = SigningKey.generate()
    genesis = Genesis(1, "tonle-bench", (Currency("KHR", 0),),
                      (Institution("nbc", "NBC", Role.CENTRAL_BANK, bytes(central_bank.verify_key)),
                       Institution("aba", "ABA", Role.BANK, bytes(key.verify_key))), (), ())
    accounts = [f"a{number}@aba" for number in range(1000)]

    def signed(body, signer_key, signer):
        return sign_entry(body, cluster_id=genesis.cluster_id, signer=signer, signing_key=signer_key)

    setup = [signed(OpenAccount(account, "KHR", tier="unlimited"), key, "aba") for account in accounts]
    setup.append(signed(Issue(new_transfer_id(), "settlement.khr@aba", 10**15, "KHR"), central_bank, "nbc"))
    setup += [signed(Transfer(new_transfer_id(), "settlement.khr@aba", account, 10**9, "KHR"), key, "aba") for account in accounts]
    generator = random.Random(7)
    transfers = [
        signed(Transfer(new_transfer_id(), *generator.sample(accounts, 2), generator.randint(1, 1000), "KHR"), key, "aba")
        for _ in range(receipt_sample_transfers)
    ]
    results = {}
    for name, receipts, busy in (("with", True, False), ("without", False, False), ("busy", True, True)):
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            store = LedgerStore(Path(scratch), map_size_bytes=1 << 30, sync=False)
            index = 1
            with store.write() as transaction:
                initialize(transaction, genesis)
            for start in range(0, len(setup), 250):
                index += 1
                with store.write() as transaction:
                    apply_batch(transaction, index, encode_batch(Batch(1, None, tuple(setup[start : start + 250]))), lambda _: True, genesis.cluster_id)
            cpu = 0.0
            written_before = _bytes_written()
            pages_before = store.environment.info()["last_pgno"]
            stop = threading.Event()
            competitor = threading.Thread(target=_busy_python_thread, args=(transfers[:64], stop), name="bench-busy", daemon=True)
            if busy:
                competitor.start()
            try:
                for start in range(0, len(transfers), 250):
                    index += 1
                    raw = encode_batch(Batch(2 + start, None, tuple(transfers[start : start + 250])))
                    began = time.thread_time()  # this thread's CPU only: the busy thread's is not the apply's
                    with store.write() as transaction:
                        apply_batch(transaction, index, raw, lambda _: True, genesis.cluster_id, receipts=receipts)
                    cpu += time.thread_time() - began
            finally:
                stop.set()
                if busy:
                    competitor.join()
            if name == "with":
                results["bytes_written"] = (_bytes_written() - written_before) / len(transfers)
                # How far the data file grew: freed pages are reused first, so this is what the state keeps.
                grown_pages = store.environment.info()["last_pgno"] - pages_before
                results["state_bytes"] = grown_pages * store.environment.stat()["psize"] / len(transfers)
            store.close()
            results[name] = cpu / len(transfers)
    return {"apply_cpu_seconds_with_receipts": results["with"], "apply_cpu_seconds_without_receipts": results["without"],
            "apply_cpu_seconds_beside_busy_thread": results["busy"],
            "apply_bytes_written_per_transfer": results["bytes_written"], "state_bytes_per_transfer": results["state_bytes"]}


def _bytes_written() -> int:
    """Bytes this process has handed to write system calls (LMDB writes its dirty pages with pwrite)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line")


# The run ----------------------------------------------------------------------------------------------


def run_bench(directory: Path, *, validators: int, duration_seconds: float, accounts: int, seed: int) -> dict[str, Any]:
    document: dict[str, Any] = {"validators": validators, "duration_seconds": duration_seconds, "seed": seed}
    print("measuring the signature ceiling (all cores, before the network starts)", file=sys.stderr)
    signatures = signature_ceiling(validators)
    document["signature_ceiling_per_second"] = round(signatures["per_second"], 1)
    document["signature_verifications_per_second"] = round(signatures["verifications_per_second"], 1)

    accounts_per_currency = max(2, accounts // 4)
    document["log_compaction_entries"] = network_raft.log_compaction_entries
    cluster = LocalCluster.create(directory / "network", validators=validators, institutions=2, institution_nodes=False, raft=network_raft,
                                  accounts_per_currency=accounts_per_currency)
    cluster.start()
    try:
        leader = cluster.wait_for_leader()
        cluster.wait_ready()
        print(f"opening and funding {4 * accounts_per_currency} accounts", file=sys.stderr)
        cluster.open_and_fund_accounts(via=leader)
        peak_seconds = duration_seconds * peak_share
        latency_seconds = duration_seconds * latency_share
        estimate = int((signatures["per_second"] * (peak_seconds + 1.5 * latency_seconds)) * 1.3) + 5000
        workload = Workload(cluster, estimate, seed)
        leader = cluster.wait_for_leader()
        address = cluster.nodes[leader].client_address
        pids = {name: node.pid for name, node in cluster.nodes.items() if node.pid}
        threads_before = _thread_cpu_seconds(cluster)
        cpu_before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
        peak = asyncio.run(closed_loop([address], workload, peak_seconds, request_entries, requests_in_flight, "peak"))
        cpu_used = sum(_cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items())
        threads_after = _thread_cpu_seconds(cluster)
        document["entry_hash_index_lag_entries"] = entry_hash_index_lag(cluster)
        document["transfers_per_second"] = round(peak.per_second, 1)
        document["ratio_to_signature_ceiling"] = round(peak.per_second / signatures["per_second"], 3)
        document["peak"] = {"acknowledged": peak.acknowledged, "failed": peak.failed, "seconds": round(peak.seconds, 2),
                            "request_latency_ms": peak.latency_ms()}
        document["node_cpu_microseconds_per_transfer"] = round(cpu_used / max(1, peak.acknowledged) * 1e6, 1)
        document["node_cpu_microseconds_per_transfer_by_thread"] = _per_transfer_by_thread(threads_before, threads_after, peak.acknowledged)
        batch_bytes = _batch_bytes_mean(cluster, leader)
        latency: dict[str, Any] = {}
        single = asyncio.run(one_in_flight(address, workload, latency_seconds))
        latency["1_in_flight"] = {**single.latency_ms(), "transfers_per_second": round(single.per_second, 1)}
        for share in (25, 50, 75):
            rate = peak.per_second * share / 100
            phase = asyncio.run(open_loop(address, workload, latency_seconds, rate, f"{share}% peak"))
            latency[f"{share}%"] = {**phase.latency_ms(), "offered_per_second": round(rate, 1),
                                    "transfers_per_second": round(phase.per_second, 1), "failed": phase.failed}
        document["latency_ms"] = latency
        memory = {name: node_memory(pid) for name, pid in pids.items()}
        document["node_memory_bytes"] = memory
        document["node_rss_bytes"] = {name: figures["VmRSS"] for name, figures in memory.items()}
    finally:
        cluster.kill()
    print("measuring the signature ceiling again (the machine's speed may have moved during the load)", file=sys.stderr)
    after = signature_ceiling(validators)
    document["signature_ceiling_after_per_second"] = round(after["per_second"], 1)
    document["machine_speed_change"] = round(after["per_second"] / signatures["per_second"] - 1, 3)
    print("measuring the raw pysyncobj ceiling for batches of the same size", file=sys.stderr)
    raft_batches = bench_raft.measure(directory / "raw-raft", batch_bytes=int(batch_bytes), seconds=min(ceiling_seconds_max, duration_seconds * 0.1))
    transfers_per_batch = batch_bytes / 176
    document["raft_ceiling_per_second"] = round(raft_batches * transfers_per_batch, 1)
    document["raft_ceiling_batch_bytes"] = int(batch_bytes)
    document["ratio_to_raft_ceiling"] = round(peak.per_second / document["raft_ceiling_per_second"], 3)
    print("measuring what receipts add to the apply", file=sys.stderr)
    costs = receipt_cost(directory)
    added = (costs["apply_cpu_seconds_with_receipts"] - costs["apply_cpu_seconds_without_receipts"]) * validators
    document["apply_microseconds_alone"] = round(costs["apply_cpu_seconds_with_receipts"] * 1e6, 1)
    document["apply_microseconds_beside_busy_thread"] = round(costs["apply_cpu_seconds_beside_busy_thread"] * 1e6, 1)
    document["receipts"] = {
        "apply_microseconds_with": round(costs["apply_cpu_seconds_with_receipts"] * 1e6, 1),
        "apply_microseconds_without": round(costs["apply_cpu_seconds_without_receipts"] * 1e6, 1),
        "share_of_cost_per_committed_transfer": round(added / (document["node_cpu_microseconds_per_transfer"] / 1e6), 3),
    }
    # Dirty LMDB pages a transfer costs one node: what its fsync writes, and what grows with the state.
    document["apply_bytes_written_per_transfer"] = round(costs["apply_bytes_written_per_transfer"])
    document["state_bytes_per_transfer"] = round(costs["state_bytes_per_transfer"])
    return document


def _by_thread(by_thread: dict[str, dict[str, float]]) -> str:
    shown = sorted(((sum(modes.values()), thread, modes.get("system", 0.0)) for thread, modes in by_thread.items()), reverse=True)
    return ", ".join(f"{thread} {total:,.0f} us (sys {system:,.0f})" for total, thread, system in shown if total >= 1)


def render(document: dict[str, Any]) -> str:
    rows = [
        ("signature ceiling (all cores / nodes)", f"{document['signature_ceiling_per_second']:,.0f}/s",
         f"{document['signature_ceiling_after_per_second']:,.0f}/s after the load ({document['machine_speed_change']:+.1%})"),
        ("raw pysyncobj ceiling (same batches)", f"{document['raft_ceiling_per_second']:,.0f}/s", ""),
        ("Tonle committed transfers", f"{document['transfers_per_second']:,.0f}/s",
         f"{document['ratio_to_signature_ceiling']:.0%} of signatures, {document['ratio_to_raft_ceiling']:.0%} of raft"),
        ("node CPU per committed transfer", f"{document['node_cpu_microseconds_per_transfer']:,.0f} us", "all nodes together"),
        ("  by thread (user + system)", "", _by_thread(document["node_cpu_microseconds_per_transfer_by_thread"])),
        ("receipts' share of that cost", f"{document['receipts']['share_of_cost_per_committed_transfer']:.1%}", ""),
        ("apply CPU per transfer, in-process", f"{document['apply_microseconds_alone']:,.0f} us",
         f"alone; {document['apply_microseconds_beside_busy_thread']:,.0f} us beside one thread decoding and verifying "
         "entries (the GIL changes hands at every LMDB call)"),
        ("apply: bytes written per transfer", f"{document['apply_bytes_written_per_transfer']:,.0f} B", "one node, in-process"),
        ("state file growth per transfer", f"{document['state_bytes_per_transfer']:,.0f} B", "the same transfers"),
        ("entry-hash index behind the apply", f"{document['entry_hash_index_lag_entries']:,}", "Raft entries, at the end of the peak, most of any node"),
    ]
    for level, figures in document["latency_ms"].items():
        rows.append((f"commit latency at {level.replace('_', ' ')}", f"p50 {figures['p50']} ms",
                     f"p99 {figures['p99']} ms, p999 {figures['p999']} ms"))
    memory = document["node_memory_bytes"].values()
    rows.append(("node resident memory", f"{max(figures['VmRSS'] for figures in memory) / 2**20:,.0f} MiB max",
                 f"heap {max(figures['RssAnon'] for figures in memory) / 2**20:,.0f} MiB max, "
                 f"mapped LMDB and code {max(figures['RssFile'] for figures in memory) / 2**20:,.0f} MiB max"))
    width = max(len(row[0]) for row in rows)
    lines = [f"{label:<{width}}  {value:>14}  {note}".rstrip() for label, value, note in rows]
    if abs(document["machine_speed_change"]) > machine_speed_change_noted:
        lines.append(f"note: this machine's signature ceiling moved by {document['machine_speed_change']:+.0%} during the run; "
                     "the ratios above are uncertain by as much")
    return "\n".join(lines)


def command_bench(arguments: argparse.Namespace) -> int:
    seed = arguments.seed if arguments.seed is not None else random.SystemRandom().randrange(2**32)
    if arguments.scale:
        return _command_scale(arguments, seed)
    with tempfile.TemporaryDirectory(prefix="tonle-bench-") as scratch:
        directory = Path(arguments.dir) if arguments.dir else Path(scratch)
        document = run_bench(directory, validators=arguments.validators, duration_seconds=arguments.duration,
                             accounts=arguments.accounts, seed=seed)
    print(render(document), file=sys.stderr if arguments.output == "json" else sys.stdout)
    if arguments.output == "json":
        print(json.dumps(document, indent=2, sort_keys=True))
    return 0


def add_bench_commands(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="measure throughput and latency against this machine's ceilings")
    bench.add_argument("--validators", type=positive, default=3)
    bench.add_argument("--duration", type=float, default=60.0, help="seconds for the load phases in total")
    bench.add_argument("--accounts", type=positive, default=10_000, help="customer accounts to spread transfers over")
    bench.add_argument("--dir", help="keep the network here (default: a temporary directory)")
    bench.add_argument("--seed", type=int)
    bench.add_argument("--output", choices=("table", "json"), default="table")
    bench.add_argument("--scale", action="store_true",
                       help="compare a network holding --scale-accounts accounts and --scale-transfers transfers with "
                            "one holding --accounts accounts and as many transfers per account, each measured twice (small, large, large, small); --duration is per measurement")
    bench.add_argument("--scale-accounts", type=positive, default=1_000_000)
    bench.add_argument("--scale-transfers", type=positive, default=10_000_000)
    bench.add_argument("--settle-seconds", type=non_negative, default=30,
                       help="with --scale: seconds of load before each measurement, not counted, so the nodes' page "
                            "cache holds what the load reads rather than what the warm-up read (0: none)")
    bench.add_argument("--node-memory-limit-bytes", type=positive,
                       help="with --scale: run every node in a memory cgroup with this limit (heap and page cache, "
                            "as systemd's MemoryMax=); needs root and a memory controller")
    bench.set_defaults(handler=command_bench)


def _command_scale(arguments: argparse.Namespace, seed: int) -> int:
    from node.bench_scale import render_scale, run_scale

    per_account = arguments.scale_transfers // arguments.scale_accounts
    with tempfile.TemporaryDirectory(prefix="tonle-scale-") as scratch:
        directory = Path(arguments.dir) if arguments.dir else Path(scratch)
        document = run_scale(
            directory, small_accounts=arguments.accounts, small_transfers=arguments.accounts * per_account,
            large_accounts=arguments.scale_accounts, large_transfers=arguments.scale_transfers,
            seconds=arguments.duration, seed=seed, settle_seconds=arguments.settle_seconds,
            memory_limit_bytes=arguments.node_memory_limit_bytes,
        )
    print(render_scale(document), file=sys.stderr if arguments.output == "json" else sys.stdout)
    if arguments.output == "json":
        print(json.dumps(document, indent=2, sort_keys=True))
    return 0

