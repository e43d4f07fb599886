"""`tonle bench --scale`: committed transfers/s and node memory with a large state (1 million accounts and
10 million transfers already in LMDB) against a small one, each network started from a state built offline
by the real apply and installed as a Raft snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import lmdb
from nacl.signing import SigningKey

from config.loader import load_genesis
from config.schema import StorageConfig
from consensus.batch import Batch, encode_batch
from consensus.entries import Issue, OpenAccount, Transfer, sign_entry
from consensus.raft.adapter import command_type_no_op
from consensus.raft.snapshot import SnapshotHeader, write_snapshot
from node import bench
from node.cluster import LocalCluster, local_raft
from node.load import Progress
from node.memory_limit import MemoryCgroup, drop_from_page_cache
from storage.entry_hashes import EntryHashIndex, index_databases_max, run_database_names
from storage.rules import apply_batch, genesis_applied_index, initialize
from storage.state import LedgerStore, pages_of, schema_version

# The offline build applies batches of this many entries, as a busy leader would propose them.
build_batch_entries = 250
# Entries signed per task handed to a signing process.
sign_task_entries = 5000
# Money each account starts with, in riel, and the largest transfer: no transfer of the run can fail for
# lack of funds or the daily limit, so every one does the full work of a successful transfer.
opening_balance_riel = 10**9
transfer_amount_max = 1000
# Cluster time advances by this much per built batch (the leader stamps its clock on each batch).
build_batch_milliseconds = 1
# The offline build indexes entry hashes in transactions this large (a node's indexer uses smaller ones).
build_index_entries_per_transaction = 1_000_000
# Headroom over the built state for the run's own transfers.
map_size_headroom_bytes = 8 << 30
# No snapshot of a many-gigabyte state during the measurement: it would measure the copy, not the ledger.
scale_raft = replace(local_raft, log_compaction_entries=10_000_000)


def account_name(number: int, institutions: tuple[str, ...]) -> str:
    return f"s{number}.khr@{institutions[number % len(institutions)]}"


# Signing, in worker processes (the apply runs in the parent meanwhile) ---------------------------------

_worker_keys: dict[str, SigningKey] = {}
_worker_cluster_id = ""


def _init_worker(seeds: dict[str, bytes], cluster_id: str) -> None:
    global _worker_cluster_id
    _worker_keys.update({institution: SigningKey(seed) for institution, seed in seeds.items()})
    _worker_cluster_id = cluster_id


def _sign_task(task: tuple[str, int, int, int, tuple[str, ...]]) -> list[bytes]:
    """Entries `start`..`start + count` of one build phase, deterministic in their numbers."""
    phase, start, count, accounts, institutions = task
    signed = []
    generator = random.Random(start * 7919 + len(phase))
    for number in range(start, start + count):
        if phase == "open":
            name = account_name(number, institutions)
            body: Any = OpenAccount(name, "KHR", tier="full")
            signer = name.rpartition("@")[2]
        elif phase == "fund":
            name = account_name(number, institutions)
            signer = name.rpartition("@")[2]
            body = Transfer(_id(2, number), f"settlement.khr@{signer}", name, opening_balance_riel, "KHR")
        else:
            debit, credit = generator.sample(range(accounts), 2)
            name = account_name(debit, institutions)
            signer = name.rpartition("@")[2]
            body = Transfer(_id(3, number), name, account_name(credit, institutions), generator.randint(1, transfer_amount_max), "KHR")
        signed.append(sign_entry(body, cluster_id=_worker_cluster_id, signer=signer, signing_key=_worker_keys[signer]))
    return signed


def _id(phase: int, number: int) -> bytes:
    # Time-ordered-looking ids (phase, then number) keep the transfers tree append-mostly, as real ids do.
    return phase.to_bytes(2, "big") + number.to_bytes(14, "big")


# Building the state ------------------------------------------------------------------------------------


def build_state(cluster: LocalCluster, state_directory: Path, *, accounts: int, transfers: int, map_size_bytes: int) -> int:
    """Apply the opening of `accounts` accounts, their funding and `transfers` transfers to a new LMDB state
    with the node's own apply; returns the applied index. The entries are signed here (so the state is what
    the network would hold) but not verified: this process made every signature."""
    genesis = load_genesis(Path(cluster.description["genesis"]))
    institutions = tuple(record["id"] for record in cluster.description["institutions"] if record["id"] != cluster.central_bank())
    seeds = {record["id"]: cluster.institution_key(record["id"]).encode() for record in cluster.description["institutions"]}
    store = LedgerStore(state_directory, map_size_bytes=map_size_bytes, sync=False)
    with store.write() as transaction:
        initialize(transaction, genesis)
    index = genesis_applied_index
    time_ms = int(time.time() * 1000) - 3_600_000

    def apply(entries: list[bytes]) -> None:
        nonlocal index, time_ms
        for start in range(0, len(entries), build_batch_entries):
            index += 1
            time_ms += build_batch_milliseconds
            with store.write() as transaction:
                apply_batch(
                    transaction, index, encode_batch(Batch(time_ms, None, tuple(entries[start : start + build_batch_entries]))),
                    lambda _entry: True, genesis.cluster_id,
                )

    central_bank_key = cluster.institution_key(cluster.central_bank())
    issues = [
        sign_entry(Issue(_id(1, number), f"settlement.khr@{institution}", opening_balance_riel * accounts, "KHR"),
                   cluster_id=genesis.cluster_id, signer=cluster.central_bank(), signing_key=central_bank_key)
        for number, institution in enumerate(institutions)
    ]
    apply(issues)
    with multiprocessing.get_context("fork").Pool(
        processes=max(1, (os.cpu_count() or 2) - 1), initializer=_init_worker, initargs=(seeds, genesis.cluster_id)
    ) as pool:
        for phase, count in (("open", accounts), ("fund", accounts), ("transfer", transfers)):
            progress = Progress(count, f"{phase:<9}")
            tasks = [(phase, start, min(sign_task_entries, count - start), accounts, institutions)
                     for start in range(0, count, sign_task_entries)]
            for entries in pool.imap(_sign_task, tasks):
                apply(entries)
                progress.advance(len(entries))
    store.environment.sync(True)
    store.close()
    return index


def install(cluster: LocalCluster, built: Path, applied_index: int) -> None:
    """Give every validator the built state, and a snapshot of it so Raft's log starts after it."""
    genesis = load_genesis(Path(cluster.description["genesis"]))
    validators = cluster.validators()
    first = cluster.nodes[validators[0]]
    store = LedgerStore(built, map_size_bytes=_map_size(built), sync=True)
    # Opened in key order and then funded at random, the account pages end about half full (165 MiB for 1 M
    # accounts where the records need about 95): filled as `tonle node compact` fills them, as an operator
    # of a node with more accounts than memory would (README, "Memory under a limit").
    print("compacting the built state's randomly written databases", file=sys.stderr)
    store.compact(randomly_written_databases)
    summary = store.summary()
    header = SnapshotHeader(
        cluster_id=genesis.cluster_id,
        last_entry=(command_type_no_op, applied_index, 0),
        previous_entry=(command_type_no_op, applied_index - 1, 0),
        voters=tuple(str(validator.raft_address) for validator in genesis.validators),
        applied_index=summary.applied_index,
        state_hash=summary.state_hash,
    )
    snapshot = first.data_dir / "raft" / "snapshot.bin"
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    write_snapshot(snapshot, store, header)
    # A node that has been running has its entry-hash index current; one started without it would spend the
    # measurement rebuilding it.
    built_index = built.parent / "built_entry_hashes"
    index = EntryHashIndex(built_index, map_size_bytes=_map_size(built), sync=False)
    print("building the entry-hash index of the built state", file=sys.stderr)
    while index.catch_up(store, entries_max=build_index_entries_per_transaction):
        pass
    index.environment.sync(True)
    index.close()
    store.close()
    for name in validators:
        node = cluster.nodes[name]
        state = node.data_dir / "state"
        state.mkdir(parents=True, exist_ok=True)
        if name == first.name:
            continue
        shutil.copyfile(built / "data.mdb", state / "data.mdb")
        (node.data_dir / "entry_hashes").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built_index / "data.mdb", node.data_dir / "entry_hashes" / "data.mdb")
        (node.data_dir / "raft").mkdir(parents=True, exist_ok=True)
        # pysyncobj writes a new snapshot to a temporary file and renames it, so the nodes can share this one.
        os.link(snapshot, node.data_dir / "raft" / "snapshot.bin")
    os.replace(built / "data.mdb", first.data_dir / "state" / "data.mdb")
    (first.data_dir / "entry_hashes").mkdir(parents=True, exist_ok=True)
    os.replace(built_index / "data.mdb", first.data_dir / "entry_hashes" / "data.mdb")
    shutil.rmtree(built)
    shutil.rmtree(built_index)


def _map_size(path: Path) -> int:
    return (path / "data.mdb").stat().st_size + map_size_headroom_bytes


# Measuring -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _node_state(data_dir: Path) -> Iterator[lmdb.Environment]:
    """A stopped node's LMDB state, opened read-only by LMDB itself (with readahead, which the node turns off)."""
    with _stopped_environment(data_dir / "state") as environment:
        yield environment


@contextlib.contextmanager
def _stopped_environment(path: Path, *, readahead: bool = True) -> Iterator[lmdb.Environment]:
    environment = lmdb.open(str(path), readonly=True, readahead=readahead, max_dbs=max(64, index_databases_max), map_size=_map_size(path))
    try:
        yield environment
    finally:
        environment.close()


def _account_database_bytes(data_dir: Path) -> int:
    """The B-tree pages of a stopped node's account database, in bytes: what the apply reads at random, so
    what a node must keep in memory to commit without reading from disk (`tonle node compact` fills them)."""
    with _node_state(data_dir) as environment, environment.begin() as transaction:
        stat = transaction.stat(environment.open_db(b"accounts", txn=transaction, create=False))
    return pages_of(stat) * stat["psize"]


def _recorded_transfers(data_dir: Path) -> int:
    with _node_state(data_dir) as environment, environment.begin() as transaction:
        return transaction.stat(environment.open_db(b"transfers", txn=transaction, create=False))["entries"]


# Every run adds its transfers to the kept state; past this share over what was built, the state is built again,
# so runs compare like with like (a small state, built in seconds, grew ninefold over a day of runs and slowed).
kept_state_growth_max = 0.25


def prepare(directory: Path, *, accounts: int, transfers: int) -> dict[str, Any]:
    """Create a network in `directory` whose validators start from a built state; kept for later runs
    (`DIR/scale.json` records what was built, so a second run measures without building again) until the
    runs' own transfers have grown it by `kept_state_growth_max`."""
    record_path = directory / "scale.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if (record["accounts"], record["preloaded_transfers"]) != (accounts, transfers):
            raise FileExistsError(f"{directory} holds a state of another size; remove it or use another --dir")
        cluster = LocalCluster.load(directory)
        held = _recorded_transfers(cluster.nodes[cluster.validators()[0]].data_dir)
        built_layout = record.get("layout", 3)  # layout 3 was the last one built before the record said
        if built_layout != schema_version:
            print(f"{directory} holds a state in layout {built_layout}; nodes of this version read layout "
                  f"{schema_version}: building it again", file=sys.stderr)
        elif held <= (transfers + accounts) * (1 + kept_state_growth_max):  # built: the transfers and a funding each
            return record
        else:
            print(f"{directory} holds {held:,} transfers, more than {kept_state_growth_max:.0%} over what was built: "
                  "building it again", file=sys.stderr)
        shutil.rmtree(directory)
    estimate_bytes = (accounts * 2 + transfers) * 1600 + (1 << 30)
    cluster = LocalCluster.create(
        directory, validators=3, institutions=2, institution_nodes=False, accounts_per_currency=1, raft=scale_raft,
        storage=StorageConfig(map_size_bytes=estimate_bytes + map_size_headroom_bytes, sync=True),
    )
    built = directory / "built"
    started = time.perf_counter()
    print(f"building a state of {accounts:,} accounts and {transfers:,} transfers with the apply", file=sys.stderr)
    applied_index = build_state(cluster, built, accounts=accounts, transfers=transfers, map_size_bytes=estimate_bytes)
    record = {
        "layout": schema_version,
        "accounts": accounts,
        "preloaded_transfers": transfers,
        "applied_index": applied_index,
        "build_seconds": round(time.perf_counter() - started, 1),
        "state_bytes": (built / "data.mdb").stat().st_size,
    }
    install(cluster, built, applied_index)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


# A node that is behind replays its missing entries before it reports ready; with a state of many GiB
# that can take minutes.
start_seconds_max = 900
# Reading a large state's randomly written databases into the page cache, per node.
warm_seconds_max = 1800

# Written at random places by every transfer: accounts by name in the state. The rest of the state, history
# and the hash log included, is appended to or read near its end; the entry-hash index's runs are written in
# order and read in order by its merges. A node that has been running holds both in its page cache.
randomly_written_databases = ("accounts",)
index_databases = tuple(name.decode() for name in run_database_names())


def warm_page_cache(data_dir: Path) -> float:
    """Read every page of the entry-hash index's runs and of the accounts, as a node that has been running
    holds them in memory; a node just started from a copied file would otherwise measure the disk. Returns
    seconds. The accounts come last: under a memory limit the pages read last are the ones that stay, and a
    running node reads accounts at every transfer, the runs only when it merges them. (Under 300 MB the 1 M-account
    node read about two pages from disk per transfer either way: its working set is larger than that.)"""
    started = time.perf_counter()
    for path, names in ((data_dir / "entry_hashes", index_databases), (data_dir / "state", randomly_written_databases)):
        if not (path / "data.mdb").exists():
            continue
        # Without readahead, as the node reads: each fault reads its page, where readahead (8 MiB windows on
        # this machine's disk) read neighbours the limit then evicted before the walk reached them, over and
        # over: 50 GB read to warm one 1 M-account node in a 300 MB cgroup, 25 minutes.
        with _stopped_environment(path, readahead=False) as environment:
            for name in names:
                database = environment.open_db(name.encode(), create=False)
                with environment.begin(db=database) as transaction:
                    for _key in transaction.cursor().iternext(keys=True, values=False):
                        pass
    return time.perf_counter() - started


# The disk probe: writers (one per validator, as the nodes share this machine's disk), each writing random
# pages into its own file and fsyncing every `disk_probe_pages_per_sync` of them, as an LMDB commit does.
disk_probe_file_bytes = 256 << 20
disk_probe_pages_per_sync = 1024
disk_probe_seconds = 5.0
disk_page_bytes = 4096


def random_page_writes_per_second(directory: Path, writers: int) -> float:
    """The disk's ceiling for the pages a transfer writes at random: 4 KiB pages at random places in
    preallocated files, fsynced in batches, from `writers` threads at once (pwrite and fdatasync release the
    GIL). Returns pages per second, all writers together."""
    deadline = time.perf_counter() + disk_probe_seconds
    counts = [0] * writers

    def write(number: int) -> None:
        path = directory / f".disk-probe-{number}"
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(descriptor, 0, disk_probe_file_bytes)
            os.fsync(descriptor)
            page = os.urandom(disk_page_bytes)
            generator = random.Random(number)
            while time.perf_counter() < deadline:
                for _ in range(disk_probe_pages_per_sync):
                    os.pwrite(descriptor, page, generator.randrange(disk_probe_file_bytes // disk_page_bytes) * disk_page_bytes)
                os.fdatasync(descriptor)
                counts[number] += disk_probe_pages_per_sync
        finally:
            os.close(descriptor)
            path.unlink()

    threads = [threading.Thread(target=write, args=(number,), name=f"disk-probe-{number}") for number in range(writers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def block_device(path: Path) -> str | None:
    """The name /proc/diskstats knows the disk holding `path` by, or None (an overlay, a tmpfs)."""
    device = os.stat(path).st_dev
    link = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    return link.resolve().name if link.exists() else None


def disk_writes(device: str) -> tuple[int, int]:
    """(write requests completed, bytes written) on a block device since boot, from /proc/diskstats."""
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if fields[2] == device:
            return int(fields[7]), int(fields[9]) * 512  # diskstats counts 512-byte sectors whatever the disk
    raise LookupError(f"{device} is not in /proc/diskstats")


def measure(directory: Path, *, accounts: int, transfers: int, seconds: float, seed: int, warm: bool = True,
            settle_seconds: float = 0.0, memory_limit_bytes: int | None = None) -> dict[str, Any]:
    """Start a prepared network, load it closed-loop for `settle_seconds` (not counted), then for `seconds`;
    what it committed and what its nodes hold. With `memory_limit_bytes`, every node runs in its own memory
    cgroup with that limit."""
    document: dict[str, Any] = dict(prepare(directory, accounts=accounts, transfers=transfers))
    cluster = LocalCluster.load(directory)
    # Every run adds its transfers to the kept state: report what this run starts from, not what was built.
    first = cluster.nodes[cluster.validators()[0]].data_dir
    document["state_bytes"] = (first / "state" / "data.mdb").stat().st_size
    document["transfers_at_start"] = _recorded_transfers(first)
    document["account_database_bytes_at_start"] = _account_database_bytes(first)
    document["page_cache_warmed"] = warm
    cgroups: dict[str, MemoryCgroup] = {}
    try:
        if memory_limit_bytes is not None:
            for name, node in cluster.nodes.items():
                cgroups[name] = MemoryCgroup.create(name, memory_limit_bytes)
                # Pages the build and the copies left in the page cache are charged to this process: a node
                # mapping them would hold memory its limit never sees.
                drop_from_page_cache(node.data_dir)
        if warm:
            # Before the nodes start: a node that is behind catches up at the speed of its page cache.
            print("reading the randomly written databases of every node into the page cache", file=sys.stderr)
            document["warm_seconds"] = round(sum(_warm(cluster.nodes[name].data_dir, cgroups.get(name)) for name in cluster.validators()), 1)
        device = block_device(first)
        if device is not None:
            print(f"measuring random page writes on {device}, the nodes' disk", file=sys.stderr)
            document["disk_page_writes_per_second"] = round(random_page_writes_per_second(first, len(cluster.validators())))
        _measure_started(cluster, document, accounts=accounts, seconds=seconds, settle_seconds=settle_seconds, seed=seed,
                         device=device, cgroups=cgroups)
        # Accounts whose records grew in a full page split it: how much the run loosened what compaction packed.
        document["account_database_bytes_at_end"] = _account_database_bytes(first)
    finally:
        for cgroup in cgroups.values():
            cgroup.remove()
    return document


def _warm(data_dir: Path, cgroup: MemoryCgroup | None) -> float:
    """`warm_page_cache`, in a process inside the node's cgroup when it has one, so the pages it reads are
    charged to the node (and taken back from it past its limit) as if the node had read them."""
    if cgroup is None:
        return warm_page_cache(data_dir)
    program = "import sys; from pathlib import Path; from node.bench_scale import warm_page_cache; print(warm_page_cache(Path(sys.argv[1])))"
    result = subprocess.run(cgroup.command([sys.executable, "-c", program, str(data_dir)]), capture_output=True, text=True,
                            timeout=warm_seconds_max, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"warming {data_dir} in {cgroup.path} failed ({result.returncode}): {result.stderr[-2000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def _measure_started(cluster: LocalCluster, document: dict[str, Any], *, accounts: int, seconds: float, settle_seconds: float,
                     seed: int, device: str | None, cgroups: dict[str, MemoryCgroup]) -> None:
    cluster.start(memory_cgroups=cgroups or None)
    try:
        leader = cluster.wait_for_leader(timeout_seconds=start_seconds_max)
        cluster.wait_ready(timeout_seconds=start_seconds_max)
        institutions = tuple(record["id"] for record in cluster.description["institutions"] if record["id"] != cluster.central_bank())
        generator = random.Random(seed)
        # Distinct names: a transfer takes two of them, and one from an account to itself is refused.
        names = [account_name(number, institutions) for number in generator.sample(range(accounts), min(accounts, 200_000))]
        workload = bench.Workload(cluster, int((settle_seconds + seconds) * 6000) + 10_000, seed, accounts={"KHR": names})
        leader = cluster.wait_for_leader()
        pids = {name: node.pid for name, node in cluster.nodes.items() if node.pid}
        address = cluster.nodes[leader].client_address
        if settle_seconds > 0:
            # A node that has been running holds what the load reads, not what a warm-up read: the page cache
            # settles under load (first reads of pages the warm-up did not keep, page aging), and is then measured.
            faults_before = _major_faults(pids)
            settling = asyncio.run(bench.closed_loop([address], workload, settle_seconds, bench.request_entries, bench.requests_in_flight, "settling"))
            faults = _major_faults(pids) - faults_before
            document["settling"] = {"seconds": settle_seconds, "transfers_acknowledged": settling.acknowledged,
                                    "transfers_per_second": round(settling.per_second, 1),
                                    "disk_reads_per_transfer": round(faults / max(1, settling.acknowledged), 3), "failed": settling.failed}
            address = cluster.nodes[cluster.wait_for_leader()].client_address
        cpu_before = {name: bench._cpu_seconds(pid) for name, pid in pids.items()}
        threads_before = bench._thread_cpu_seconds(cluster)
        faults_before = _major_faults(pids)
        thread_faults_before = bench.thread_major_faults(cluster)
        dropped_before = _network_total(cluster, "tonle_state_dead_pages_dropped")
        merged_before = _network_total(cluster, "tonle_entry_hash_index_merged_entries")
        disk_before = disk_writes(device) if device is not None else None
        peak = asyncio.run(bench.closed_loop([address], workload, seconds, bench.request_entries, bench.requests_in_flight, "peak"))
        cpu_used = sum(bench._cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items())
        threads_after = bench._thread_cpu_seconds(cluster)
        document["entry_hash_index_lag_entries"] = bench.entry_hash_index_lag(cluster)
        document["transfers_acknowledged"] = peak.acknowledged
        document["transfers_per_second"] = round(peak.per_second, 1)
        document["failed"] = peak.failed
        document["node_cpu_microseconds_per_transfer"] = round(cpu_used / max(1, peak.acknowledged) * 1e6, 1)
        # Where the CPU went, so the large network's extra CPU per transfer can be traced to a thread.
        document["cpu_microseconds_per_transfer_by_thread"] = bench._per_transfer_by_thread(threads_before, threads_after, peak.acknowledged)
        faults = _major_faults(pids) - faults_before
        document["disk_reads_per_transfer"] = round(faults / max(1, peak.acknowledged), 3)
        # Which job waited for those pages: the apply (accounts), the indexer (its runs' merges), the tick thread...
        thread_faults_after = bench.thread_major_faults(cluster)
        document["disk_reads_per_transfer_by_thread"] = {
            thread: round((count - thread_faults_before.get(thread, 0.0)) / max(1, peak.acknowledged), 3)
            for thread, count in sorted(thread_faults_after.items())
        }
        # The copies each commit freed and the nodes dropped from memory (node/page_aging.py, DeadCopyDropper).
        document["dead_pages_dropped_per_transfer"] = round((_network_total(cluster, "tonle_state_dead_pages_dropped") - dropped_before) / max(1, peak.acknowledged), 2)
        # The entry-hash index merges a size class when it fills: a window that held a large merge pays for
        # work the windows before it did not (a node indexes a pair per transfer; at 13 million its merges have
        # written each pair 3 to 4 times more, in bursts).
        document["entry_hash_index_pairs_merged_per_transfer"] = round((_network_total(cluster, "tonle_entry_hash_index_merged_entries") - merged_before) / max(1, peak.acknowledged), 2)
        if device is not None:
            # Every write the disk completed while the network ran, whoever asked: a bench machine runs nothing else.
            requests, written = (after - before for after, before in zip(disk_writes(device), disk_before, strict=True))
            document["disk_writes_per_transfer"] = round(requests / max(1, peak.acknowledged), 2)
            document["disk_bytes_written_per_transfer"] = round(written / max(1, peak.acknowledged))
            # Counting every write as a random page, though the journal's and the history's are appended, so the
            # disk allows at least this much: the figure to read the large state's throughput against.
            document["disk_ceiling_transfers_per_second"] = round(document["disk_page_writes_per_second"] / max(requests / max(1, peak.acknowledged), 1e-9))
        document["node_memory_bytes"] = {name: bench.node_memory(pid) for name, pid in pids.items()}
        if cgroups:
            document["node_memory_limit_bytes"] = next(iter(cgroups.values())).limit_bytes
            document["node_memory_peak_bytes"] = {name: cgroup.peak_bytes() for name, cgroup in cgroups.items()}
            document["node_out_of_memory_kills"] = {name: cgroup.out_of_memory_kills() for name, cgroup in cgroups.items()}
    finally:
        cluster.kill()


def _major_faults(pids: dict[str, int]) -> int:
    """Pages the nodes have waited for the disk to read, all together."""
    return sum(bench.major_faults(pid) for pid in pids.values())


def run_scale(directory: Path, *, small_accounts: int, small_transfers: int, large_accounts: int, large_transfers: int,
              seconds: float, seed: int, settle_seconds: float = 0.0, memory_limit_bytes: int | None = None) -> dict[str, Any]:
    """Both networks are built first (`prepare`), then measured small, large, large, small. Measured once each
    in a fixed order, whatever drifts over the run (the first network's writes still being flushed, caches
    turned over) would count against the network measured second, always the large one; in this order it
    weighs on both alike. The ratio is of their totals."""
    prepare(directory / "small", accounts=small_accounts, transfers=small_transfers)
    prepare(directory / "large", accounts=large_accounts, transfers=large_transfers)
    sizes = {"small": (small_accounts, small_transfers), "large": (large_accounts, large_transfers)}
    order = ("small", "large", "large_again", "small_again")
    measured = {}
    for key in order:
        side = key.removesuffix("_again")
        accounts, transfers = sizes[side]
        measured[key] = measure(directory / side, accounts=accounts, transfers=transfers, seconds=seconds,
                                seed=seed + (1 if key.endswith("_again") else 0), settle_seconds=settle_seconds,
                                memory_limit_bytes=memory_limit_bytes)
    small_total = measured["small"]["transfers_per_second"] + measured["small_again"]["transfers_per_second"]
    large_total = measured["large"]["transfers_per_second"] + measured["large_again"]["transfers_per_second"]
    return {
        **measured,
        "order": list(order),
        "throughput_ratio_large_to_small": round(large_total / max(1.0, small_total), 3),
        "node_memory_limit_bytes": memory_limit_bytes,
        "settle_seconds": settle_seconds,
    }


def _measurements(document: dict[str, Any], side: str) -> list[dict[str, Any]]:
    return [document[key] for key in (side, f"{side}_again") if key in document]


def _peak_charged(document: dict[str, Any], side: str) -> int:
    return max(peak for measurement in _measurements(document, side) for peak in measurement["node_memory_peak_bytes"].values())


def _out_of_memory_kills(document: dict[str, Any], side: str) -> int:
    return sum(sum(measurement["node_out_of_memory_kills"].values()) for measurement in _measurements(document, side))


def _network_total(cluster: LocalCluster, counter: str) -> float:
    """An unlabelled counter, summed over the network's nodes."""
    return bench._summed_counter(cluster, counter, ()).get((), 0.0)


def render_scale(document: dict[str, Any]) -> str:
    rows = [("", "small", "large")]
    small, large = document["small"], document["large"]
    rows.append(("accounts", f"{small['accounts']:,}", f"{large['accounts']:,}"))
    rows.append(("transfers built into the state", f"{small['preloaded_transfers']:,}", f"{large['preloaded_transfers']:,}"))
    rows.append(("  and in it at the start of the run", f"{small['transfers_at_start']:,}", f"{large['transfers_at_start']:,}"))
    rows.append(("state size at the start", f"{small['state_bytes'] / 2**30:.2f} GiB", f"{large['state_bytes'] / 2**30:.2f} GiB"))
    if all("account_database_bytes_at_start" in side for side in (small, large)):
        rows.append(("account database, start / end of the run",
                     *(f"{side['account_database_bytes_at_start'] / 2**20:,.0f} / {side['account_database_bytes_at_end'] / 2**20:,.0f} MiB"
                       for side in (small, large))))
    if all("settling" in side for side in (small, large)):
        rows.append(("load before measuring, not counted", *(f"{side['settling']['seconds']:,.0f} s" for side in (small, large))))
        rows.append(("  committed transfers/s in it", *(f"{side['settling']['transfers_per_second']:,.0f}" for side in (small, large))))
        rows.append(("  disk reads per transfer in it", *(f"{side['settling']['disk_reads_per_transfer']:.2f}" for side in (small, large))))
    rows.append(("committed transfers/s", f"{small['transfers_per_second']:,.0f}", f"{large['transfers_per_second']:,.0f}"))
    if "small_again" in document:
        # The second measurement of each (order: small, large, large, small); the rows below are of the first.
        rows.append(("  measured again (small last)", f"{document['small_again']['transfers_per_second']:,.0f}",
                     f"{document['large_again']['transfers_per_second']:,.0f}"))
    rows.append(("node CPU per transfer (all nodes)", f"{small['node_cpu_microseconds_per_transfer']:,.0f} us",
                 f"{large['node_cpu_microseconds_per_transfer']:,.0f} us"))
    # By thread role, largest first in the large network; roles under 1 us per transfer in both are left out.
    by_thread = [side.get("cpu_microseconds_per_transfer_by_thread", {}) for side in (small, large)]
    threads = {thread for side in by_thread for thread in side}
    for thread in sorted(threads, key=lambda thread: -sum(by_thread[1].get(thread, {}).values())):
        cells = [(sum(side.get(thread, {}).values()), side.get(thread, {}).get("system", 0.0)) for side in by_thread]
        if max(total for total, _system in cells) >= 1:
            rows.append((f"  {thread} threads", *(f"{total:,.0f} us (sys {system:,.0f})" for total, system in cells)))
    if all("disk_ceiling_transfers_per_second" in side for side in (small, large)):
        rows.append(("disk writes per transfer (all nodes)", *(f"{side['disk_writes_per_transfer']:.1f} ({side['disk_bytes_written_per_transfer'] / 1024:.0f} KiB)" for side in (small, large))))
        rows.append(("random 4 KiB writes/s the disk takes", *(f"{side['disk_page_writes_per_second']:,}" for side in (small, large))))
        rows.append(("  ÷ writes per transfer: disk ceiling", *(f"{side['disk_ceiling_transfers_per_second']:,}/s" for side in (small, large))))
        rows.append(("  committed / disk ceiling", *(f"{side['transfers_per_second'] / side['disk_ceiling_transfers_per_second']:.0%}" for side in (small, large))))
    if all("dead_pages_dropped_per_transfer" in side for side in (small, large)):
        rows.append(("dead page copies dropped per transfer", *(f"{side['dead_pages_dropped_per_transfer']:.1f}" for side in (small, large))))
    if all("entry_hash_index_pairs_merged_per_transfer" in side for side in (small, large)):
        rows.append(("entry-hash index merges, pairs per transfer", *(f"{side['entry_hash_index_pairs_merged_per_transfer']:.1f}" for side in (small, large))))
    rows.append(("entry-hash index behind, at the end", *(f"{side['entry_hash_index_lag_entries']:,} Raft entries" for side in (small, large))))
    rows.append(("disk reads per transfer (all nodes)", *(f"{side['disk_reads_per_transfer']:.2f}" for side in (small, large))))
    by_thread_reads = [side.get("disk_reads_per_transfer_by_thread", {}) for side in (small, large)]
    for thread in sorted({thread for side in by_thread_reads for thread in side}, key=lambda thread: -by_thread_reads[1].get(thread, 0.0)):
        cells = [side.get(thread, 0.0) for side in by_thread_reads]
        if max(cells) >= 0.005:
            rows.append((f"  by {thread} threads", *(f"{cell:.2f}" for cell in cells)))
    for field, label in (("VmRSS", "node resident memory, max"), ("RssAnon", "  of which process heap"),
                         ("RssFile", "  of which mapped LMDB pages")):
        rows.append((label, *(f"{max(memory[field] for memory in side['node_memory_bytes'].values()) / 2**20:,.0f} MiB"
                              for side in (small, large))))
    if document.get("node_memory_limit_bytes"):
        limit = document["node_memory_limit_bytes"]
        rows.append(("node memory limit (cgroup, page cache in)", f"{limit / 1e6:,.0f} MB", f"{limit / 1e6:,.0f} MB"))
        rows.append(("  most charged to a node, all runs", *(f"{_peak_charged(document, side) / 1e6:,.0f} MB" for side in ("small", "large"))))
        rows.append(("  nodes killed for going over it", *(f"{_out_of_memory_kills(document, side)}" for side in ("small", "large"))))
    rows.append(("throughput, large / small" + (" (both runs)" if "small_again" in document else ""), "",
                 f"{document['throughput_ratio_large_to_small']:.1%}"))
    width = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join(f"{row[0]:<{width[0]}}  {row[1]:>{width[1]}}  {row[2]:>{width[2]}}" for row in rows)
