"""One side of `scripts/compare`: a local network of the source tree on PYTHONPATH, loaded with one transfer in flight or at a fixed rate.

Run by scripts/compare with the tree to measure first on PYTHONPATH, so that this file, from the checkout that
compares, drives an older or newer tree through the API they share (LocalCluster, Workload, one_in_flight).
It builds its network, then waits at a barrier (a file) so that both sides load the machine at the same time,
and prints one JSON line: transfers/s, latency quantiles, and the nodes' CPU (user + system, every process of the
network) per committed transfer. With `--rate` the load is open loop (node.bench.open_loop: requests at a fixed
tick whatever the replies do), where latency shows the queues that one transfer in flight never builds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import node
from node.bench import Workload, network_raft, one_in_flight, open_loop
from node.cluster import LocalCluster

barrier_wait_seconds_max = 600.0
barrier_poll_seconds = 0.02
accounts_per_currency = 250
# At most about 400 one-transfer requests a second can be answered on a 2-core machine at one in flight.
one_in_flight_per_second_max = 400
# An open loop's pre-signed transfers: its rate for its seconds, and this much more for the tick's rounding.
open_loop_spare_fraction = 0.1


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and the threads it has, from /proc (comm may hold spaces: split after it).

    node/bench.py has the same reading as a private helper; this file keeps its own so that it depends on no
    more of the measured tree than the load it drives, and can measure revisions that differ there."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {seconds:.0f} s")
        time.sleep(barrier_poll_seconds)


def main(arguments: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--tree", type=Path, required=True, help="the source tree this side measures")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--rate", type=float, help="offer this many transfers/s, open loop (default: one in flight)")
    parser.add_argument("--ready", type=Path, required=True, help="created once the network is built")
    parser.add_argument("--go", type=Path, required=True, help="the load starts once this file exists")
    options = parser.parse_args(arguments)
    imported_from = Path(node.__file__).resolve().parent.parent
    if imported_from != options.tree.resolve():
        # The project is installed in the virtualenv (editable), so a tree without the package would
        # silently measure the installed checkout instead.
        print(f"{options.tree} holds no node package: this side imported {imported_from}", file=sys.stderr)
        return 2
    directory = Path(tempfile.mkdtemp(prefix=f"tonle-compare-{options.label}-"))
    try:
        cluster = LocalCluster.create(
            directory / "network", validators=3, institutions=2, institution_nodes=False, raft=network_raft,
            accounts_per_currency=accounts_per_currency,
        )
        with cluster:
            cluster.start()
            leader = cluster.wait_for_leader()
            cluster.wait_ready()
            cluster.open_and_fund_accounts(via=leader)
            per_second = options.rate * (1 + open_loop_spare_fraction) if options.rate else one_in_flight_per_second_max
            workload = Workload(cluster, int(per_second * options.seconds) + 1_000, 1)
            leader = cluster.wait_for_leader()
            pids = [member.pid for member in cluster.nodes.values() if member.pid]
            options.ready.touch()
            wait_for(options.go, barrier_wait_seconds_max)
            cpu_before = sum(process_cpu_seconds(pid) for pid in pids)
            address = str(cluster.nodes[leader].client_address)
            if options.rate:
                phase = asyncio.run(open_loop(address, workload, options.seconds, options.rate, options.label))
            else:
                phase = asyncio.run(one_in_flight(address, workload, options.seconds))
            cpu_used = sum(process_cpu_seconds(pid) for pid in pids) - cpu_before
        committed = phase.acknowledged
        print(json.dumps({
            "label": options.label,
            "transfers_per_second": round(phase.per_second, 1),
            "offered_per_second": options.rate,
            "failed": phase.failed,
            "latency_ms": phase.latency_ms(),
            "node_cpu_ms_per_transfer": round(cpu_used / committed * 1000, 3) if committed else None,
            "nodes": len(pids),
        }), flush=True)
        return 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
