"""`scripts/compare`: two versions measured side by side, at one transfer in flight, in the same minutes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

repository = Path(__file__).resolve().parents[2]
compare_seconds_max = 300


def run_compare(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(repository / "scripts" / "compare"), *arguments], capture_output=True, text=True, timeout=compare_seconds_max
    )


def test_compare_runs_both_sides_at_once_and_reports_each_sides_cpu_per_transfer_and_their_ratio() -> None:
    completed = run_compare("--rounds", "1", "--seconds", "2", str(repository), str(repository))
    assert completed.returncode == 0, completed.stderr
    label = repository.name
    sides = re.findall(r"^round 1 +(\S+) +([0-9.]+) ms CPU/transfer +([0-9.]+)/s +p50 ([0-9.]+) ms", completed.stdout, re.M)
    assert [side[0] for side in sides] == [f"{label}-a", f"{label}-b"], completed.stdout
    for _, cpu_ms, per_second, p50_ms in sides:
        assert float(cpu_ms) > 0 and float(per_second) > 0 and float(p50_ms) > 0, completed.stdout
    ratio = float(re.search(r"^round 1  B/A CPU per transfer ([0-9.]+)$", completed.stdout, re.M).group(1))
    # The ratio is of the unrounded figures; the printed ones have two decimals, so it may differ a little.
    assert abs(ratio - float(sides[1][1]) / float(sides[0][1])) < 0.005
    assert re.search(rf"^B \({label}-b\) against A \({label}-a\) over 1 rounds: CPU per transfer x", completed.stdout, re.M)


def test_compare_with_a_rate_offers_that_rate_open_loop_on_both_sides() -> None:
    completed = run_compare("--rounds", "1", "--seconds", "3", "--rate", "40", str(repository), str(repository))
    assert completed.returncode == 0, completed.stderr
    rates = [float(rate) for rate in re.findall(r"^round 1 +\S+ +[0-9.]+ ms CPU/transfer +([0-9.]+)/s", completed.stdout, re.M)]
    # 40/s offered in 10 ms ticks for 3 s: 120 transfers each, all answered (none refused, none lost).
    assert len(rates) == 2 and all(30 <= rate <= 41 for rate in rates), completed.stdout
    assert "failed" not in completed.stdout


def test_compare_stops_with_the_sides_error_when_one_side_is_not_a_source_tree(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-tree"
    empty.mkdir()
    completed = run_compare("--rounds", "1", "--seconds", "1", str(repository), str(empty))
    assert completed.returncode == 1
    assert "side not-a-tree stopped before its network was ready" in completed.stderr
    assert f"{empty} holds no node package" in completed.stderr, completed.stderr
