"""Signature verification in a thread pool, done once per entry per node, and the accounts' pages read, ahead of the apply."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from consensus.batch import BatchError, decode_batch
from consensus.entries import Body, EntryError, SignedEntry, decode_entry, signature_is_valid

# Verified entries are remembered by a digest of their full bytes (never by signature alone: a cached
# signature paired with another body must not pass) until the apply uses the verification, so the cache
# holds the entries between intake and apply: the proposer queue's (20,000 by default) and the batches in
# flight. Bounded so memory stays flat whatever is never applied (an entry refused after intake, a leader
# that lost its term); one dropped early is verified again at apply. At about 150 bytes an entry, 10 MiB.
verified_cache_entries_max = 1 << 16
pending_batches_max = 4096
# Entries decoded on intake or as their batch arrived, kept (bounded) until the apply takes them, so the
# apply does not decode them again. A few batches' worth: the apply runs at most a few batches behind.
decoded_cache_entries_max = 1 << 14
verification_chunk_entries = 64
# An intake request of at most this many entries is verified on the caller's thread (the event loop) when no
# verification is under way: handing one signature to a pool thread and its result back costs two thread
# wake-ups, about 0.3 ms on the 2-core test machine (tonle_commit_signature_verification_seconds), four times
# the check itself, and libsodium lets go of the GIL while it checks. Under load the pool is busy, and every
# request goes to it as before. At most one check in `inline_interval_seconds_min` is done so: a burst of
# one-entry requests (many clients at once) must not line up behind the event loop while the pool's threads
# sit idle, and the loop spends at most about a tenth of its time on them.
inline_entries_max = 1
inline_interval_seconds_min = 0.001
digest_bytes = 16
# A follower verifies a batch that arrives from the leader on a pool thread, ahead of the apply, only from this
# size on (about six transfers). A smaller one is left to the apply, which decodes it, checks its few
# signatures and reads their accounts itself: handing it to a pool thread, and from there to the read-ahead
# thread, cost the follower more than the checks (two thread wake-ups, a future, two caches to fill and empty),
# and at the load that makes such batches (one transfer in flight, a network's usual traffic) the apply thread
# is idle. Measured with both versions running side by side at one transfer in flight, so that the machine's
# drift hit both alike: the nodes' CPU per transfer fell by 7-10 % in four pairs (README, Performance).
prefetch_batch_bytes_min = 1024
# Read-aheads (one intake request's or one arriving batch's accounts) queued for the read-ahead thread, at
# most. One that finds the queue full is dropped, and the apply reads those pages itself: a read-ahead only
# moves disk waits off the apply's thread, so losing one costs time, never a result.
read_aheads_pending_max = 64
_missing = object()
logger = logging.getLogger("tonle.verifier")


def entry_digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=digest_bytes).digest()


class SignatureVerifier:
    """PyNaCl releases the GIL, so verification in threads runs beside the tick thread and the loop.

    The leader verifies entries on intake; followers start verifying a batch as soon as it arrives in an
    append_entries message, so by the time it commits the apply finds every signature already checked. A batch
    of a few entries is the exception: the apply checks those itself (`prefetch_batch_bytes_min`).
    """

    def __init__(
        self,
        threads: int,
        count_verified: Callable[[int], None] = lambda count: None,
        read_ahead: Callable[[list[Body]], object] | None = None,
        count_dropped_read_ahead: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._count_verified = count_verified
        self._count_dropped_read_ahead = count_dropped_read_ahead
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="verify")
        # A thread of its own, so that a read-ahead waiting on the disk never holds up a verification.
        self._read_ahead = read_ahead
        self._read_ahead_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
        self._read_aheads_pending = 0
        self._lock = threading.Lock()
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._pending_batches: OrderedDict[bytes, Future[None]] = OrderedDict()
        self._decoded: OrderedDict[bytes, tuple[SignedEntry, Body]] = OrderedDict()
        self.cache_hits = 0
        # Verifications handed to the pool and not finished (its own lock: a done-callback may run inside
        # `prefetch`, which holds `_lock`).
        self._under_way = 0
        self._under_way_lock = threading.Lock()
        self._clock = clock
        self._last_inline_seconds = float("-inf")  # no check done inline yet

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        # Waits for a read-ahead under way: it must not be inside LMDB when the node closes the store.
        self._read_ahead_executor.shutdown(wait=True, cancel_futures=True)

    @property
    def reads_ahead(self) -> bool:
        return self._read_ahead is not None

    def read_ahead(self, bodies: list[Body]) -> bool:
        """Start reading the pages of the accounts these entries name, for the apply that will read them
        (returns at once; False when there is no read-ahead, nothing to read, or the queue is full)."""
        if self._read_ahead is None or not bodies:
            return False
        with self._lock:
            full = self._read_aheads_pending >= read_aheads_pending_max
            if not full:
                self._read_aheads_pending += 1
        if full:
            self._count_dropped_read_ahead()
            return False
        try:
            self._read_ahead_executor.submit(self._run_read_ahead, bodies)
        except RuntimeError:  # shut down: the node is stopping
            with self._lock:
                self._read_aheads_pending -= 1
            return False
        return True

    def _run_read_ahead(self, bodies: list[Body]) -> None:
        try:
            self._read_ahead(bodies)  # type: ignore[misc]
        except Exception:
            # A read-ahead's failure changes nothing (the apply reads everything itself), but it is a bug.
            logger.exception("reading %d entries' accounts ahead failed", len(bodies))
        finally:
            with self._lock:
                self._read_aheads_pending -= 1

    def _remember(self, digests: list[bytes]) -> None:
        with self._lock:
            for digest in digests:
                self._verified[digest] = None
            while len(self._verified) > verified_cache_entries_max:
                self._verified.popitem(last=False)

    def _verify_chunk(self, entries: list[SignedEntry]) -> list[bool]:
        results = [signature_is_valid(entry) for entry in entries]
        self._remember([entry_digest(entry.raw) for entry, valid in zip(entries, results, strict=True) if valid])
        self._count_verified(len(entries))
        return results

    def remember_decoded(self, decoded: list[tuple[SignedEntry, Body]]) -> None:
        """Keep decodes for the apply, keyed by the entry's exact bytes (the oldest go first when full)."""
        with self._lock:
            for entry, body in decoded:
                self._decoded[entry.raw] = (entry, body)
            while len(self._decoded) > decoded_cache_entries_max:
                self._decoded.popitem(last=False)

    def take_decoded(self, raw: bytes) -> tuple[SignedEntry, Body] | None:
        """The apply's lookup: an entry is applied once per node, so its decode is dropped as it is taken."""
        with self._lock:
            return self._decoded.pop(raw, None)

    def _finished(self, _future: Future | None = None) -> None:
        with self._under_way_lock:
            self._under_way -= 1

    def _submit(self, function: Callable, argument: object) -> Future:
        """Hand work to the pool, counted as under way until it is done."""
        with self._under_way_lock:
            self._under_way += 1
        try:
            future = self._executor.submit(function, argument)
        except BaseException:
            self._finished()
            raise
        future.add_done_callback(self._finished)
        return future

    def verify_now_if_idle(self, entries: list[SignedEntry]) -> list[bool] | None:
        """Intake: the results of a request of at most `inline_entries_max` entries, verified on this thread
        while the pool has nothing under way and none was verified so within `inline_interval_seconds_min`;
        None otherwise (use verify_many)."""
        if len(entries) > inline_entries_max:
            return None
        with self._under_way_lock:
            if self._under_way:
                return None
        now = self._clock()
        if now - self._last_inline_seconds < inline_interval_seconds_min:
            return None
        self._last_inline_seconds = now
        return self._verify_chunk(entries)

    def verify_many(self, entries: list[SignedEntry]) -> list[Future[list[bool]]]:
        """Intake: verify in chunks across the pool; the futures' results are in `entries` order."""
        return [
            self._submit(self._verify_chunk, entries[start : start + verification_chunk_entries])
            for start in range(0, len(entries), verification_chunk_entries)
        ]

    def prefetch(self, batch_bytes: bytes) -> None:
        """Follower: start verifying a batch that just arrived from the leader (tick thread; returns at once).
        A batch below `prefetch_batch_bytes_min` is left to the apply (`is_valid` checks what is not cached)."""
        if len(batch_bytes) < prefetch_batch_bytes_min:
            return
        key = entry_digest(batch_bytes)
        with self._lock:
            if key in self._pending_batches:
                return
            future = self._submit(self._verify_batch, batch_bytes)
            self._pending_batches[key] = future
            while len(self._pending_batches) > pending_batches_max:
                self._pending_batches.popitem(last=False)

    def _verify_batch(self, batch_bytes: bytes) -> None:
        try:
            raws = decode_batch(batch_bytes).entries
        except BatchError:
            return
        unverified = set()
        with self._lock:
            for raw in raws:
                if entry_digest(raw) not in self._verified:
                    unverified.add(raw)
        entries = []
        decoded = []
        for raw in raws:
            try:
                entry = decode_entry(raw)
                decoded.append((entry, entry.body()))
            except EntryError:
                continue
            if raw in unverified:
                entries.append(entry)
        self.remember_decoded(decoded)
        # An entry this node verified already came in through its own client API, which read its accounts
        # ahead then (a follower that took the request and forwarded it): reading them again is only CPU.
        self.read_ahead([body for entry, body in decoded if entry.raw in unverified])
        if entries:
            self._verify_chunk(entries)

    def wait_for_batch(self, batch_bytes: bytes) -> None:
        """Apply: wait for the prefetch of this batch, if one was started, before its entries are checked."""
        with self._lock:
            future = self._pending_batches.pop(entry_digest(batch_bytes), None)
        if future is not None:
            future.result()

    def is_valid(self, entry: SignedEntry) -> bool:
        """The apply's check: answered from the cache when this node verified the entry already. An entry is
        applied once per node, so the verification is used up as it is taken (kept, 262,144 of them filled
        50 MiB of a node's heap within a minute of load)."""
        digest = entry_digest(entry.raw)
        with self._lock:
            if self._verified.pop(digest, _missing) is not _missing:
                self.cache_hits += 1
                return True
        # Not remembered: this check is the apply's, the one use a verification has.
        valid = signature_is_valid(entry)
        self._count_verified(1)
        return valid
