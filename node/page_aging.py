"""Marks the pages a node has mapped from its LMDB state cold at an interval, so that reclaim under a memory
limit takes the pages nobody touched since (the copies LMDB's copy-on-write left behind) before the live ones.

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
import threading
from pathlib import Path

logger = logging.getLogger("tonle.page_aging")

madvise_cold = 20  # MADV_COLD, <linux/mman.h>
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


def mappings_of(path: Path, maps_text: str) -> list[tuple[int, int]]:
    """(start, end) addresses of every mapping of the file `path` in a /proc/PID/maps text."""
    target = str(path.resolve())
    found = []
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, _, end = fields[0].partition("-")
            found.append((int(start, 16), int(end, 16)))
    return found


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
