"""Group commit: a bounded queue of verified entries cut into batches by bytes and by waiting time."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from consensus.batch import Batch, Checkpoint, batch_bytes_max, encode_batch, encoded_size

# A unit is entries that must travel in one batch, in order: a linked chain, or a single entry.
Unit = tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ProposerLimits:
    batch_bytes_max: int = batch_bytes_max
    queue_entries_max: int = 20_000
    batch_delay_microseconds: int = 1_000


class Proposer:
    """Pure batching state: callers supply the time; the node's event loop drives it.

    A batch closes when the next unit would not fit in `batch_bytes_max`, or when the oldest queued entry
    has waited `batch_delay_microseconds`. When nothing is in flight the caller flushes at once, so one
    transfer alone is never delayed by the window: the window only ever groups entries under load.
    A linked chain is never split across batches (it applies all-or-nothing within one batch).
    """

    def __init__(self, limits: ProposerLimits) -> None:
        if limits.batch_bytes_max > batch_bytes_max:
            raise ValueError(f"batch_bytes_max {limits.batch_bytes_max} exceeds the format's {batch_bytes_max}")
        self.limits = limits
        self._queue: deque[Unit] = deque()
        self._queued_entries = 0
        self._queued_bytes = 0
        self._oldest_enqueued_microseconds: int | None = None

    def __len__(self) -> int:
        return self._queued_entries

    def fits(self, unit: Unit) -> bool:
        """Whether a unit can ever be proposed: it must fit in one batch on its own."""
        return encoded_size(sum(len(entry) for entry in unit), len(unit)) <= self.limits.batch_bytes_max

    def offer(self, units: list[Unit], now_microseconds: int) -> bool:
        """Queue all of `units` or none of them. False means the queue is full: the caller answers busy."""
        count = sum(len(unit) for unit in units)
        if self._queued_entries + count > self.limits.queue_entries_max:
            return False
        if not self._queue and units:
            self._oldest_enqueued_microseconds = now_microseconds
        for unit in units:
            if not self.fits(unit):
                raise ValueError("a unit larger than one batch must be refused before it is offered")
            self._queue.append(unit)
            self._queued_bytes += sum(len(entry) for entry in unit)
        self._queued_entries += count
        return True

    @property
    def oldest_enqueued_microseconds(self) -> int | None:
        return self._oldest_enqueued_microseconds

    def due_microseconds(self) -> int | None:
        """When the current window closes, or None if nothing is queued."""
        if self._oldest_enqueued_microseconds is None:
            return None
        return self._oldest_enqueued_microseconds + self.limits.batch_delay_microseconds

    def has_full_batch(self) -> bool:
        """True when the queue holds more than one batch can carry, so a batch would close by size."""
        return encoded_size(self._queued_bytes, self._queued_entries) > self.limits.batch_bytes_max

    def take_batch(
        self, proposer_time_ms: int, checkpoint: Checkpoint | None, now_microseconds: int
    ) -> tuple[bytes, list[bytes]] | None:
        """Cut the next batch from the head of the queue: (encoded batch, the entries in it)."""
        if not self._queue:
            return None
        entries: list[bytes] = []
        size = 0
        while self._queue:
            unit = self._queue[0]
            unit_size = sum(len(entry) for entry in unit)
            if entries and encoded_size(size + unit_size, len(entries) + len(unit)) > self.limits.batch_bytes_max:
                break
            self._queue.popleft()
            entries.extend(unit)
            size += unit_size
        self._queued_bytes -= size
        self._queued_entries -= len(entries)
        self._oldest_enqueued_microseconds = now_microseconds if self._queue else None
        return encode_batch(Batch(proposer_time_ms, checkpoint, tuple(entries))), entries

    def take_all(self) -> list[bytes]:
        """Empty the queue (this node stopped being the leader) and return what was in it."""
        entries = [entry for unit in self._queue for entry in unit]
        self._queue.clear()
        self._queued_entries = 0
        self._queued_bytes = 0
        self._oldest_enqueued_microseconds = None
        return entries
