"""Memory cgroups for local node processes: confine a node to a memory limit, as systemd's MemoryMax= or a
container's limit does, and read back the most it was charged.

A node's VmRSS counts every LMDB page it has mapped, and on recent kernels a fault maps the whole page-cache
folio around the page it needs, so VmRSS says more about the kernel's mapping policy than about what the
node needs. A memory cgroup charges the node for its heap and for the page cache it reads and writes, and
takes pages back when the limit is reached: a node that keeps its speed under a limit needs no more than it.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

cgroup_v1_memory_root = Path("/sys/fs/cgroup/memory")
cgroup_v2_roots = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
# Emptying a cgroup takes the kernel a moment after its last process is reaped.
remove_seconds_max = 10.0
remove_poll_seconds = 0.05


class MemoryLimitUnavailable(RuntimeError):
    """This machine gives no writable memory cgroup to put a node in (not root, or no memory controller)."""


@dataclass(frozen=True)
class MemoryCgroup:
    """One memory cgroup, of version 1 (`memory.limit_in_bytes`) or 2 (`memory.max`)."""

    path: Path
    version: int
    limit_bytes: int

    @classmethod
    def create(cls, name: str, limit_bytes: int) -> MemoryCgroup:
        """A new cgroup named after `name` (with a random suffix) limited to `limit_bytes` of memory, page cache
        included, and no swap."""
        if limit_bytes <= 0:
            raise ValueError(f"memory limit must be positive, not {limit_bytes}")
        leaf = f"tonle-{name}-{secrets.token_hex(4)}"
        v2_root = _v2_root_with_memory()
        try:
            if v2_root is not None:
                path = v2_root / leaf
                path.mkdir()
                (path / "memory.max").write_text(str(limit_bytes))
                if (path / "memory.swap.max").exists():
                    (path / "memory.swap.max").write_text("0")
                return cls(path, 2, limit_bytes)
            if (cgroup_v1_memory_root / "memory.limit_in_bytes").exists():
                path = cgroup_v1_memory_root / leaf
                path.mkdir()
                (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
                # No swapping out of the limit (the file exists only where swap accounting is on).
                if (path / "memory.memsw.limit_in_bytes").exists():
                    (path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
                return cls(path, 1, limit_bytes)
        except OSError as error:
            raise MemoryLimitUnavailable(f"cannot create memory cgroup {leaf}: {error}") from error
        raise MemoryLimitUnavailable(
            "no memory cgroup controller to limit a node with: need cgroup v1's /sys/fs/cgroup/memory or a cgroup v2 "
            "mount whose cgroup.subtree_control lists memory"
        )

    def command(self, command: list[str]) -> list[str]:
        """`command`, run so that it enters this cgroup before it starts: the shell moves itself (writing 0
        moves the writer) and then execs, so the process keeps its pid and every page it touches is charged here."""
        return ["/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *command]

    def peak_bytes(self) -> int:
        """The most memory, heap and page cache, charged to the cgroup since it was made."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        return int((self.path / name).read_text())

    def usage_bytes(self) -> int:
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        return int((self.path / name).read_text())

    def out_of_memory_kills(self) -> int:
        """Processes the kernel killed for going over the limit (both versions count them as `oom_kill`)."""
        events = "memory.events" if self.version == 2 else "memory.oom_control"
        for line in (self.path / events).read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        """Delete the cgroup once its processes are gone (they must have been killed and reaped)."""
        deadline = time.monotonic() + remove_seconds_max
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(remove_poll_seconds)


def _v2_root_with_memory() -> Path | None:
    for root in cgroup_v2_roots:
        control = root / "cgroup.subtree_control"
        try:
            if "memory" in control.read_text().split():
                return root
        except OSError:
            continue
    return None


def drop_from_page_cache(directory: Path) -> int:
    """Write back and drop every file under `directory` from the page cache; returns bytes dropped. Pages a
    build or a copy left there are charged to whoever made them, so a node in a cgroup would map them
    without being charged; dropped, they come back charged to the node that reads them."""
    dropped = 0
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            dropped += os.fstat(descriptor).st_size
        finally:
            os.close(descriptor)
    return dropped


def own_memory_limit_bytes(
    cgroup_file: Path = Path("/proc/self/cgroup"),
    v1_memory_root: Path = cgroup_v1_memory_root,
    v2_root: Path = cgroup_v2_roots[0],
    meminfo_file: Path = Path("/proc/meminfo"),
) -> int | None:
    """The tightest memory limit on this process: its memory cgroup's or an ancestor's (systemd's MemoryMax= on
    the unit or its slice, a container's limit), or None when none is set below the machine's memory.

    Read from the cgroup files of either version; a file that cannot be read counts as no limit there."""
    try:
        lines = cgroup_file.read_text().splitlines()
    except OSError:
        return None
    limits: list[int] = []
    for line in lines:
        _hierarchy, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        if controllers == "":
            limits.extend(_limits_up_from(v2_root, relative, "memory.max"))
        elif "memory" in controllers.split(","):
            limits.extend(_limits_up_from(v1_memory_root, relative, "memory.limit_in_bytes"))
    machine_bytes = _machine_memory_bytes(meminfo_file)
    tightest = min(limits, default=None)
    if tightest is None or (machine_bytes is not None and tightest >= machine_bytes):
        return None  # cgroup v1 writes "no limit" as a number near 2**63
    return tightest


def _limits_up_from(root: Path, relative: str, file_name: str) -> list[int]:
    """The numeric limits in `file_name` of the cgroup at `relative` under `root` and of its ancestors."""
    limits = []
    directory = root / relative.strip("/")
    while True:
        try:
            text = (directory / file_name).read_text().strip()
        except OSError:
            text = ""
        if text.isdigit():
            limits.append(int(text))
        if directory == root or root not in directory.parents:
            return limits
        directory = directory.parent


def _machine_memory_bytes(meminfo_file: Path) -> int | None:
    try:
        for line in meminfo_file.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024  # the kernel counts it in KiB
    except (OSError, ValueError, IndexError):
        return None
    return None
