"""Keeps the dead copies LMDB's copy-on-write leaves out of a node's memory: drops the pages each apply commit
freed (DeadCopyDropper), and marks every mapped state page cold at an interval (PageAger), so that reclaim under
a memory limit takes the pages nobody touched since before the live ones.

Why. Every commit writes each page it changes to another place in the file; the copy it replaces was just
read, so to the kernel it looks as recently used as the live pages, and a node under a memory cgroup kept
copies no one will read while it read live account pages back from disk. `madvise(MADV_COLD)` (Linux 5.4)
clears the accessed bits of the mapping's pages and moves them to the inactive list: a page touched again
before reclaim reaches it is referenced and kept, one that is not goes first. Measured with `tonle bench
--scale --node-memory-limit-bytes 300000000` (README, "Memory under a limit"). It does not drop anything:
without memory pressure nothing is reclaimed, and the cost is a walk of the mapping's page tables.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from pathlib import Path
from typing import Callable

from storage.free_pages import FreePagesUnreadable, freed_by_newest_commit
from storage.state import LedgerStore

logger = logging.getLogger("tonle.page_aging")

madvise_cold = 20  # MADV_COLD, <linux/mman.h>
madvise_page_out = 21  # MADV_PAGEOUT, <linux/mman.h>
process_madvise_number = 440  # the process_madvise system call, the same number on every architecture
iovecs_per_call_max = 1024  # UIO_MAXIOV: ranges one process_madvise call takes
_maps_path = Path("/proc/self/maps")


class PageAgingUnavailable(RuntimeError):
    """The kernel or the C library cannot mark pages cold (not Linux, or older than 5.4)."""


def _madvise() -> ctypes._CFuncPtr:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.madvise
    except (OSError, AttributeError) as error:
        raise PageAgingUnavailable(f"no madvise in this C library: {error}") from error
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def _file_mappings(path: Path, maps_text: str) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of every mapping of the file `path` in a /proc/PID/maps text."""
    target = str(path.resolve())
    found = []
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, _, end = fields[0].partition("-")
            found.append((int(start, 16), int(end, 16), int(fields[2], 16)))
    return found


def mappings_of(path: Path, maps_text: str) -> list[tuple[int, int]]:
    """(start, end) addresses of every mapping of the file `path` in a /proc/PID/maps text."""
    return [(start, end) for start, end, _offset in _file_mappings(path, maps_text)]


def whole_mapping_of(path: Path, maps_text: str) -> tuple[int, int] | None:
    """(start, end) of the one mapping of `path` from its first byte (how LMDB maps its data file), or None
    when there is not exactly one."""
    found = _file_mappings(path, maps_text)
    if len(found) != 1 or found[0][2] != 0:
        return None
    return found[0][0], found[0][1]


def page_runs(pages: tuple[int, ...]) -> list[tuple[int, int]]:
    """(first page, page count) of each run of consecutive page numbers, in page order."""
    runs: list[tuple[int, int]] = []
    for page in sorted(pages):
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


class _IoVector(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


class ProcessPageOut:
    """Pages out (address, length) ranges of this process's memory: process_madvise(2) on the process's own
    pidfd with MADV_PAGEOUT (Linux 5.10), one system call for up to 1,024 ranges. MADV_PAGEOUT reclaims the
    pages at once and discards nothing: a clean file page is dropped from the page cache (its data is on
    disk), a dirty one written back first, a page another process maps is left alone."""

    def __init__(self) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self._syscall = libc.syscall
        except (OSError, AttributeError) as error:
            raise PageAgingUnavailable(f"no syscall in this C library: {error}") from error
        self._syscall.restype = ctypes.c_long
        try:
            self._process = os.pidfd_open(os.getpid())
        except (AttributeError, OSError) as error:
            raise PageAgingUnavailable(f"no pidfd for this process (Linux 5.3 or later needed): {error}") from error

    def __call__(self, ranges: list[tuple[int, int]]) -> None:
        for first in range(0, len(ranges), iovecs_per_call_max):
            part = ranges[first : first + iovecs_per_call_max]
            vectors = (_IoVector * len(part))(*(_IoVector(address, length) for address, length in part))
            advised = self._syscall(ctypes.c_long(process_madvise_number), ctypes.c_int(self._process), vectors,
                                    ctypes.c_size_t(len(part)), ctypes.c_int(madvise_page_out), ctypes.c_uint(0))
            if advised < 0:
                code = ctypes.get_errno()
                if code in (errno.ENOSYS, errno.EINVAL):
                    raise PageAgingUnavailable(
                        "the kernel cannot page out ranges on request (process_madvise with MADV_PAGEOUT: Linux 5.10)")
                raise OSError(code, f"process_madvise(MADV_PAGEOUT) on the state's mapping: {errno.errorcode.get(code, code)}")

    def close(self) -> None:
        if self._process >= 0:
            os.close(self._process)
            self._process = -1


class DeadCopyDropper:
    """Drops from memory the pages the newest commit of a store freed: paged out of this process's mapping
    of the state (MADV_PAGEOUT drops a clean page no other process maps from the page cache and discards
    nothing). Those copies are dead: LMDB writes the live pages elsewhere, and no write transaction reuses a
    freed page before the one after next (a reader of an older state that still reads one reads it back).

    Call drop_newest from the store's writer, just after a commit, while holding what keeps the store's
    environment from being replaced (the apply lock), so that the mapping it advises is the environment's.
    The dead copies of a commit by another writer in between are left to the page aging: a page-cache hit
    lost at most."""

    def __init__(self, store: LedgerStore, page_out: ProcessPageOut | None = None,
                 maps: Callable[[], str] = _maps_path.read_text) -> None:
        self._store = store
        self._page_out = page_out if page_out is not None else ProcessPageOut()
        self._maps = maps
        self._environment = None
        self._descriptor = -1
        self._page_bytes = 0
        self._mapping: tuple[int, int] | None = None
        self._newest_transaction_id = -1
        self.pages_dropped = 0

    def close(self) -> None:
        self._close_data_file()
        self._page_out.close()

    def _close_data_file(self) -> None:
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1

    def _follow_environment(self) -> None:
        """Open the data file of the store's environment, and find its mapping, when the environment is new
        (first call, or a snapshot install put another in place)."""
        environment = self._store.environment
        if environment is self._environment:
            return
        self._close_data_file()
        path = self._store.path / "data.mdb"
        self._descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._page_bytes = environment.stat()["psize"]
        self._mapping = whole_mapping_of(path, self._maps())
        if self._mapping is None:
            raise FreePagesUnreadable(f"{path} is not mapped once from its start in this process")
        self._environment = environment
        self._newest_transaction_id = -1

    def drop_newest(self) -> int:
        """Drop the pages the newest commit freed, once; returns how many."""
        self._follow_environment()
        freed = freed_by_newest_commit(self._descriptor, self._page_bytes)
        if freed.transaction_id == self._newest_transaction_id:
            return 0
        self._newest_transaction_id = freed.transaction_id
        start, end = self._mapping
        runs = page_runs(freed.pages)
        # Only the data file's mapping is advised, never other memory of the process.
        if runs and start + (runs[-1][0] + runs[-1][1]) * self._page_bytes > end:
            raise FreePagesUnreadable(f"freed pages up to {runs[-1][0] + runs[-1][1] - 1} lie outside the mapping")
        if runs:
            self._page_out([(start + first * self._page_bytes, count * self._page_bytes) for first, count in runs])
        self.pages_dropped += len(freed.pages)
        return len(freed.pages)


def age_pages(path: Path, madvise=None) -> int:
    """Mark every page of this process's mappings of `path` cold; returns the bytes of mapping advised."""
    function = madvise if madvise is not None else _madvise()
    advised = 0
    for start, end in mappings_of(path, _maps_path.read_text()):
        if function(start, end - start, madvise_cold) != 0:
            code = ctypes.get_errno()
            if code == errno.EINVAL:
                raise PageAgingUnavailable("the kernel does not know MADV_COLD (Linux 5.4 or later needed)")
            if code != errno.ENOMEM:  # ENOMEM: part of the range is not mapped (the file ended); the rest was advised
                raise OSError(code, f"madvise(MADV_COLD) on {path}: {errno.errorcode.get(code, code)}")
        advised += end - start
    return advised


class PageAger:
    """A thread that ages the pages of one file every `interval_seconds` until closed."""

    def __init__(self, path: Path, interval_seconds: float) -> None:
        if interval_seconds <= 0:
            raise ValueError(f"interval_seconds must be positive, not {interval_seconds}")
        self.path = path
        self.interval_seconds = interval_seconds
        self.rounds = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tonle-page-aging", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            function = _madvise()
            while not self._stopped.wait(self.interval_seconds):
                age_pages(self.path, function)
                self.rounds += 1
        except (PageAgingUnavailable, OSError) as error:
            # Only memory efficiency is lost: the node goes on, its page cache aged by the kernel alone.
            logger.warning("page aging of %s stopped: %s", self.path, error)
