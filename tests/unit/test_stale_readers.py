"""Readers of the state seen from the node: how far behind the oldest reads, and the slots of readers that
died inside a read transaction freed, so the data file stops growing."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from storage.entry_hashes import EntryHashIndex
from storage.state import LedgerStore, ReaderTable, clear_stale_readers, reader_table

repository_root = Path(__file__).resolve().parents[2]
map_size_bytes = 64 << 20
reader_start_seconds_max = 30.0
# Commits that each free as many pages as they write: with reuse the file stops growing after a few.
churn_commits = 300

# A `tonle export --data-dir` beside the node, as far as LMDB sees it: a read-only environment opened as the
# node's stores open theirs, in another process, inside a read transaction when it is killed.
_reader = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from storage.state import open_environment
    environment = open_environment(Path(sys.argv[1]), map_size_bytes=int(sys.argv[2]), sync=False, metasync=False,
                                   databases_max=128, readonly=True)
    transaction = environment.begin()
    transaction.get(b"watched")
    print("reading", flush=True)
    time.sleep(600)
    """
)


def leave_a_dead_reader(path: Path, map_size: int) -> None:
    """Run the reader above on the environment at `path` and kill it inside its read transaction."""
    reader = subprocess.Popen(
        [sys.executable, "-c", _reader, str(path), str(map_size)], cwd=repository_root, stdout=subprocess.PIPE, text=True,
    )
    try:
        ready, _, _ = select.select([reader.stdout], [], [], reader_start_seconds_max)
        line = reader.stdout.readline() if ready else ""
        assert line == "reading\n", f"the reader did not start within {reader_start_seconds_max} s: {line!r}"
    finally:
        os.kill(reader.pid, signal.SIGKILL)
        reader.wait(timeout=reader_start_seconds_max)
        reader.stdout.close()


def churn(store: LedgerStore, commits: int) -> None:
    for round in range(commits):
        with store.write() as transaction:
            for number in range(20):
                transaction.put("meta", b"filler-%d" % number, bytes([round % 251]) * 1_000)


def test_the_reader_table_is_read_from_lmdb_s_listing() -> None:
    listing = "    pid     thread     txnid\n      2401 7f34be80bb80 17\n      2402 7f34be80bb81 -\n      2403 7f34be80bb82 12\n"
    assert reader_table(listing, 20) == ReaderTable(open=2, oldest_lag_transactions=8)
    assert reader_table("(no active readers)\n", 20) == ReaderTable(open=0, oldest_lag_transactions=0)
    assert reader_table("    pid     thread     txnid\n      2401 7f34be80bb80 -\n", 20) == ReaderTable(open=0, oldest_lag_transactions=0)
    with pytest.raises(ValueError, match="reader table"):
        reader_table("    pid     thread     txnid\n      2401 7f34be80bb80 x1\n", 20)


def test_the_oldest_reader_s_lag_counts_the_commits_since_its_snapshot_and_ends_with_it(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "state", map_size_bytes=map_size_bytes, sync=False)
    try:
        churn(store, 1)
        assert store.readers() == ReaderTable(open=0, oldest_lag_transactions=0)
        held = store.read()
        churn(store, 5)
        with store.read():
            assert store.readers() == ReaderTable(open=2, oldest_lag_transactions=5)
        held.abort()
        assert store.readers() == ReaderTable(open=0, oldest_lag_transactions=0)
    finally:
        store.close()


def test_a_reader_killed_inside_its_transaction_stops_page_reuse_until_its_slot_is_freed(tmp_path: Path) -> None:
    path = tmp_path / "state"
    store = LedgerStore(path, map_size_bytes=map_size_bytes, sync=False)
    try:
        churn(store, 10)
        leave_a_dead_reader(path, map_size_bytes)
        # Dead, its slot still holds its snapshot: nothing freed since is reused, the file grows every commit.
        size_before = store.used_bytes()
        churn(store, churn_commits)
        grown = store.used_bytes() - size_before
        assert store.readers().open == 1
        assert store.readers().oldest_lag_transactions == churn_commits
        assert grown > churn_commits * 20 * 1_000
        assert store.clear_stale_readers() == 1
        assert store.clear_stale_readers() == 0
        assert store.readers() == ReaderTable(open=0, oldest_lag_transactions=0)
        # Freed, pages are reused again: the same churn grows the file by a small part of what it did.
        size_before = store.used_bytes()
        churn(store, churn_commits)
        assert store.used_bytes() - size_before < grown / 10
    finally:
        store.close()


def test_a_dead_reader_of_the_entry_hash_index_is_freed_the_same_way(tmp_path: Path) -> None:
    index = EntryHashIndex(tmp_path / "entry_hashes", map_size_bytes=map_size_bytes, sync=False)
    try:
        leave_a_dead_reader(index.path, map_size_bytes)
        assert clear_stale_readers(index.environment) == 1
        assert clear_stale_readers(index.environment) == 0
    finally:
        index.close()
