"""Memory cgroups for node processes: the limit holds, the peak counts heap and page cache, dropped pages leave."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.memory_limit import MemoryCgroup, drop_from_page_cache
from tests.memory_cgroups import memory_cgroup_or_skip

mebibyte = 2**20
process_seconds_max = 60.0


@pytest.fixture
def cgroups() -> Iterator[list[MemoryCgroup]]:
    made: list[MemoryCgroup] = []
    yield made
    for cgroup in made:
        cgroup.remove()


def _limited(cgroups: list[MemoryCgroup], limit_bytes: int) -> MemoryCgroup:
    cgroup = memory_cgroup_or_skip(limit_bytes)
    cgroups.append(cgroup)
    return cgroup


def _run(cgroup: MemoryCgroup, program: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cgroup.command([sys.executable, "-c", program, *arguments]), capture_output=True, text=True,
                          timeout=process_seconds_max, check=False)


def test_a_process_over_the_limit_is_killed_by_the_kernel(cgroups: list[MemoryCgroup]) -> None:
    cgroup = _limited(cgroups, 64 * mebibyte)
    result = _run(cgroup, "block = bytearray(256 * 2**20); block[::4096] = b'x' * len(block[::4096]); print('survived')")
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stdout, result.stderr)
    assert "survived" not in result.stdout
    assert cgroup.out_of_memory_kills() == 1


def test_a_process_under_the_limit_runs_and_its_heap_counts_in_the_peak(cgroups: list[MemoryCgroup]) -> None:
    cgroup = _limited(cgroups, 256 * mebibyte)
    result = _run(cgroup, "block = bytearray(96 * 2**20); block[::4096] = b'x' * len(block[::4096]); print('survived')")
    assert result.returncode == 0, result.stderr
    assert "survived" in result.stdout
    assert 96 * mebibyte <= cgroup.peak_bytes() <= 256 * mebibyte


def test_page_cache_a_process_writes_is_charged_until_it_is_dropped(cgroups: list[MemoryCgroup], tmp_path: Path) -> None:
    cgroup = _limited(cgroups, 512 * mebibyte)
    written = tmp_path / "pages"
    written.mkdir()
    result = _run(cgroup, "import sys; open(sys.argv[1], 'wb').write(b'p' * 64 * 2**20)", str(written / "file"))
    assert result.returncode == 0, result.stderr
    charged = cgroup.usage_bytes()
    assert charged >= 60 * mebibyte
    assert drop_from_page_cache(written) == 64 * mebibyte
    assert cgroup.usage_bytes() <= charged - 60 * mebibyte


def test_a_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        MemoryCgroup.create("test", 0)
