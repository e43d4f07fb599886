"""A closed-loop workload of random signed transfers against a local network, with a conservation check."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from consensus.entries import Transfer, sign_entry
from node.client import AsyncClient, ClientError, new_transfer_id
from node.cluster import LocalCluster

progress_interval_seconds = 0.25
progress_interval_not_a_terminal_seconds = 5.0
transfer_amount_max = 1000


@dataclass(frozen=True, slots=True)
class LoadSummary:
    document: dict[str, Any]

    @property
    def conserved(self) -> bool:
        return bool(self.document["conservation"]["conserved"])

    def render(self) -> str:
        """The figures a person wants after a run, one per line, then the check of every node."""
        document = self.document
        conservation_result = document["conservation"]
        lines = [
            f"transfers acknowledged  {document['acknowledged']:,} of {document['transfers']:,}"
            f" (not acknowledged: {dict(document['rejected']) or 'none'})",
            f"throughput              {document['transfers_per_second']:,.0f} transfers/s over {document['seconds']} s",
            f"commit latency          p50 {document['latency_ms']['p50']} ms, p99 {document['latency_ms']['p99']} ms",
            "conservation            "
            + ("every node holds the same totals, equal to what was issued" if self.conserved else "FAILED"),
        ]
        for name, totals in conservation_result["totals"].items():
            parts = ", ".join(f"{currency} held {row['held']:,} issued {row['issued']:,}" for currency, row in totals.items())
            lines.append(
                f"  {name:<10} index {conservation_result['applied_index'][name]:>7}"
                f"  state {conservation_result['state_hash'][name][:16]}  {parts}"
            )
        return "\n".join(lines)


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    position = min(len(sorted_values) - 1, int(round(fraction * (len(sorted_values) - 1))))
    return sorted_values[position]


class Progress:
    """A one-line progress bar on stderr (a line every few seconds when stderr is not a terminal)."""

    def __init__(self, total: int, label: str) -> None:
        self.total = total
        self.label = label
        self.done = 0
        self.started = time.monotonic()
        self._interactive = sys.stderr.isatty()
        self._last = 0.0

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        interval = progress_interval_seconds if self._interactive else progress_interval_not_a_terminal_seconds
        if now - self._last >= interval or self.done >= self.total:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        width = 30
        filled = int(width * self.done / max(1, self.total))
        rate = self.done / max(1e-9, now - self.started)
        line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {rate:,.0f}/s"
        if self._interactive:
            sys.stderr.write("\r" + line)
            if self.done >= self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def build_transfers(cluster: LocalCluster, count: int, seed: int) -> list[bytes]:
    """Pre-sign `count` random transfers between customer accounts of the same currency."""
    generator = random.Random(seed)
    by_currency: dict[str, list[str]] = {}
    for account in cluster.customer_accounts():
        by_currency.setdefault(account["currency"], []).append(account["account"])
    currencies = sorted(currency for currency, names in by_currency.items() if len(names) >= 2)
    if not currencies:
        raise ValueError("the network needs at least two customer accounts in one currency")
    keys = {record["id"]: cluster.institution_key(record["id"]) for record in cluster.description["institutions"]}

    entries = []
    for _ in range(count):
        currency = generator.choice(currencies)
        debit, credit = generator.sample(by_currency[currency], 2)
        signer = debit.rpartition("@")[2]
        body = Transfer(new_transfer_id(), debit, credit, generator.randint(1, transfer_amount_max), currency)
        entries.append(sign_entry(body, cluster_id=cluster.cluster_id, signer=signer, signing_key=keys[signer]))
    return entries


async def _drive(
    addresses: list[str], entries: list[bytes], concurrency: int, batch_size: int, progress: Progress
) -> tuple[Counter[str], list[float], float]:
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    clients = [AsyncClient(address) for address in addresses]
    batches = [entries[start : start + batch_size] for start in range(0, len(entries), batch_size)]
    next_batch = 0

    async def worker(number: int) -> None:
        nonlocal next_batch
        client = clients[number % len(clients)]
        while next_batch < len(batches):
            batch = batches[next_batch]
            next_batch += 1
            started = time.perf_counter()
            try:
                results = await client.submit(batch)
            except ClientError as error:
                outcomes[f"error:{error.code}"] += len(batch)
                progress.advance(len(batch))
                continue
            elapsed = time.perf_counter() - started
            for result in results:
                if result["status"] == "applied" and result["result"] in ("ok", "exists"):
                    outcomes["acknowledged"] += 1
                    latencies.append(elapsed)
                else:
                    outcomes[f"{result['status']}:{result['result']}"] += 1
            progress.advance(len(batch))

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(number) for number in range(concurrency)))
    finally:
        for client in clients:
            client.close()
    return outcomes, latencies, time.perf_counter() - started


def conservation(cluster: LocalCluster, before: dict[str, Any] | None) -> dict[str, Any]:
    """Totals per currency on every running node, checked against each other and against `before`."""
    statuses = cluster.wait_converged([name for name in cluster.nodes if cluster.is_running(name)])
    per_node = {}
    for name in statuses:
        with cluster.client(name) as client:
            per_node[name] = client.totals()["totals"]
    reference = before if before is not None else next(iter(per_node.values()))
    conserved = all(
        totals == per_node[next(iter(per_node))]
        and all(row["net"] == 0 and row["held"] == row["issued"] for row in totals.values())
        and all(totals[currency]["held"] == reference[currency]["held"] for currency in reference)
        for totals in per_node.values()
    )
    return {
        "conserved": conserved,
        "totals": per_node,
        "applied_index": {name: status["applied_index"] for name, status in statuses.items()},
        "state_hash": {name: status["state_hash"] for name, status in statuses.items()},
    }


def run_load(
    cluster: LocalCluster,
    *,
    transfers: int,
    concurrency: int,
    batch_size: int = 1,
    nodes: list[str] | None = None,
    seed: int | None = None,
) -> LoadSummary:
    seed = seed if seed is not None else random.SystemRandom().randrange(2**32)
    targets = nodes or [name for name in cluster.nodes if cluster.is_running(name)]
    leader = cluster.wait_for_leader()
    with cluster.client(leader) as client:
        before = client.totals()["totals"]
    signing = Progress(transfers, "signing ")
    entries = []
    for start in range(0, transfers, 1000):
        entries.extend(build_transfers(cluster, min(1000, transfers - start), seed + start))
        signing.advance(min(1000, transfers - start))
    progress = Progress(transfers, "transfers")
    outcomes, latencies, elapsed = asyncio.run(
        _drive([cluster.nodes[name].client_address for name in targets], entries, concurrency, batch_size, progress)
    )
    latencies.sort()
    acknowledged = outcomes.pop("acknowledged", 0)
    document = {
        "transfers": transfers,
        "concurrency": concurrency,
        "batch_size": batch_size,
        "nodes": targets,
        "seed": seed,
        "acknowledged": acknowledged,
        "rejected": dict(sorted(outcomes.items())),
        "seconds": round(elapsed, 3),
        "transfers_per_second": round(acknowledged / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {
            "p50": round(_percentile(latencies, 0.50) * 1000, 2),
            "p99": round(_percentile(latencies, 0.99) * 1000, 2),
            "max": round((latencies[-1] if latencies else 0.0) * 1000, 2),
        },
        "conservation": conservation(cluster, before),
    }
    return LoadSummary(document)
