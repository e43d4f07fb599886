"""Lookup by entry hash: the apply's append-only hash log, the index built from it off the apply path, and
the lookups that combine the two, on real LMDB in temp dirs."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from consensus.entries import Issue, OpenAccount, Transfer, TransferFlags
from node import audit
from node.indexer import EntryHashIndexer
from storage import entry_hashes, queries
from storage.entry_hashes import (
    EntryHashIndex,
    EntryHashIndexBehind,
    catch_up_entries_max,
    lookup_scan_entries_max,
    pair_bytes,
    put_log,
    transfer_ids_with_hash_prefix,
)
from storage.state import StorageCorrupted
from tests.ledger_fixtures import Ledger, make_network, tid

deadline_seconds = 10.0


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    network = make_network()
    ledger = Ledger(tmp_path / "state", network)
    assert ledger.results(
        network.sign(OpenAccount("dara@acleda", "KHR", tier="full"), "acleda"),
        network.sign(Issue(tid(1), "settlement.khr@acleda", 10_000_000, "KHR"), "nbc"),
    ) == ["ok", "ok"]
    yield ledger
    ledger.store.close()


@pytest.fixture
def index(tmp_path: Path) -> Iterator[EntryHashIndex]:
    opened = EntryHashIndex(tmp_path / "entry_hashes", map_size_bytes=64 << 20)
    yield opened
    opened.close()


def pay(ledger: Ledger, number: int, amount: int = 100, flags: int = 0) -> bytes:
    return ledger.network.sign(Transfer(tid(number), "settlement.khr@acleda", "dara@acleda", amount, "KHR", flags=flags), "acleda")


def ids(ledger: Ledger, index: EntryHashIndex | None, prefix: bytes, limit: int = 100) -> list[bytes]:
    with ledger.store.read() as transaction:
        return transfer_ids_with_hash_prefix(transaction, index, prefix, limit)


def run_indexer_until_it_fails_once(index: EntryHashIndex, ledger: Ledger) -> None:
    """Start an indexer over `index`, wake it, and stop it once it has counted a failed indexing transaction."""
    failures = threading.Semaphore(0)
    indexer = EntryHashIndexer(index, ledger.store, indexed=lambda *_: None, failed=failures.release, fatal=pytest.fail)
    indexer.start()
    try:
        indexer.wake()
        assert failures.acquire(timeout=deadline_seconds)
    finally:
        indexer.close()


def logged_pairs(ledger: Ledger) -> list[bytes]:
    with ledger.store.read() as transaction:
        logged = b"".join(pairs for _key, pairs in transaction.items(entry_hashes.hash_log_database))
    return [logged[start : start + pair_bytes] for start in range(0, len(logged), pair_bytes)]


def test_a_transfer_is_found_by_its_full_hash_and_short_hash_as_soon_as_it_is_applied(ledger: Ledger, index: EntryHashIndex) -> None:
    entry = pay(ledger, 10)
    assert ledger.results(entry) == ["ok"]
    digest = hashlib.sha256(entry).digest()
    assert index.indexed_through() == 0  # nothing indexed: the lookup scans the log
    assert ids(ledger, index, digest) == [tid(10)]
    assert ids(ledger, index, digest[:4]) == [tid(10)]
    assert ids(ledger, None, digest) == [tid(10)]
    assert ids(ledger, index, bytes(byte ^ 0xFF for byte in digest)) == []


def test_catching_up_moves_the_index_to_the_applied_index_and_lookups_then_read_it(ledger: Ledger, index: EntryHashIndex) -> None:
    entries = [pay(ledger, number) for number in range(10, 20)]
    ledger.apply(*entries[:5])
    ledger.apply(*entries[5:])
    assert index.catch_up(ledger.store) == 11  # the issue and the ten payments
    assert index.indexed_through() == ledger.summary().applied_index
    assert index.catch_up(ledger.store) == 0
    for number, entry in zip(range(10, 20), entries, strict=True):
        digest = hashlib.sha256(entry).digest()
        found, indexed_through = index.ids_with_prefix(digest, 10)
        assert found == [tid(number)] and indexed_through == ledger.summary().applied_index
        assert ids(ledger, index, digest) == [tid(number)]
    # Applied after the index: found in the log past it.
    later = pay(ledger, 30)
    ledger.apply(later)
    assert ids(ledger, index, hashlib.sha256(later).digest()) == [tid(30)]


def test_an_entry_that_records_nothing_is_not_logged_and_a_failed_transfer_is(ledger: Ledger, index: EntryHashIndex) -> None:
    forged = ledger.network.sign(Transfer(tid(40), "settlement.khr@acleda", "dara@acleda", 1, "KHR"), "acleda", key=ledger.network.keys["aba"])
    overdraft = ledger.network.sign(Transfer(tid(41), "dara@acleda", "settlement.khr@acleda", 10**12, "KHR"), "acleda")
    assert ledger.results(forged, overdraft) == ["signer_key_not_authorized", "exceeds_credits"]
    assert ids(ledger, index, hashlib.sha256(forged).digest()) == []
    # A failed transfer's outcome is pinned under its id, and the hash finds it like any other.
    assert ids(ledger, index, hashlib.sha256(overdraft).digest()) == [tid(41)]
    # A replay records nothing new: no second pair for the same transfer.
    ledger.apply(overdraft)
    assert [pair[32:] for pair in logged_pairs(ledger)].count(tid(41)) == 1


def test_a_linked_chain_that_fails_logs_each_member_once(ledger: Ledger) -> None:
    first = pay(ledger, 50, flags=TransferFlags.LINKED)
    second = ledger.network.sign(Transfer(tid(51), "dara@acleda", "settlement.khr@acleda", 10**12, "KHR"), "acleda")
    results = ledger.results(first, second)
    assert results[1] == "exceeds_credits" and results[0] == "linked_event_failed"
    logged_ids = [pair[32:] for pair in logged_pairs(ledger)]
    assert logged_ids.count(tid(50)) == 1 and logged_ids.count(tid(51)) == 1
    for entry, number in ((first, 50), (second, 51)):
        assert ids(ledger, None, hashlib.sha256(entry).digest()) == [tid(number)]


def test_catch_up_stops_after_the_log_record_that_reaches_its_entries_max(ledger: Ledger, index: EntryHashIndex) -> None:
    funded_index = ledger.summary().applied_index  # one pair: the fixture's issue
    ledger.apply(*[pay(ledger, number) for number in range(100, 104)])
    second_index = ledger.summary().applied_index
    ledger.apply(*[pay(ledger, number) for number in range(104, 108)])
    assert funded_index < second_index < ledger.summary().applied_index
    # A record is indexed whole: 1 + 4 pairs reach 3 at the second record.
    assert index.catch_up(ledger.store, entries_max=3) == 5
    assert index.indexed_through() == second_index
    assert index.catch_up(ledger.store, entries_max=3) == 4
    assert index.indexed_through() == ledger.summary().applied_index
    assert index.catch_up(ledger.store, entries_max=3) == 0


def test_a_lookup_past_an_index_more_than_its_scan_limit_behind_says_the_index_is_rebuilding(ledger: Ledger, index: EntryHashIndex) -> None:
    # Log records written directly (the apply would take minutes for this many transfers).
    summary = ledger.summary()
    per_record = 4096
    records = lookup_scan_entries_max // per_record + 1
    with ledger.store.write() as transaction:
        for number in range(records):
            pairs = b"".join(hashlib.sha256(b"%d-%d" % (number, position)).digest() + tid(position) for position in range(per_record))
            put_log(transaction, summary.applied_index + 1 + number, pairs)
        transaction.set_applied_index(summary.applied_index + records)
    assert records * per_record > lookup_scan_entries_max
    with pytest.raises(EntryHashIndexBehind) as behind:
        ids(ledger, index, b"\x00\x01")
    assert behind.value.indexed_through == 0 and behind.value.applied_index == summary.applied_index + records
    while index.catch_up(ledger.store):
        pass
    wanted = hashlib.sha256(b"7-99").digest()
    assert ids(ledger, index, wanted) == [tid(99)]


def indexed_ahead(tmp_path: Path, network, index: EntryHashIndex) -> None:
    """Index a state two issues long, then close it: the index now stands ahead of any shorter state."""
    ahead = Ledger(tmp_path / "ahead", network)
    ahead.apply(network.sign(Issue(tid(1), "settlement.khr@acleda", 1000, "KHR"), "nbc"))
    ahead.apply(network.sign(Issue(tid(2), "settlement.khr@acleda", 1000, "KHR"), "nbc"))
    index.catch_up(ahead.store)
    assert index.check(ahead.store).consistent
    ahead.store.close()


def test_an_index_ahead_of_the_state_is_dropped_and_built_again(tmp_path: Path, index: EntryHashIndex) -> None:
    network = make_network()
    indexed_ahead(tmp_path, network, index)
    behind = Ledger(tmp_path / "behind", network)
    issue = network.sign(Issue(tid(3), "settlement.khr@acleda", 5, "KHR"), "nbc")
    behind.apply(issue)
    assert index.indexed_through() > behind.summary().applied_index
    assert index.catch_up(behind.store) == 1
    assert index.indexed_through() == behind.summary().applied_index
    assert index.ids_with_prefix(b"", 10)[0] == [tid(3)]
    behind.store.close()


def test_an_index_entry_naming_a_transfer_of_another_hash_stops_the_lookup(ledger: Ledger, index: EntryHashIndex) -> None:
    entry = pay(ledger, 60)
    ledger.apply(entry)
    index.catch_up(ledger.store)
    wrong = b"\xab" * 32
    hashes = index.slot_database(index.runs()[0].slot)
    with index.environment.begin(write=True) as transaction:
        transaction.put(wrong + tid(60), b"", db=hashes)
    with ledger.store.read() as transaction, pytest.raises(StorageCorrupted, match="entry-hash index"):
        queries.transfers_with_hash(transaction, index, wrong, 10)
    with ledger.store.read() as transaction:
        assert [found["id"] for found in queries.transfers_with_hash(transaction, index, hashlib.sha256(entry).digest(), 10)] == [tid(60)]


def test_the_indexer_thread_follows_the_apply_and_reports_what_it_indexed(ledger: Ledger, index: EntryHashIndex) -> None:
    reports: list[tuple[int, int, int, int]] = []
    indexer = EntryHashIndexer(index, ledger.store, indexed=lambda *report: reports.append(report), failed=lambda: None, fatal=pytest.fail)
    indexer.start()
    try:
        for number in range(70, 75):
            ledger.apply(pay(ledger, number))
            indexer.wake()
        deadline = time.monotonic() + deadline_seconds
        while index.indexed_through() != ledger.summary().applied_index:
            assert time.monotonic() < deadline, f"index at {index.indexed_through()}, applied {ledger.summary().applied_index}"
            time.sleep(0.01)
    finally:
        indexer.close()
    assert sum(pairs for pairs, _through, _runs, _merged in reports) == 6  # the fixture's issue and five payments
    assert reports[-1][1] == ledger.summary().applied_index and reports[-1][2] == len(index.runs()) > 0
    assert sum(merged for _pairs, _through, _runs, merged in reports) == index.pairs_merged


def test_the_indexer_counts_a_failed_transaction_and_keeps_running(ledger: Ledger, tmp_path: Path) -> None:
    # A map too small for the index: every indexing transaction fails with MapFullError, as on a full disk.
    tiny = EntryHashIndex(tmp_path / "tiny", map_size_bytes=64 << 10)
    for start in range(1000, 3000, 250):
        ledger.apply(*[pay(ledger, number) for number in range(start, start + 250)])
    failures = threading.Semaphore(0)
    indexer = EntryHashIndexer(tiny, ledger.store, indexed=lambda *_: None, failed=failures.release, fatal=pytest.fail)
    with pytest.raises(lmdb.MapFullError):
        tiny.catch_up(ledger.store)
    indexer.start()
    try:
        indexer.wake()
        assert failures.acquire(timeout=deadline_seconds)
        assert tiny.indexed_through() == 0
        # Lookups still answer, from the log.
        assert ids(ledger, tiny, hashlib.sha256(pay(ledger, 1500)).digest()) == [tid(1500)]
    finally:
        indexer.close()
        tiny.close()


def test_an_indexing_io_error_on_a_full_file_system_is_logged_as_a_full_disk(
    ledger: Ledger, index: EntryHashIndex, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """LMDB reports a write a full disk cut short as EIO; the indexer's log line says what it most likely is."""
    from consensus.raft import adapter

    class FullFileSystem:
        f_frsize = 4096
        f_bavail = 0

    def cut_short(*_arguments, **_options) -> int:
        raise lmdb.Error("mdb_txn_commit: Input/output error")

    monkeypatch.setattr(adapter.os, "statvfs", lambda path: FullFileSystem)
    monkeypatch.setattr(index, "catch_up", cut_short)
    ledger.apply(pay(ledger, 4000))
    with caplog.at_level("ERROR", logger="node.indexer"):
        run_indexer_until_it_fails_once(index, ledger)
    line = next(record.getMessage() for record in caplog.records if "indexing failed" in record.getMessage())
    assert "Input/output error" in line and "No space left on device" in line and "resumes on its own" in line


def test_catch_up_entries_max_is_a_transaction_size_not_a_cap_on_what_is_indexed(ledger: Ledger, index: EntryHashIndex) -> None:
    ledger.apply(*[pay(ledger, number) for number in range(2000, 2010)])
    ledger.apply(*[pay(ledger, number) for number in range(2010, 2020)])
    total = 0
    while pairs := index.catch_up(ledger.store, entries_max=10):
        total += pairs
    assert total == 21 and index.indexed_through() == ledger.summary().applied_index


def test_one_catch_up_takes_whole_log_records_until_it_has_passed_catch_up_entries_max(ledger: Ledger, index: EntryHashIndex) -> None:
    applied = ledger.summary().applied_index
    per_record = 8192
    with ledger.store.write() as transaction:
        for number in range(4):
            pairs = b"".join(hashlib.sha256(b"%d-%d" % (number, position)).digest() + tid(position) for position in range(per_record))
            put_log(transaction, applied + 1 + number, pairs)
        transaction.set_applied_index(applied + 4)
    assert 3 * per_record > catch_up_entries_max > 2 * per_record + 1
    # The fixture's issue (1 pair, an earlier record) and three of these reach the limit at the third.
    assert index.catch_up(ledger.store) == 1 + 3 * per_record
    assert index.indexed_through() == applied + 3
    assert index.catch_up(ledger.store) == per_record
    assert index.indexed_through() == applied + 4
    assert ids(ledger, index, hashlib.sha256(b"3-5").digest()) == [tid(5)]


def test_the_index_check_finds_a_caught_up_or_partly_built_index_consistent(ledger: Ledger, index: EntryHashIndex) -> None:
    ledger.apply(*[pay(ledger, number) for number in range(300, 305)])
    first_record = ledger.summary().applied_index
    ledger.apply(*[pay(ledger, number) for number in range(305, 308)])
    assert index.catch_up(ledger.store, entries_max=2) == 6  # the fixture's issue and the first record's five
    partly = index.check(ledger.store)
    assert partly.consistent and partly.indexed_through == first_record < partly.applied_index
    assert partly.logged_pairs == partly.indexed_pairs == 6
    index.catch_up(ledger.store)
    built = index.check(ledger.store)
    assert built.consistent and built.indexed_through == built.applied_index and built.indexed_pairs == 9


def test_the_index_check_names_a_logged_pair_missing_from_the_index_and_counts_an_extra_one(ledger: Ledger, index: EntryHashIndex) -> None:
    entry = pay(ledger, 310)
    ledger.apply(entry)
    index.catch_up(ledger.store)
    hashes = index.slot_database(index.runs()[0].slot)
    pair = hashlib.sha256(entry).digest() + tid(310)
    with index.environment.begin(write=True) as transaction:
        assert transaction.delete(pair, db=hashes)
    missing = index.check(ledger.store)
    assert not missing.consistent and missing.missing_pairs == 1 and missing.missing_examples == (pair,)
    with index.environment.begin(write=True) as transaction:
        transaction.put(pair, b"", db=hashes)
        transaction.put(b"\xab" * 32 + tid(311), b"", db=hashes)
    extra = index.check(ledger.store)
    assert not extra.consistent and extra.missing_pairs == 0 and extra.indexed_pairs == extra.logged_pairs + 1


def test_the_index_check_flags_an_index_ahead_of_the_state_or_of_another_network(tmp_path: Path, index: EntryHashIndex) -> None:
    network = make_network()
    indexed_ahead(tmp_path, network, index)
    behind = Ledger(tmp_path / "behind", network)
    behind.apply(network.sign(Issue(tid(3), "settlement.khr@acleda", 5, "KHR"), "nbc"))
    assert not index.check(behind.store).consistent
    other = Ledger(tmp_path / "other", make_network(network_id="tonle-other"))
    for number in range(4, 8):
        other.apply(other.network.sign(Issue(tid(number), "settlement.khr@acleda", 5, "KHR"), "nbc"))
    found = index.check(other.store)
    assert found.other_network and not found.consistent
    behind.store.close()
    other.store.close()


def test_tonle_index_check_reads_a_node_data_directory_and_fails_on_a_missing_pair(tmp_path: Path) -> None:
    network = make_network()
    data_dir = tmp_path / "data"
    ledger = Ledger(data_dir / "state", network)
    entry = network.sign(Issue(tid(320), "settlement.khr@acleda", 5, "KHR"), "nbc")
    ledger.apply(entry)
    index = EntryHashIndex(data_dir / "entry_hashes", map_size_bytes=64 << 20)
    index.catch_up(ledger.store)
    ledger.store.close()  # one process opens an LMDB environment once: the check opens its own handles
    index.close()

    def run() -> tuple[int, dict]:
        root = argparse.ArgumentParser(prog="tonle")
        audit.add_audit_commands(root.add_subparsers(dest="command", required=True))
        arguments = root.parse_args(["index-check", "--data-dir", str(data_dir)])
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            code = arguments.handler(arguments)
        return code, json.loads(output.getvalue())

    code, report = run()
    assert code == 0 and report["consistent"] and report["logged_pairs"] == report["indexed_pairs"] == 1
    reopened = EntryHashIndex(data_dir / "entry_hashes", map_size_bytes=64 << 20)
    hashes = reopened.slot_database(reopened.runs()[0].slot)
    with reopened.environment.begin(write=True) as transaction:
        assert transaction.delete(hashlib.sha256(entry).digest() + tid(320), db=hashes)
    reopened.close()
    code, report = run()
    assert code == 1 and not report["consistent"] and report["missing_pairs"] == 1
    assert report["missing_examples"] == [(hashlib.sha256(entry).digest() + tid(320)).hex()]
    with pytest.raises(FileNotFoundError, match="no entry-hash index"):
        EntryHashIndex(tmp_path / "nowhere", map_size_bytes=64 << 20, readonly=True)


# The index as sorted runs merged in the background --------------------------------------------------------


def logged_records(ledger: Ledger, records: int, per_record: int, seed: bytes = b"r") -> list[bytes]:
    """Log `records` records of synthetic pairs straight into the state (as the apply would) and return the pairs."""
    applied = ledger.summary().applied_index
    written: list[bytes] = []
    with ledger.store.write() as transaction:
        for number in range(records):
            pairs = [hashlib.sha256(seed + b"%d-%d" % (number, position)).digest() + tid(100_000 + number * per_record + position) for position in range(per_record)]
            put_log(transaction, applied + 1 + number, b"".join(pairs))
            written.extend(pairs)
        transaction.set_applied_index(applied + records)
    return written


@pytest.fixture
def small_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Levels of a few pairs and merges in ranges of a few, so a test sees many merges of many ranges."""
    monkeypatch.setattr(entry_hashes, "runs_per_level_max", 4)
    monkeypatch.setattr(entry_hashes, "merge_chunk_entries_max", 16)


def every_indexed_pair(index: EntryHashIndex) -> list[bytes]:
    with index.environment.begin() as transaction:
        return [key for run in index.runs() for key in transaction.cursor(db=index.slot_database(run.slot)).iternext(values=False)]


def test_runs_of_one_level_are_merged_so_runs_stay_few_and_every_pair_is_indexed_once(ledger: Ledger, index: EntryHashIndex, small_levels: None) -> None:
    pairs = logged_records(ledger, records=60, per_record=8)
    made = 0
    while index.catch_up(ledger.store, entries_max=8):
        made += 1
    while index.merges():  # finish what the last transactions' budget left under way
        index.merge(1)
    runs = index.runs()
    # 60 indexing transactions (the first takes the fixture's issue and a record), merged: under 4 runs a level.
    levels = [run.level for run in runs]
    assert made == 60 and all(levels.count(level) < 4 for level in levels) and len(runs) < 10
    assert any(run.entries >= 8 * 4 * 4 for run in runs)  # merged at least twice over
    indexed = every_indexed_pair(index)
    # Counted as written: a pair in a run of 32 or more was written again by each merge that took it up a
    # level (8 to 32, 32 to 128 here), and by no other.
    assert index.pairs_merged == sum(run.entries * sum(1 for size in (32, 128, 512) if run.entries >= size) for run in runs)
    assert sorted(indexed) == sorted(pairs + logged_pairs(ledger)[:1]) and len(set(indexed)) == len(indexed)
    assert index.check(ledger.store).consistent
    for pair in pairs[::37]:
        assert ids(ledger, index, pair[:32]) == [pair[32:]]
        found, _through = index.ids_with_prefix(pair[:4], 10)
        assert found == [pair[32:]]


def test_a_merge_is_written_a_range_of_hashes_per_transaction_and_readers_see_each_pair_once_meanwhile(
    ledger: Ledger, index: EntryHashIndex, small_levels: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(entry_hashes, "merge_entries_per_pair", 0)  # one range per indexing transaction
    pairs = logged_records(ledger, records=4, per_record=40)
    index.catch_up(ledger.store, entries_max=1)  # the fixture's issue
    for _ in range(3):
        index.catch_up(ledger.store, entries_max=40)
    assert index.merges() == ()
    index.catch_up(ledger.store, entries_max=40)  # the fourth run of level 2 (16 to 63 pairs): its merge starts
    (merge,) = index.merges()
    # 160 pairs in ranges of about 16: ten ranges, one written so far.
    assert merge.chunks == 10 and merge.next_chunk == 1 and 0 < merge.entries < 40
    # Mid-merge, the sources are still the runs a lookup reads, and the output is not read yet.
    assert merge.output_slot not in {run.slot for run in index.runs()}
    assert sorted(every_indexed_pair(index)) == sorted(pairs + logged_pairs(ledger)[:1])
    assert index.check(ledger.store).consistent
    found, _through = index.ids_with_prefix(b"", 1000)
    assert sorted(found) == sorted(pair[32:] for pair in pairs + logged_pairs(ledger)[:1])
    # A merge resumes where it stood after the index is closed and opened again (a restart).
    index.close()
    reopened = EntryHashIndex(index.path, map_size_bytes=64 << 20)
    try:
        assert reopened.merges() == (merge,)
        while reopened.merges():
            reopened.merge(1)
        (*_, merged) = reopened.runs()
        assert merged.slot == merge.output_slot and merged.entries == 160
        with reopened.environment.begin() as transaction:
            assert [transaction.stat(reopened.slot_database(slot))["entries"] for slot in merge.sources] == [0, 0, 0, 0]
        assert sorted(every_indexed_pair(reopened)) == sorted(pairs + logged_pairs(ledger)[:1])
        assert reopened.check(ledger.store).consistent
    finally:
        reopened.close()


def test_lookups_by_prefix_across_runs_return_the_first_ids_in_hash_order(ledger: Ledger, index: EntryHashIndex, small_levels: None) -> None:
    pairs = logged_records(ledger, records=12, per_record=8)
    while index.catch_up(ledger.store, entries_max=8):
        pass
    assert len(index.runs()) > 1
    everything = sorted(pairs + logged_pairs(ledger)[:1])
    found, _through = index.ids_with_prefix(b"", 5)
    assert found == [pair[32:] for pair in everything[:5]]


def test_with_slots_for_fewer_runs_than_are_waiting_the_smallest_are_merged_early(ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(entry_hashes, "run_slots", 3)
    monkeypatch.setattr(entry_hashes, "runs_per_level_max", 1000)  # no level ever fills: no merge is due
    pairs = logged_records(ledger, records=6, per_record=2)
    index = EntryHashIndex(tmp_path / "three_slots", map_size_bytes=64 << 20)
    try:
        while index.catch_up(ledger.store, entries_max=1):
            assert len(index.runs()) <= 2  # the third slot is kept for a merge's output
        assert sorted(every_indexed_pair(index)) == sorted(pairs + logged_pairs(ledger)[:1])
        assert index.check(ledger.store).consistent
    finally:
        index.close()


def test_an_index_with_one_slot_refuses_a_run_with_a_typed_error_and_writes_nothing(ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(entry_hashes, "run_slots", 1)  # a run would take the slot a merge's output needs
    index = EntryHashIndex(tmp_path / "one_slot", map_size_bytes=64 << 20)
    try:
        with pytest.raises(entry_hashes.IndexSlotsExhausted, match="no free slot: 0 runs"):
            index.catch_up(ledger.store)
        assert index.indexed_through() == 0 and index.runs() == ()
    finally:
        index.close()


def test_an_index_written_as_one_b_tree_is_dropped_and_built_again_as_runs(ledger: Ledger, tmp_path: Path) -> None:
    ledger.apply(pay(ledger, 400))
    path = tmp_path / "layout_1"
    path.mkdir()
    # What a node of layout 1 left: a `hashes` tree and its position, no layout record.
    environment = lmdb.open(str(path), map_size=64 << 20, max_dbs=4)
    with environment.begin(write=True) as transaction:
        hashes = environment.open_db(b"hashes", txn=transaction)
        meta = environment.open_db(b"meta", txn=transaction)
        transaction.put(b"\x01" * 48, b"", db=hashes)
        transaction.put(b"indexed_through", ledger.summary().applied_index.to_bytes(8, "big"), db=meta)
    environment.close()
    with pytest.raises(entry_hashes.IndexLayoutOutdated, match="layout 1, not 2"):
        EntryHashIndex(path, map_size_bytes=64 << 20, readonly=True)
    index = EntryHashIndex(path, map_size_bytes=64 << 20)
    try:
        assert index.indexed_through() == 0 and index.runs() == ()
        with index.environment.begin() as transaction, pytest.raises(lmdb.NotFoundError):
            index.environment.open_db(b"hashes", txn=transaction, create=False)
        assert index.catch_up(ledger.store) == 2
        assert index.check(ledger.store).consistent
    finally:
        index.close()
    EntryHashIndex(path, map_size_bytes=64 << 20, readonly=True).close()


def test_short_of_slots_an_indexing_transaction_merges_past_its_budget_until_a_merge_ends(ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(entry_hashes, "run_slots", 6)
    monkeypatch.setattr(entry_hashes, "runs_per_level_max", 3)
    monkeypatch.setattr(entry_hashes, "merge_chunk_entries_max", 1)  # a merge of 12 pairs takes 12 ranges
    monkeypatch.setattr(entry_hashes, "merge_entries_per_pair", 0)  # the budget: one range per transaction
    ranges: list[int] = []
    merge_chunk = EntryHashIndex._merge_chunk

    def counted(self, *arguments):
        ranges[-1] += 1
        return merge_chunk(self, *arguments)

    monkeypatch.setattr(EntryHashIndex, "_merge_chunk", counted)
    pairs = logged_records(ledger, records=30, per_record=4)
    index = EntryHashIndex(tmp_path / "six_slots", map_size_bytes=64 << 20)
    try:
        while True:
            ranges.append(0)
            if not index.catch_up(ledger.store, entries_max=4):
                break
            used = {run.slot for run in index.runs()} | {merge.output_slot for merge in index.merges()}
            assert len(used) <= 4  # two slots free after every indexing transaction
        assert max(ranges) > 1  # the budget was overridden
        assert sorted(every_indexed_pair(index)) == sorted(pairs + logged_pairs(ledger)[:1])
        assert index.check(ledger.store).consistent
    finally:
        index.close()


def test_runs_of_a_pair_or_two_are_merged_level_by_level_so_each_pair_is_rewritten_once_per_level(ledger: Ledger, index: EntryHashIndex) -> None:
    # A quiet network: an indexing transaction every 2 s finds a pair or two. Merges must not rewrite one
    # growing run with a few new pairs each time (quadratic), but move every pair up a level per rewrite.
    written: list[int] = []
    write_run = EntryHashIndex._write_run

    def counted(self, transaction, slot, pairs):
        written.append(len(pairs))
        return write_run(self, transaction, slot, pairs)

    pairs = logged_records(ledger, records=1024, per_record=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EntryHashIndex, "_write_run", counted)
        while index.catch_up(ledger.store, entries_max=1):
            pass
        while index.merges():
            index.merge(1)
    total = len(pairs) + 1  # and the fixture's issue
    levels = 4  # 1,025 pairs: runs of 1, 8, 64, 512 and beyond
    assert sum(written) <= total * (1 + levels)
    assert sorted(every_indexed_pair(index)) == sorted(pairs + logged_pairs(ledger)[:1])
    assert index.check(ledger.store).consistent


def test_a_damaged_run_list_is_counted_as_an_indexing_failure_not_a_damaged_ledger(ledger: Ledger, index: EntryHashIndex) -> None:
    index.catch_up(ledger.store)
    meta = index.environment.open_db(b"meta")
    with index.environment.begin(write=True) as transaction:
        transaction.put(b"runs", b"\xc1", db=meta)  # not msgpack
    ledger.apply(pay(ledger, 500))
    run_indexer_until_it_fails_once(index, ledger)
    with pytest.raises(entry_hashes.IndexDamaged, match="run list is damaged.*delete its entry_hashes directory"):
        index.ids_with_prefix(b"", 10)
