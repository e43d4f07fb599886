"""The raw pysyncobj ceiling: three plain pysyncobj processes replicating opaque batches of a given size.

No signatures, no LMDB, pysyncobj's own TCP transport and in-memory journal: what Raft alone can commit on
this machine for batches the size Tonle proposes, so the benchmark can say how close Tonle comes to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pysyncobj import SyncObj, SyncObjConf, replicated

from node.cluster import _free_ports

raft_ready_seconds = 30.0


class _Counter(SyncObj):
    def __init__(self, self_address: str, others: list[str], conf: SyncObjConf) -> None:
        super().__init__(self_address, others, conf)
        self.applied_batches = 0

    @replicated
    def apply_batch(self, batch: bytes) -> int:
        self.applied_batches += 1
        return len(batch)


def _conf(self_address: str) -> SyncObjConf:
    # The same Raft settings Tonle uses (consensus/raft/adapter.py), with pysyncobj's own transport.
    return SyncObjConf(
        autoTick=True, autoTickPeriod=0.01, appendEntriesUseBatch=False, appendEntriesPeriod=0.1,
        raftMinTimeout=0.8, raftMaxTimeout=1.6, connectionTimeout=3.0, commandsQueueSize=1024,
        appendEntriesBatchSizeBytes=2**16, bindAddress=self_address, dynamicMembershipChange=False,
    )


def _run_node(self_address: str, others: list[str], directory: Path, batch_bytes: int, seconds: float, in_flight: int) -> None:
    """Every node runs this; whichever is elected leader drives the load and writes the result."""
    node = _Counter(self_address, others, _conf(self_address))
    deadline = time.monotonic() + raft_ready_seconds
    while node._getLeader() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not node._isLeader():
        while not (directory / "stop").exists():
            time.sleep(0.1)
        return
    payload = os.urandom(batch_bytes)
    outstanding = 0
    committed = 0

    def done(_result, error) -> None:
        nonlocal outstanding, committed
        outstanding -= 1
        if error == 0:
            committed += 1

    started = time.monotonic()
    end = started + seconds
    while time.monotonic() < end:
        while outstanding < in_flight:
            outstanding += 1
            node.apply_batch(payload, callback=done)
        time.sleep(0.0005)
    elapsed = time.monotonic() - started
    # Written aside and renamed: the parent polls for the file and must never read it half written.
    (directory / "result.json.writing").write_text(json.dumps({"batches_per_second": committed / elapsed}))
    os.replace(directory / "result.json.writing", directory / "result.json")


def measure(directory: Path, *, batch_bytes: int, seconds: float, in_flight: int = 32) -> float:
    """Committed batches per second of a 3-process pysyncobj cluster on 127.0.0.1."""
    directory.mkdir(parents=True, exist_ok=True)
    addresses = [f"127.0.0.1:{port}" for port in _free_ports(3)]
    processes = []
    try:
        for address in addresses:
            others = [other for other in addresses if other != address]
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "node.bench_raft", address, ",".join(others), str(directory),
                     str(batch_bytes), str(seconds), str(in_flight)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )
        result_file = directory / "result.json"
        deadline = time.monotonic() + raft_ready_seconds + seconds + 30
        while not result_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not result_file.exists():
            raise RuntimeError("the raw pysyncobj measurement produced no result")
        result = json.loads(result_file.read_text())
        if "error" in result:
            raise RuntimeError(f"raw pysyncobj measurement: {result['error']}")
        return float(result["batches_per_second"])
    finally:
        (directory / "stop").write_text("")
        for process in processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


if __name__ == "__main__":
    self_address, others_text, directory_text, batch_text, seconds_text, in_flight_text = sys.argv[1:7]
    _run_node(self_address, others_text.split(","), Path(directory_text), int(batch_text), float(seconds_text), int(in_flight_text))
