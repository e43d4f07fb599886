"""Memory cgroups for node processes: the limit holds, the peak counts heap and page cache, dropped pages leave,
and a process reads the limit it runs under."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from node.memory_limit import MemoryCgroup, drop_from_page_cache, own_memory_limit_bytes
from tests.memory_cgroups import cgroups, memory_cgroup_or_skip  # noqa: F401 - cgroups is a fixture

mebibyte = 2**20
process_seconds_max = 60.0


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


def test_a_process_in_a_memory_cgroup_reads_its_limit(cgroups: list[MemoryCgroup]) -> None:
    cgroup = _limited(cgroups, 300 * mebibyte)
    result = _run(cgroup, "from node.memory_limit import own_memory_limit_bytes; print(own_memory_limit_bytes())")
    assert result.returncode == 0, result.stderr
    # cgroup v1 rounds the limit down to whole pages.
    assert 300 * mebibyte - 4096 <= int(result.stdout) <= 300 * mebibyte


machine_kib = 24 * 2**20  # a 24 GiB machine, as /proc/meminfo counts it


def _hierarchy(tmp_path: Path, cgroup_lines: str, files: dict[str, str]) -> dict[str, Path]:
    """A /proc/self/cgroup, a v1 memory root, a v2 root and a /proc/meminfo under `tmp_path`."""
    (tmp_path / "cgroup").write_text(cgroup_lines)
    (tmp_path / "meminfo").write_text(f"MemTotal:       {machine_kib} kB\nMemFree:        1024 kB\n")
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {"cgroup_file": tmp_path / "cgroup", "v1_memory_root": tmp_path / "v1", "v2_root": tmp_path / "v2",
            "meminfo_file": tmp_path / "meminfo"}


def test_the_tightest_limit_of_a_v2_cgroup_and_its_ancestors_counts(tmp_path: Path) -> None:
    paths = _hierarchy(tmp_path, "0::/system.slice/tonle.service\n", {
        "v2/system.slice/tonle.service/memory.max": "max\n",
        "v2/system.slice/memory.max": "536870912\n",
    })
    assert own_memory_limit_bytes(**paths) == 536870912
    (tmp_path / "v2/system.slice/tonle.service/memory.max").write_text("314572800\n")
    assert own_memory_limit_bytes(**paths) == 314572800


def test_a_v1_memory_cgroup_without_a_limit_reads_as_none(tmp_path: Path) -> None:
    paths = _hierarchy(tmp_path, "9:name=systemd:/\n4:cpu,memory:/docker/abc\n3:pids:/docker/abc\n", {
        "v1/docker/abc/memory.limit_in_bytes": "9223372036854771712\n",
        "v1/memory.limit_in_bytes": "9223372036854771712\n",
    })
    assert own_memory_limit_bytes(**paths) is None
    (tmp_path / "v1/docker/abc/memory.limit_in_bytes").write_text("1073741824\n")
    assert own_memory_limit_bytes(**paths) == 1073741824


def test_a_limit_at_or_above_the_machine_memory_is_no_limit(tmp_path: Path) -> None:
    paths = _hierarchy(tmp_path, "0::/\n", {"v2/memory.max": f"{machine_kib * 1024}\n"})
    assert own_memory_limit_bytes(**paths) is None
    (tmp_path / "v2/memory.max").write_text(f"{machine_kib * 1024 - 4096}\n")
    assert own_memory_limit_bytes(**paths) == machine_kib * 1024 - 4096


def test_unreadable_cgroup_files_read_as_no_limit(tmp_path: Path) -> None:
    paths = _hierarchy(tmp_path, "0::/gone\n", {})
    assert own_memory_limit_bytes(**paths) is None
    paths["cgroup_file"] = tmp_path / "missing"
    assert own_memory_limit_bytes(**paths) is None
