"""Group commit: a bounded queue of verified entries cut into batches by bytes and by waiting time."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from consensus.batch import Batch, Checkpoint, batch_bytes_max, encode_batch, encoded_size


@dataclass(frozen=True, slots=True)
class ProposerLimits:
    batch_bytes_max: int = batch_bytes_max
    queue_entries_max: int = 20_000
    batch_delay_microseconds: int = 1_000


class Proposer:
    """Pure batching state: callers supply the time; the node's event loop drives it.

    A batch closes when the next entry would not fit in `batch_bytes_max`, or when the oldest queued entry
    has waited `batch_delay_microseconds`. When nothing is in flight the caller flushes at once, so one
    transfer alone is never delayed by the window: the window only ever groups entries under load.
    """

    def __init__(self, limits: ProposerLimits) -> None:
        if limits.batch_bytes_max > batch_bytes_max:
            raise ValueError(f"batch_bytes_max {limits.batch_bytes_max} exceeds the format's {batch_bytes_max}")
        self.limits = limits
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._oldest_enqueued_microseconds: int | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def offer(self, entries: list[bytes], now_microseconds: int) -> bool:
        """Queue all of `entries` or none of them. False means the queue is full: the caller answers busy."""
        if len(self._queue) + len(entries) > self.limits.queue_entries_max:
            return False
        if not self._queue and entries:
            self._oldest_enqueued_microseconds = now_microseconds
        self._queue.extend(entries)
        self._queued_bytes += sum(len(entry) for entry in entries)
        return True

    def due_microseconds(self) -> int | None:
        """When the current window closes, or None if nothing is queued."""
        if self._oldest_enqueued_microseconds is None:
            return None
        return self._oldest_enqueued_microseconds + self.limits.batch_delay_microseconds

    def has_full_batch(self) -> bool:
        """True when the queue holds more than one batch can carry, so a batch would close by size."""
        return encoded_size(self._queued_bytes, len(self._queue)) > self.limits.batch_bytes_max

    def take_batch(
        self, proposer_time_ms: int, checkpoint: Checkpoint | None, now_microseconds: int
    ) -> tuple[bytes, list[bytes]] | None:
        """Cut the next batch from the head of the queue: (encoded batch, the entries in it)."""
        if not self._queue:
            return None
        entries: list[bytes] = []
        size = 0
        while self._queue:
            entry = self._queue[0]
            if entries and encoded_size(size + len(entry), len(entries) + 1) > self.limits.batch_bytes_max:
                break
            entries.append(self._queue.popleft())
            size += len(entry)
        self._queued_bytes -= size
        self._oldest_enqueued_microseconds = now_microseconds if self._queue else None
        return encode_batch(Batch(proposer_time_ms, checkpoint, tuple(entries))), entries

    def take_all(self) -> list[bytes]:
        """Empty the queue (this node stopped being the leader) and return what was in it."""
        entries = list(self._queue)
        self._queue.clear()
        self._queued_bytes = 0
        self._oldest_enqueued_microseconds = None
        return entries
