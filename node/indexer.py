"""The thread that builds a node's entry-hash lookup index from the state's hash log, behind the apply, and
the check that compares what it built with the log."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb

from consensus.raft.adapter import full_disk_hint
from storage.entry_hashes import EntryHashIndex, IndexCheck, IndexDamaged, IndexSlotsExhausted, catch_up_entries_max
from storage.state import LedgerStore, StorageCorrupted

logger = logging.getLogger(__name__)

# With nothing applied, the thread still looks this often (a missed wake-up costs at most this much lag).
idle_check_seconds = 1.0
# The pause after an indexing transaction, so the next one gathers what the apply logged meanwhile: at
# 4,000 transfers/s, one transaction of about 2,000 inserts a half second shares the index's branch pages
# and one fsync among them, where one per applied batch wrote each of those pages again every few ms. The
# log scanned by a lookup stays under a second long.
index_interval_seconds = 2.0
# After a failed indexing transaction (a full disk, say), the pause before the next try.
retry_pause_seconds = 5.0
# The longest a clean stop waits for an indexing transaction in progress.
stop_wait_seconds = 30.0
# What a check maps of a node's state and index: address space only, so a running node can grow its files
# past what they held when the check began.
check_map_size_bytes = 1 << 40


class EntryHashIndexer:
    """Keeps the index caught up: woken after an apply, it indexes what the apply logged, in transactions of
    up to `catch_up_entries_max` pairs at most every `index_interval_seconds` while there is more. The lookups never wait for it (they scan the log past the index),
    so it runs at its own pace and a failure here slows lookups instead of stopping the ledger."""

    def __init__(
        self,
        index: EntryHashIndex,
        store: LedgerStore,
        *,
        indexed: Callable[[int, int, int, int], None],
        failed: Callable[[], None],
        fatal: Callable[[str], None],
    ) -> None:
        self._index = index
        self._store = store
        self._indexed = indexed  # (pairs indexed, index built through, runs, pairs its merges wrote)
        self._failed = failed
        self._fatal = fatal
        self._wake = threading.Event()
        self._stop_requested = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="entry-hash-indexer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Something was applied (any thread)."""
        self._wake.set()

    def close(self) -> None:
        self._stopping = True
        self._stop_requested.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(stop_wait_seconds)

    def _run(self) -> None:
        pause = 0.0
        while not self._stopping:
            if pause:
                # Applies keep waking the thread; a pause waits out the interval whatever they say.
                self._stop_requested.wait(pause)
            else:
                self._wake.wait(idle_check_seconds)
            self._wake.clear()
            pause = 0.0
            try:
                merged_before = self._index.pairs_merged
                pairs = self._index.catch_up(self._store, catch_up_entries_max)
                merged = self._index.pairs_merged - merged_before
                indexed_through = self._index.indexed_through()
                runs = len(self._index.runs())
                if pairs:
                    logger.debug("entry-hash index: %d pairs, now through index %d, %d runs, %d pairs merged",
                                 pairs, indexed_through, runs, merged)
                self._indexed(pairs, indexed_through, runs, merged)
                if 0 < pairs < catch_up_entries_max:
                    pause = index_interval_seconds  # caught up: let the next transaction gather more
            except (lmdb.Error, IndexSlotsExhausted, IndexDamaged) as error:
                # The index's own trouble (IndexDamaged before its base class): derived data, so the ledger goes
                # on, lookups fail and say so, and the errors counter alerts.
                self._failed()
                hint = full_disk_hint(self._index.path, error, remedy="free space; indexing resumes on its own")
                logger.error("entry-hash indexing failed, retrying in %.0f s: %s%s", retry_pause_seconds, error, hint)
                pause = retry_pause_seconds
            except StorageCorrupted as error:
                # The log is part of the replicated state: a damaged record there is a damaged state.
                self._fatal(f"entry-hash indexer: {error}")
                return


def check_index(data_dir: Path) -> IndexCheck:
    """A node's entry-hash index against its state's log, both opened read-only from `data_dir`. Safe beside
    the running node: LMDB registers the check's readers, and each side is read from one snapshot."""
    index = EntryHashIndex(data_dir / "entry_hashes", map_size_bytes=check_map_size_bytes, readonly=True)
    try:
        store = LedgerStore(data_dir / "state", map_size_bytes=check_map_size_bytes, readonly=True)
        try:
            return index.check(store)
        finally:
            store.close()
    finally:
        index.close()


def index_check_document(found: IndexCheck) -> dict[str, Any]:
    return {
        "consistent": found.consistent,
        "indexed_through": found.indexed_through,
        "applied_index": found.applied_index,
        "logged_pairs": found.logged_pairs,
        "indexed_pairs": found.indexed_pairs,
        "missing_pairs": found.missing_pairs,
        "missing_examples": [pair.hex() for pair in found.missing_examples],
        "other_network": found.other_network,
    }
