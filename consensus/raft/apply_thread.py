"""Committed Raft entries applied in order on a thread of their own, fed through a bounded queue.

pysyncobj applies committed entries on its tick thread, between counting acknowledgements and sending the next
append_entries: while a batch is applied (its transfers, then LMDB's fsync) the leader sends nothing and a
follower reads nothing, so every batch waits for the apply of the one before it. Handing committed entries to
this thread lets the tick thread go on replicating while the previous batch is applied, and lets the journal's
fsync and LMDB's fsync (both release the GIL) overlap. The queue is bounded: when the apply falls
`queue_entries_max` entries behind, the tick thread waits, so replication never runs unboundedly ahead of the
state. Entries that are already waiting when the thread takes its next one are applied with it, in one LMDB
transaction (group commit): a node that falls behind pays one commit and its fsyncs per group, not per entry.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger("tonle.raft")

# Committed entries (batches) handed to the apply and not yet applied. At most one batch is about 1 MiB, so the
# queue holds at most this many MiB of commands; the readiness check (node/server.py apply_lag_entries_max)
# allows the same lag.
apply_queue_entries_max = 64
# How often a blocked producer or a drain looks again whether the apply thread is still alive.
liveness_poll_seconds = 0.5


@dataclass(frozen=True, slots=True)
class Grouping:
    """How an apply takes waiting entries: with the next one, up to `entries_max` in one transaction, once at
    least `backlog_entries_min` wait behind it, and no more once the group holds `command_bytes_max` bytes of
    commands (so a group ends at most one entry past that bound)."""

    entries_max: int
    backlog_entries_min: int
    command_bytes_max: int = 0  # 0: entries alone bound a group

    def __post_init__(self) -> None:
        if self.entries_max < 1 or self.backlog_entries_min < 1:
            raise ValueError(f"a grouping needs entries_max and backlog_entries_min of at least 1, not {self}")
        if self.command_bytes_max < 0:
            raise ValueError(f"a grouping's command_bytes_max cannot be negative, not {self}")


# What one apply transaction may hold, in bytes of commands. LMDB copies every page a transaction changes into
# a page of heap and, after the commit, keeps those pages for the next transactions: its list of free dirty
# pages is only given back when the environment closes. So the node's heap keeps the most pages one
# transaction ever changed, and with a large state that is two account pages (8 KiB) a transfer: a group of 8
# full 48 KiB batches (about 2,100 transfers of 184 bytes) left 20.6 MiB of heap at 1 million accounts, two
# 5.3 MiB (README, "Memory under a limit"): memory the page cache lacked under a 300 MB limit. 96 KiB is two
# full batches.
group_command_bytes_max = 96 * 1024
# A follower's apply only has to keep up: it groups whatever waits, up to 8 batches and the bytes above. A
# commit's fsyncs cost 0.3-3.4 ms on the bench machine's disk (p50-p90), applying two full batches 30-75 ms,
# so the smaller groups cost a catching-up follower a few percent.
follower_grouping = Grouping(entries_max=8, backlog_entries_min=1, command_bytes_max=group_command_bytes_max)
# The leader's apply answers the clients, and a group holds its first batch's replies until the last batch in
# it is applied: the leader groups only when it has fallen behind (3 waiting), and at most 3 batches, so a
# reply waits for at most two more applies. Larger groups or smaller backlogs put p99 at 50 % load past
# 50 ms (measured in README, Performance).
leader_grouping = Grouping(entries_max=3, backlog_entries_min=3, command_bytes_max=group_command_bytes_max)


class ApplyStopped(RuntimeError):
    """The apply thread is gone (its apply raised, or it was stopped): nothing more will be applied."""


class ApplyThread:
    """One consumer thread applying `(index, command)` pairs in the order they were handed over.

    `apply` runs only on this thread and takes a group, in order, to be applied in one transaction: the next
    entry, and those queued behind it as `grouping` allows. If it raises, the thread records the error and
    stops taking entries; every later `hand`, `drain` or `wait_until` raises ApplyStopped instead of waiting
    forever. The caller's `apply` is expected to stop the process on failure first (RaftNode._apply calls the
    node's fatal handler).
    """

    def __init__(self, apply: Callable[[list[tuple[int, bytes]]], None], *,
                 queue_entries_max: int = apply_queue_entries_max, grouping: Grouping = follower_grouping,
                 name: str = "tonle-apply") -> None:
        if queue_entries_max < 1:
            raise ValueError("queue_entries_max must be at least 1")
        self._apply = apply
        # Replaced while the thread runs when the node's role changes (tick thread; one reference store).
        self.grouping = grouping
        self._queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue(maxsize=queue_entries_max)
        self._condition = threading.Condition()
        self._unfinished = 0  # handed over and not yet applied
        self._last_applied_index = 0
        self._failure: BaseException | None = None
        self._stopping = False
        # (index, function) to call once that index is applied; at most one per entry handed over.
        self._after_applied: list[tuple[int, Callable[[], None]]] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def last_applied_index(self) -> int:
        """The index of the last entry this thread finished applying (0 before the first)."""
        return self._last_applied_index

    def hand(self, index: int, command: bytes) -> None:
        """Queue a committed entry. Blocks while the queue is full; raises ApplyStopped if the thread is gone."""
        with self._condition:
            self._raise_if_stopped()
            self._unfinished += 1
        while True:
            try:
                self._queue.put((index, command), timeout=liveness_poll_seconds)
                return
            except queue.Full:
                with self._condition:
                    if self._failure is not None or self._stopping or not self._thread.is_alive():
                        self._unfinished -= 1
                        self._raise_if_stopped()

    def after_applied(self, index: int, function: Callable[[], None]) -> None:
        """Call `function` (on the apply thread, or here if already done) once `index` is applied. Never called
        if the thread stops first: callers must not depend on it for correctness."""
        with self._condition:
            if self._last_applied_index < index:
                self._after_applied.append((index, function))
                return
        function()

    def drain(self) -> None:
        """Wait until every entry handed over so far is applied (snapshots must cover the applied state)."""
        with self._condition:
            while self._unfinished:
                if self._failure is not None or not self._thread.is_alive():
                    self._raise_if_stopped()
                self._condition.wait(liveness_poll_seconds)

    def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until `condition()` holds, looking again after every apply (a snapshot waits for its index)."""
        with self._condition:
            while not condition():
                if self._failure is not None or not self._thread.is_alive():
                    self._raise_if_stopped()
                self._condition.wait(liveness_poll_seconds)

    def stop(self, timeout_seconds: float) -> bool:
        """Apply what is queued, then end the thread. False if it did not end within `timeout_seconds`."""
        with self._condition:
            self._stopping = True
        if self._thread.is_alive():
            try:
                self._queue.put(None, timeout=timeout_seconds)
            except queue.Full:
                return False
        self._thread.join(timeout_seconds)
        return not self._thread.is_alive()

    def _raise_if_stopped(self) -> None:
        if self._failure is not None:
            raise ApplyStopped(f"the apply thread stopped: {self._failure!r}") from self._failure
        if self._stopping:
            raise ApplyStopped("the apply thread is stopping")
        if not self._thread.is_alive():
            raise ApplyStopped("the apply thread is not running")

    def _take_group(self) -> tuple[list[tuple[int, bytes]], bool]:
        """The next entry and those already queued behind it (up to the group bound); True once stop was asked."""
        item = self._queue.get()
        if item is None:
            return [], True
        group = [item]
        grouping = self.grouping
        if self._queue.qsize() < grouping.backlog_entries_min:
            return group, False
        group_bytes = len(item[1])
        while len(group) < grouping.entries_max and not (0 < grouping.command_bytes_max <= group_bytes):
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return group, True
            group.append(item)
            group_bytes += len(item[1])
        return group, False

    def _run(self) -> None:
        while True:
            group, stopping = self._take_group()
            if group:
                try:
                    self._apply(group)
                except BaseException as error:  # noqa: BLE001 - recorded so producers stop waiting, then the thread ends
                    with self._condition:
                        self._failure = error
                        self._condition.notify_all()
                    return
                self._applied(group[-1][0], len(group))
            if stopping:
                return

    def _applied(self, index: int, entries: int) -> None:
        with self._condition:
            self._unfinished -= entries
            self._last_applied_index = index
            self._condition.notify_all()
            due = [function for at, function in self._after_applied if at <= index]
            if due:
                self._after_applied = [(at, function) for at, function in self._after_applied if at > index]
        for function in due:
            try:
                function()
            except Exception:  # noqa: BLE001 - advisory callbacks must not stop the apply
                logger.exception("a callback waiting for index %d failed", index)
