"""`tonle bench` end to end on a short run: the figures issue 6 names, as JSON last on stdout, and the table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from node.bench import render
from node.cluster import LocalCluster

bench_seconds_max = 240


def test_the_bench_reports_throughput_latency_and_ceilings_measured_in_one_run(tmp_path: Path) -> None:
    directory = tmp_path / "bench"
    completed = subprocess.run(
        [sys.executable, "-m", "node", "bench", "--duration", "4", "--accounts", "40", "--seed", "3", "--output", "json",
         "--dir", str(directory)],
        capture_output=True, text=True, timeout=bench_seconds_max,
    )
    if completed.returncode != 0 and (directory / "network" / "cluster.json").exists():
        print(LocalCluster.load(directory / "network").logs())
    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)

    assert document["transfers_per_second"] > 0 and document["peak"]["failed"] == {}
    assert document["ratio_to_signature_ceiling"] == round(document["transfers_per_second"] / document["signature_ceiling_per_second"], 3)
    assert set(document["latency_ms"]) == {"1_in_flight", "25%", "50%", "75%"}
    for figures in document["latency_ms"].values():
        assert 0 < figures["p50"] <= figures["p99"] <= figures["p999"]
    # The ceiling is measured again once the network is gone, and the change between the two reported.
    assert document["signature_ceiling_after_per_second"] > 0
    change = document["signature_ceiling_after_per_second"] / document["signature_ceiling_per_second"] - 1
    assert abs(document["machine_speed_change"] - change) < 0.001
    assert document["apply_microseconds_alone"] > 0 and document["apply_microseconds_beside_busy_thread"] > 0

    assert "Tonle committed transfers" in completed.stderr and "after the load" in completed.stderr
    steady = render({**document, "machine_speed_change": 0.02})
    moved = render({**document, "machine_speed_change": -0.25})
    assert "uncertain" not in steady
    assert moved.splitlines()[-1].startswith("note: this machine's signature ceiling moved by -25% during the run")
