"""Tests for the durable Raft journal: format, durability, corruption handling, pysyncobj use."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import msgpack
import pysyncobj.syncobj
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pysyncobj import SyncObj, SyncObjConf, replicated

from consensus.raft.journal import (
    DurableJournal,
    JournalClosed,
    JournalCorrupted,
    JournalFailed,
    JournalInputRefused,
    StaleJournalView,
    io_chunk_bytes,
    meta_file_bytes_max,
    record_payload_bytes_max,
    tail_cache_bytes_max,
)
from tests.waiting import wait_until

log_file_header = b"TONLELOG" + struct.pack(">II", 1, 0)
record_overhead = 4 + 8 + 8 + 16
# Enough 1 MiB entries that the oldest ones fall out of the tail cache.
big_entry_bytes = 2**20
big_entry_count = tail_cache_bytes_max // big_entry_bytes + 8
deadline_seconds = 20.0


class RecordingObserver:
    """A real JournalObserver that keeps every event for the test to inspect."""

    def __init__(self) -> None:
        self.fsyncs: list[tuple[float, int]] = []
        self.corruptions: list[tuple[int, int, str]] = []
        self.torn_tails: list[tuple[int, int]] = []

    def fsync_completed(self, seconds: float, bytes_written: int) -> None:
        self.fsyncs.append((seconds, bytes_written))

    def corruption_detected(self, position: int, offset: int, reason: str) -> None:
        self.corruptions.append((position, offset, reason))

    def torn_tail_truncated(self, offset: int, bytes_dropped: int) -> None:
        self.torn_tails.append((offset, bytes_dropped))


def command_for(index: int, size: int = 64) -> bytes:
    seed = hashlib.blake2b(index.to_bytes(8, "big"), digest_size=32).digest()
    return (seed * (size // len(seed) + 1))[:size]


def encode_record(command: bytes, index: int, term: int) -> bytes:
    """The record format written out independently of the module under test."""
    header = struct.pack(">IQQ", len(command), index, term)
    return header + command + hashlib.blake2b(header + command, digest_size=16).digest()


def encode_meta_file(value: object) -> bytes:
    body = msgpack.packb(value, use_bin_type=True)
    return body + hashlib.blake2b(body, digest_size=16).digest()


def fill(
    journal: DurableJournal, count: int, size: int = 64, first_index: int = 1, term: int = 1
) -> list[tuple[bytes, int, int]]:
    entries = [(command_for(i, size), i, term) for i in range(first_index, first_index + count)]
    for entry in entries:
        journal.add(*entry)
    return entries


def record_offset(entries: list[tuple[bytes, int, int]], position: int) -> int:
    return len(log_file_header) + sum(record_overhead + len(e[0]) for e in entries[:position])


def read_all(journal: DurableJournal) -> list[tuple[bytes, int, int]]:
    return [journal[position] for position in range(len(journal))]


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        original = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([original[0] ^ (1 << bit)]), offset)
    finally:
        os.close(fd)


def closed_journal_with(
    directory: Path, count: int, size: int = 64
) -> list[tuple[bytes, int, int]]:
    journal = DurableJournal(directory)
    entries = fill(journal, count, size)
    journal._destroy()
    return entries


def count_disk_reads(journal: DurableJournal, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap the journal's disk reader so a test can see which positions were read from disk."""
    positions: list[int] = []
    read = journal._load_command

    def counting_read(position: int) -> bytes:
        positions.append(position)
        return read(position)

    monkeypatch.setattr(journal, "_load_command", counting_read)
    return positions


# -- format and round trips ----------------------------------------------------------------


def test_entries_survive_reopen_with_indexes_and_terms(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path / "journal")
    entries = [(command_for(i, 10 + i), i, 1 + i // 3) for i in range(1, 21)]
    for entry in entries:
        journal.add(*entry)
    journal._destroy()

    reopened = DurableJournal(tmp_path / "journal")
    assert read_all(reopened) == entries
    assert list(reopened[:]) == entries
    assert (len(reopened), reopened.first_index, reopened.last_index) == (20, 1, 20)


def test_synced_entries_are_visible_to_a_reopen_without_destroy(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path)
    entries = fill(journal, 5)
    journal.sync()
    # A second open while the first still holds the file stands in for a process crash.
    assert read_all(DurableJournal(tmp_path)) == entries


def test_log_file_bytes_follow_the_documented_format(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path)
    journal.add(b"abc", 1, 0)
    journal.add(b"", 2, 7)
    journal.sync()
    expected = log_file_header + encode_record(b"abc", 1, 0) + encode_record(b"", 2, 7)
    assert (tmp_path / "raft.log").read_bytes() == expected


def test_meta_file_is_a_msgpack_map_followed_by_its_digest(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path)
    journal.setCurrentTerm(3, "127.0.0.1:7001")
    data = (tmp_path / "raft.meta").read_bytes()
    body, digest = data[:-16], data[-16:]
    assert hashlib.blake2b(body, digest_size=16).digest() == digest
    assert msgpack.unpackb(body, raw=False) == {
        "term": 3,
        "voted_for": "127.0.0.1:7001",
        "commit_index": 1,
        "recovery_floor_index": 0,
    }


def test_fresh_journal_reports_pysyncobj_defaults(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path / "new")
    assert len(journal) == 0
    assert (journal.first_index, journal.last_index) == (0, 0)
    assert journal.getRaftCommitIndex() == 1
    assert journal.getCurrentTerm() == 0
    assert journal.getVotedForNodeId() is None
    assert journal.recovery_floor_index == 0
    assert not journal.dirty


# -- indexing and lazy slices ---------------------------------------------------------------


def test_int_indexing_returns_plain_tuples_including_negative_positions(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path)
    entries = fill(journal, 5)
    assert type(journal[0]) is tuple
    assert journal[0] == entries[0]
    assert journal[-1] == entries[-1]
    assert journal[-5] == entries[0]
    with pytest.raises(IndexError):
        journal[5]
    with pytest.raises(IndexError):
        journal[-6]


def test_slices_match_list_semantics_including_negative_bounds(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path)
    entries = fill(journal, 12)
    bounds = [None, *range(-14, 15)]
    for start in bounds:
        for stop in bounds:
            view = journal[start:stop]
            assert len(view) == len(entries[start:stop])
            assert list(view) == entries[start:stop]
    view = journal[2:]
    assert list(view[1:-1]) == entries[2:][1:-1]
    assert view[-1] == entries[-1]
    assert list(reversed(view)) == list(reversed(entries[2:]))
    assert list(journal[::3]) == entries[::3]
    with pytest.raises(IndexError):
        view[10]


def test_slice_reads_from_disk_only_the_entries_it_touches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = DurableJournal(tmp_path)
    entries = fill(journal, big_entry_count, big_entry_bytes)
    disk_reads = count_disk_reads(journal, monkeypatch)

    view = journal[0:]
    assert len(view) == big_entry_count
    assert disk_reads == []
    taken = []
    for entry in view:
        taken.append(entry)
        if len(taken) == 3:
            break
    assert taken == entries[:3]
    assert disk_reads == [0, 1, 2]


def test_tail_cache_holds_at_most_its_limit_and_older_commands_come_from_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = DurableJournal(tmp_path)
    entries = fill(journal, big_entry_count, big_entry_bytes)
    assert sum(len(e[0]) for e in entries) > tail_cache_bytes_max
    assert journal._tail_cache.bytes_total <= tail_cache_bytes_max
    disk_reads = count_disk_reads(journal, monkeypatch)

    assert journal[-1] == entries[-1]
    assert disk_reads == []
    assert journal[0] == entries[0]
    assert disk_reads == [0]


def test_reopen_caches_the_tail_so_the_newest_entry_needs_no_disk_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = closed_journal_with(tmp_path, big_entry_count, big_entry_bytes)
    journal = DurableJournal(tmp_path)
    disk_reads = count_disk_reads(journal, monkeypatch)
    assert journal[-1] == entries[-1]
    assert disk_reads == []
    assert journal[0] == entries[0]
    assert disk_reads == [0]


def test_views_taken_before_a_truncation_or_compaction_refuse_use(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path)
    entries = fill(journal, 10)
    before_add = journal[2:5]
    journal.add(command_for(11), 11, 1)
    assert list(before_add) == entries[2:5]

    for change in (
        lambda: journal.deleteEntriesFrom(8),
        lambda: journal.deleteEntriesTo(2),
        journal.clear,
    ):
        view = journal[0:]
        change()
        with pytest.raises(StaleJournalView):
            view[0]
        with pytest.raises(StaleJournalView):
            list(view)


# -- sync and durability of term, vote and commit index --------------------------------------


def test_sync_fsyncs_once_per_batch_and_returns_false_when_clean(tmp_path: Path) -> None:
    observer = RecordingObserver()
    journal = DurableJournal(tmp_path, observer=observer)
    assert journal.sync() is False
    fsyncs_before = len(observer.fsyncs)

    fill(journal, 5, size=100)
    assert journal.dirty
    assert journal.sync() is True
    batch_bytes = 5 * (100 + record_overhead)
    assert [written for _, written in observer.fsyncs[fsyncs_before:]] == [batch_bytes]
    assert not journal.dirty
    assert journal.sync() is False
    assert len(observer.fsyncs) == fsyncs_before + 1

    fill(journal, 2, size=10, first_index=6)
    journal.flush()
    assert [written for _, written in observer.fsyncs[fsyncs_before:]] == [
        5 * (100 + record_overhead),
        2 * (10 + record_overhead),
    ]


def test_sync_without_fsync_enabled_clears_dirty_and_reports_no_fsync(tmp_path: Path) -> None:
    observer = RecordingObserver()
    journal = DurableJournal(tmp_path, fsync_enabled=False, observer=observer)
    fill(journal, 3)
    assert journal.sync() is False
    assert not journal.dirty
    assert observer.fsyncs == []


def test_current_term_and_vote_are_durable_before_set_returns(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path)
    journal.setCurrentTerm(4, "127.0.0.1:7002")
    other = DurableJournal(tmp_path)
    assert other.getCurrentTerm() == 4
    assert other.getVotedForNodeId() == "127.0.0.1:7002"
    journal.setCurrentTerm(5, None)
    assert DurableJournal(tmp_path).getVotedForNodeId() is None


def test_term_going_backwards_or_a_second_vote_in_a_term_is_refused(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path)
    journal.setCurrentTerm(5, "127.0.0.1:7001")
    with pytest.raises(JournalInputRefused, match="below the current term"):
        journal.setCurrentTerm(4, None)
    with pytest.raises(JournalInputRefused, match="already voted"):
        journal.setCurrentTerm(5, "127.0.0.1:7002")
    with pytest.raises(JournalInputRefused, match="str or None"):
        journal.setCurrentTerm(6, 7002)
    journal.setCurrentTerm(5, "127.0.0.1:7001")
    reopened = DurableJournal(tmp_path)
    assert (reopened.getCurrentTerm(), reopened.getVotedForNodeId()) == (5, "127.0.0.1:7001")


def test_vote_that_would_exceed_the_meta_size_limit_is_refused_and_nothing_changes(
    tmp_path: Path,
) -> None:
    journal = DurableJournal(tmp_path)
    with pytest.raises(JournalInputRefused, match="meta_file_bytes_max"):
        journal.setCurrentTerm(2, "x" * meta_file_bytes_max)
    assert journal.getCurrentTerm() == 0
    assert DurableJournal(tmp_path).getCurrentTerm() == 0


def test_commit_index_is_persisted_by_the_one_second_timer(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path)
    fill(journal, 10)
    journal.setRaftCommitIndex(8)
    assert journal.getRaftCommitIndex() == 8
    assert DurableJournal(tmp_path).getRaftCommitIndex() == 1
    journal.onOneSecondTimer()
    assert DurableJournal(tmp_path).getRaftCommitIndex() == 8


def test_commit_index_is_clamped_to_the_last_valid_index_on_reopen(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path)
    entries = fill(journal, 10)
    journal.setRaftCommitIndex(8)
    journal._destroy()
    os.truncate(tmp_path / "raft.log", record_offset(entries, 6))
    assert DurableJournal(tmp_path).getRaftCommitIndex() == 6


# -- meta and header corruption ---------------------------------------------------------------


valid_meta = {"term": 1, "voted_for": None, "commit_index": 1, "recovery_floor_index": 0}


@pytest.mark.parametrize(
    ("meta_bytes", "reason"),
    [
        pytest.param(b"", "too short", id="empty"),
        pytest.param(b"\x01" * 10, "too short", id="shorter-than-digest"),
        pytest.param(
            encode_meta_file(valid_meta)[:-1] + b"\x00", "digest mismatch", id="bad-digest"
        ),
        pytest.param(
            b"\xc1" + hashlib.blake2b(b"\xc1", digest_size=16).digest(),
            "not a msgpack map",
            id="not-msgpack",
        ),
        pytest.param(
            msgpack.packb(valid_meta) * 2
            + hashlib.blake2b(msgpack.packb(valid_meta) * 2, digest_size=16).digest(),
            "not a msgpack map",
            id="trailing-data",
        ),
        pytest.param(encode_meta_file({"term": 1}), "expected a map", id="missing-keys"),
        pytest.param(encode_meta_file([1, None, 1, 0]), "not a msgpack map", id="array"),
        pytest.param(
            encode_meta_file({**valid_meta, "term": True}), "term is not a", id="bool-term"
        ),
        pytest.param(
            encode_meta_file({**valid_meta, "commit_index": -1}),
            "commit_index is not",
            id="negative-commit-index",
        ),
        pytest.param(encode_meta_file({**valid_meta, "term": 1.0}), "term is not", id="float"),
        pytest.param(
            encode_meta_file({**valid_meta, "voted_for": 7001}),
            "voted_for",
            id="integer-vote",
        ),
        pytest.param(
            b"\x00" * (meta_file_bytes_max + 1), "above meta_file_bytes_max", id="oversized"
        ),
    ],
)
def test_corrupt_meta_is_fatal_and_names_the_file(
    tmp_path: Path, meta_bytes: bytes, reason: str
) -> None:
    closed_journal_with(tmp_path, 3)
    (tmp_path / "raft.meta").write_bytes(meta_bytes)
    with pytest.raises(JournalCorrupted, match=reason) as raised:
        DurableJournal(tmp_path)
    assert "raft.meta" in str(raised.value)


def test_flipped_bit_in_meta_is_fatal_instead_of_resetting_the_term(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path)
    journal.setCurrentTerm(9, "127.0.0.1:7001")
    journal._destroy()
    flip_bit(tmp_path / "raft.meta", 2)
    with pytest.raises(JournalCorrupted, match="digest mismatch"):
        DurableJournal(tmp_path)


def test_missing_meta_next_to_a_log_with_records_is_fatal(tmp_path: Path) -> None:
    closed_journal_with(tmp_path, 3)
    (tmp_path / "raft.meta").unlink()
    with pytest.raises(JournalCorrupted, match="raft.meta is missing"):
        DurableJournal(tmp_path)


def test_missing_log_next_to_a_meta_is_fatal(tmp_path: Path) -> None:
    closed_journal_with(tmp_path, 3)
    (tmp_path / "raft.log").unlink()
    with pytest.raises(JournalCorrupted, match="raft.log is missing"):
        DurableJournal(tmp_path)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"PYSYNCOB" + struct.pack(">II", 1, 0), "magic"),
        (b"TONLELOG" + struct.pack(">II", 2, 0), "format version 2"),
        (b"TONLELOG" + struct.pack(">II", 1, 1), "reserved"),
        (b"TONLELOG", "file header is 8 bytes"),
    ],
)
def test_bad_file_header_is_fatal_and_names_the_file(
    tmp_path: Path, header: bytes, reason: str
) -> None:
    closed_journal_with(tmp_path, 2)
    log_path = tmp_path / "raft.log"
    records = log_path.read_bytes()[len(log_file_header):]
    log_path.write_bytes(header + (records if len(header) == 16 else b""))
    with pytest.raises(JournalCorrupted, match=reason) as raised:
        DurableJournal(tmp_path)
    assert str(log_path) in str(raised.value)


# -- torn tails and holes ----------------------------------------------------------------------


@pytest.mark.parametrize("bytes_into_record", [3, 20, 60, 99])
def test_torn_tail_is_cut_and_earlier_entries_survive(
    tmp_path: Path, bytes_into_record: int
) -> None:
    entries = closed_journal_with(tmp_path, 10)
    cut_offset = record_offset(entries, 9)
    os.truncate(tmp_path / "raft.log", cut_offset + bytes_into_record)

    observer = RecordingObserver()
    journal = DurableJournal(tmp_path, observer=observer)
    assert read_all(journal) == entries[:9]
    assert observer.torn_tails == [(cut_offset, bytes_into_record)]
    assert observer.corruptions == []
    assert journal.recovery_floor_index == 0
    assert (tmp_path / "raft.log").stat().st_size == cut_offset

    journal.add(*entries[9])
    journal._destroy()
    assert read_all(DurableJournal(tmp_path)) == entries


def test_garbage_appended_after_the_last_record_is_cut(tmp_path: Path) -> None:
    entries = closed_journal_with(tmp_path, 4)
    end_offset = record_offset(entries, 4)
    with open(tmp_path / "raft.log", "ab") as log_file:
        log_file.write(hashlib.shake_256(b"garbage").digest(1000))

    observer = RecordingObserver()
    journal = DurableJournal(tmp_path, observer=observer)
    assert read_all(journal) == entries
    assert observer.torn_tails == [(end_offset, 1000)]
    assert journal.recovery_floor_index == 0


def test_flipped_bit_in_the_last_record_is_treated_as_a_torn_tail(tmp_path: Path) -> None:
    entries = closed_journal_with(tmp_path, 6)
    last_offset = record_offset(entries, 5)
    flip_bit(tmp_path / "raft.log", last_offset + 30)

    observer = RecordingObserver()
    journal = DurableJournal(tmp_path, observer=observer)
    assert read_all(journal) == entries[:5]
    assert observer.torn_tails == [(last_offset, record_overhead + 64)]
    assert journal.recovery_floor_index == 0


def test_flipped_bit_in_a_middle_record_drops_the_rest_and_sets_a_durable_recovery_floor(
    tmp_path: Path,
) -> None:
    journal = DurableJournal(tmp_path)
    entries = fill(journal, 10)
    journal.setRaftCommitIndex(3)
    journal.onOneSecondTimer()
    journal._destroy()
    bad_offset = record_offset(entries, 4)
    flip_bit(tmp_path / "raft.log", bad_offset + 40, bit=5)

    observer = RecordingObserver()
    journal = DurableJournal(tmp_path, observer=observer)
    assert read_all(journal) == entries[:4]
    assert observer.corruptions == [(4, bad_offset, "digest mismatch")]
    assert journal.recovery_floor_index == 10
    assert journal.getRaftCommitIndex() == 3
    assert (tmp_path / "raft.log").stat().st_size == bad_offset

    reopened_observer = RecordingObserver()
    reopened = DurableJournal(tmp_path, observer=reopened_observer)
    assert reopened.recovery_floor_index == 10
    assert read_all(reopened) == entries[:4]
    assert reopened_observer.corruptions == []


def test_recovery_floor_covers_the_persisted_commit_index_when_it_is_higher(
    tmp_path: Path,
) -> None:
    journal = DurableJournal(tmp_path)
    entries = fill(journal, 10)
    journal.setRaftCommitIndex(9)
    journal.onOneSecondTimer()
    journal._destroy()
    flip_bit(tmp_path / "raft.log", record_offset(entries, 2) + 30)
    # Records behind the hole end at index 7: the tail after it is torn as well.
    os.truncate(tmp_path / "raft.log", record_offset(entries, 7) + 10)

    journal = DurableJournal(tmp_path)
    assert read_all(journal) == entries[:2]
    assert journal.recovery_floor_index == 9
    assert journal.getRaftCommitIndex() == 2


def test_recovery_floor_is_found_when_the_first_record_is_damaged(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path)
    entries = fill(journal, 6, first_index=5000, term=3)
    journal.deleteEntriesTo(1)
    journal._destroy()
    flip_bit(tmp_path / "raft.log", len(log_file_header) + 2)

    journal = DurableJournal(tmp_path)
    assert len(journal) == 0
    assert journal.recovery_floor_index == entries[-1][1]


def test_clear_recovery_floor_persists_zero(tmp_path: Path) -> None:
    entries = closed_journal_with(tmp_path, 5)
    flip_bit(tmp_path / "raft.log", record_offset(entries, 1) + 25)
    journal = DurableJournal(tmp_path)
    assert journal.recovery_floor_index == 5
    journal.clear_recovery_floor()
    assert journal.recovery_floor_index == 0
    assert DurableJournal(tmp_path).recovery_floor_index == 0


def write_log(directory: Path, records: list[bytes]) -> None:
    """Replace raft.log of an existing journal directory with hand-made records."""
    (directory / "raft.log").write_bytes(log_file_header + b"".join(records))


def test_index_gap_on_disk_is_corruption_at_that_record(tmp_path: Path) -> None:
    closed_journal_with(tmp_path, 0)
    write_log(tmp_path, [encode_record(b"a", 1, 1), encode_record(b"b", 2, 1),
                         encode_record(b"d", 4, 1), encode_record(b"e", 5, 1)])
    observer = RecordingObserver()
    journal = DurableJournal(tmp_path, observer=observer)
    assert read_all(journal) == [(b"a", 1, 1), (b"b", 2, 1)]
    assert journal.recovery_floor_index == 5
    assert observer.corruptions[0][:2] == (2, 16 + 2 * (record_overhead + 1))
    assert "does not follow" in observer.corruptions[0][2]


def test_falling_term_on_disk_is_corruption_at_that_record(tmp_path: Path) -> None:
    closed_journal_with(tmp_path, 0)
    write_log(tmp_path, [encode_record(b"a", 1, 2), encode_record(b"b", 2, 1),
                         encode_record(b"c", 3, 2)])
    observer = RecordingObserver()
    journal = DurableJournal(tmp_path, observer=observer)
    assert read_all(journal) == [(b"a", 1, 2)]
    assert journal.recovery_floor_index == 3
    assert "below the previous term" in observer.corruptions[0][2]


def test_length_field_above_the_payload_limit_on_open_is_corruption(tmp_path: Path) -> None:
    closed_journal_with(tmp_path, 0)
    oversized_header = struct.pack(">IQQ", record_payload_bytes_max + 1, 2, 1)
    write_log(tmp_path, [encode_record(b"a", 1, 1), oversized_header + b"x" * 100,
                         encode_record(b"c", 3, 1)])
    observer = RecordingObserver()
    journal = DurableJournal(tmp_path, observer=observer)
    assert read_all(journal) == [(b"a", 1, 1)]
    assert "record_payload_bytes_max" in observer.corruptions[0][2]
    assert journal.recovery_floor_index == 3


def test_flipped_bit_in_an_evicted_record_is_detected_on_read(tmp_path: Path) -> None:
    observer = RecordingObserver()
    journal = DurableJournal(tmp_path, observer=observer)
    entries = fill(journal, big_entry_count, big_entry_bytes)
    journal.sync()
    flip_bit(tmp_path / "raft.log", record_offset(entries, 1) + 1000)
    with pytest.raises(JournalCorrupted, match="digest mismatch"):
        journal[1]
    with pytest.raises(JournalCorrupted, match="position 1"):
        list(journal[0:3])
    assert observer.corruptions[0] == (1, record_offset(entries, 1), "digest mismatch")
    # The header is checked against the index too: a record that moved or changed its index
    # is never returned under another one.
    flip_bit(tmp_path / "raft.log", record_offset(entries, 2) + 11)
    with pytest.raises(JournalCorrupted, match="header changed"):
        journal[2]
    assert journal[0] == entries[0]


# -- limits and refused input ------------------------------------------------------------------


def test_command_over_the_payload_limit_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path)
    with pytest.raises(JournalInputRefused, match="record_payload_bytes_max"):
        journal.add(b"x" * (record_payload_bytes_max + 1), 1, 1)
    assert len(journal) == 0
    assert (tmp_path / "raft.log").stat().st_size == len(log_file_header)
    journal.add(b"x" * record_payload_bytes_max, 1, 1)
    journal._destroy()
    assert DurableJournal(tmp_path)[0] == (b"x" * record_payload_bytes_max, 1, 1)


@pytest.mark.parametrize(
    ("command", "index", "term", "reason"),
    [
        (b"x", 7, 2, "does not follow"),
        (b"x", 5, 2, "does not follow"),
        (b"x", 6, 1, "below the last entry's term"),
        ("text", 6, 2, "must be bytes"),
        (b"x", True, 2, "idx must be"),
        (b"x", 6, -1, "term must be"),
        (b"x", 6, 2**64, "term must be"),
    ],
)
def test_add_refuses_bad_entries_and_leaves_the_journal_unchanged(
    tmp_path: Path, command: object, index: object, term: object, reason: str
) -> None:
    journal = DurableJournal(tmp_path)
    entries = fill(journal, 5, term=2)
    size_before = (tmp_path / "raft.log").stat().st_size
    with pytest.raises(JournalInputRefused, match=reason):
        journal.add(command, index, term)  # type: ignore[arg-type]
    assert read_all(journal) == entries
    assert (tmp_path / "raft.log").stat().st_size == size_before


def test_negative_positions_are_refused_by_the_delete_methods(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path)
    entries = fill(journal, 3)
    with pytest.raises(JournalInputRefused):
        journal.deleteEntriesFrom(-1)
    with pytest.raises(JournalInputRefused):
        journal.deleteEntriesTo(-1)
    assert read_all(journal) == entries


# -- truncation, compaction, clear ---------------------------------------------------------------


def test_delete_entries_from_truncates_durably_and_survives_reopen(tmp_path: Path) -> None:
    observer = RecordingObserver()
    journal = DurableJournal(tmp_path, observer=observer)
    entries = fill(journal, 10)
    fsyncs_before = len(observer.fsyncs)
    journal.deleteEntriesFrom(6)
    assert read_all(journal) == entries[:6]
    assert len(observer.fsyncs) == fsyncs_before + 1
    assert not journal.dirty
    assert (tmp_path / "raft.log").stat().st_size == record_offset(entries, 6)
    journal.deleteEntriesFrom(6)
    assert len(observer.fsyncs) == fsyncs_before + 1

    replacement = (b"new", 7, 2)
    journal.add(*replacement)
    journal._destroy()
    assert read_all(DurableJournal(tmp_path)) == entries[:6] + [replacement]


def test_delete_entries_to_compacts_and_survives_reopen(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path)
    entries = fill(journal, 10)
    journal.deleteEntriesTo(4)
    assert read_all(journal) == entries[4:]
    assert (journal.first_index, journal.last_index) == (5, 10)
    expected_bytes = log_file_header + b"".join(encode_record(*e) for e in entries[4:])
    assert (tmp_path / "raft.log").read_bytes() == expected_bytes
    assert not (tmp_path / "raft.log.tmp").exists()

    journal.add(command_for(11), 11, 1)
    journal.deleteEntriesTo(0)
    journal._destroy()
    assert read_all(DurableJournal(tmp_path)) == entries[4:] + [(command_for(11), 11, 1)]


def test_compaction_copies_more_than_one_chunk_and_keeps_every_byte(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path)
    entries = fill(journal, big_entry_count, big_entry_bytes)
    assert sum(len(e[0]) for e in entries[1:]) > io_chunk_bytes
    journal.deleteEntriesTo(1)
    assert journal[0] == entries[1]
    assert journal[-1] == entries[-1]
    journal._destroy()
    assert read_all(DurableJournal(tmp_path)) == entries[1:]


def test_clear_drops_everything_durably_and_a_new_run_of_indexes_can_start(
    tmp_path: Path,
) -> None:
    journal = DurableJournal(tmp_path)
    fill(journal, 5)
    journal.clear()
    assert len(journal) == 0
    assert (journal.first_index, journal.last_index) == (0, 0)
    assert (tmp_path / "raft.log").stat().st_size == len(log_file_header)
    journal.add(b"snapshot-tail", 100, 5)
    journal.deleteEntriesTo(5)
    assert len(journal) == 0
    journal.add(b"x", 200, 6)
    journal._destroy()
    assert read_all(DurableJournal(tmp_path)) == [(b"x", 200, 6)]


compaction_crash_script = """
import os, sys
from pathlib import Path
from consensus.raft.journal import DurableJournal

journal = DurableJournal(Path(sys.argv[1]))
real_replace = os.replace

def crash_before_replace(source, destination):
    os._exit(17)

def crash_after_replace(source, destination):
    real_replace(source, destination)
    os._exit(17)

os.replace = {"before": crash_before_replace, "after": crash_after_replace}[sys.argv[2]]
journal.deleteEntriesTo(int(sys.argv[3]))
"""


def crash_during_compaction(directory: Path, crash_point: str, entry_to: int) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", compaction_crash_script, str(directory), crash_point, str(entry_to)],
        capture_output=True,
        timeout=deadline_seconds,
        check=False,
    )
    assert completed.returncode == 17, completed.stderr.decode()


def test_crash_before_the_compaction_rename_keeps_the_old_log_and_drops_the_temp_file(
    tmp_path: Path,
) -> None:
    entries = closed_journal_with(tmp_path, 10)
    crash_during_compaction(tmp_path, "before", 4)
    assert (tmp_path / "raft.log.tmp").exists()

    journal = DurableJournal(tmp_path)
    assert read_all(journal) == entries
    assert not (tmp_path / "raft.log.tmp").exists()


def test_crash_after_the_compaction_rename_gives_the_compacted_log(tmp_path: Path) -> None:
    entries = closed_journal_with(tmp_path, 10)
    crash_during_compaction(tmp_path, "after", 4)
    assert read_all(DurableJournal(tmp_path)) == entries[4:]


def test_stale_meta_temp_file_is_removed_on_open(tmp_path: Path) -> None:
    closed_journal_with(tmp_path, 2)
    (tmp_path / "raft.meta.tmp").write_bytes(b"half written")
    DurableJournal(tmp_path)
    assert not (tmp_path / "raft.meta.tmp").exists()


# -- failures and closing ----------------------------------------------------------------------


def test_failed_fdatasync_poisons_the_journal_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = DurableJournal(tmp_path)
    fill(journal, 2)

    def failing_fdatasync(fd: int) -> None:
        raise OSError(5, "Input/output error (injected)")

    # Fault injection into the one syscall under test; the files stay real.
    with monkeypatch.context() as patch:
        patch.setattr(os, "fdatasync", failing_fdatasync)
        with pytest.raises(JournalFailed, match="fdatasync failed"):
            journal.sync()
    # Retrying a failed fsync would report success for pages the kernel already dropped.
    with pytest.raises(JournalFailed):
        journal.sync()
    with pytest.raises(JournalFailed):
        journal.add(command_for(3), 3, 1)
    with pytest.raises(JournalFailed):
        journal.setCurrentTerm(2, None)
    journal._destroy()


def test_destroyed_journal_refuses_writes_and_destroy_is_idempotent(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path)
    fill(journal, 2)
    journal._destroy()
    journal._destroy()
    with pytest.raises(JournalClosed):
        journal.add(command_for(3), 3, 1)
    with pytest.raises(JournalClosed):
        journal.sync()


# -- model-based property test -----------------------------------------------------------------


journal_operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 300), st.integers(0, 2)),
        st.tuples(st.just("delete_from"), st.integers(0, 30)),
        st.tuples(st.just("delete_to"), st.integers(0, 30)),
        st.tuples(st.just("clear"), st.integers(1, 10_000)),
        st.tuples(st.just("sync")),
        st.tuples(st.just("reopen")),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(journal_operations)
def test_random_operation_sequences_behave_like_pysyncobjs_list_journal(
    operations: list[tuple],
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "journal"
        journal = DurableJournal(path)
        model: list[tuple[bytes, int, int]] = []
        next_start_index = 1
        for operation in operations:
            if operation[0] == "add":
                index = model[-1][1] + 1 if model else next_start_index
                term = (model[-1][2] if model else 0) + operation[2]
                entry = (command_for(index, operation[1]), index, term)
                journal.add(*entry)
                model.append(entry)
            elif operation[0] == "delete_from":
                journal.deleteEntriesFrom(operation[1])
                del model[operation[1]:]
            elif operation[0] == "delete_to":
                journal.deleteEntriesTo(operation[1])
                model = model[operation[1]:]
            elif operation[0] == "clear":
                journal.clear()
                model = []
                next_start_index = operation[1]
            elif operation[0] == "sync":
                journal.sync()
            else:
                journal._destroy()
                journal = DurableJournal(path)
            assert len(journal) == len(model)
            assert list(journal[:]) == model
        journal._destroy()
        assert read_all(DurableJournal(path)) == model


# -- a real pysyncobj node on top of the journal --------------------------------------------------


class Counter(SyncObj):
    def __init__(self, address: str, conf: SyncObjConf) -> None:
        # Set before SyncObj.__init__: the tick thread may apply replayed entries right away.
        self.total = 0
        super().__init__(address, [], conf)

    @replicated
    def add_amount(self, amount: int) -> None:
        self.total += amount


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_counter(journal: DurableJournal, address: str, monkeypatch: pytest.MonkeyPatch) -> Counter:
    monkeypatch.setattr(pysyncobj.syncobj, "createJournal", lambda _path: journal)
    conf = SyncObjConf(
        autoTick=True,
        journalFile="unused",
        fullDumpFile=None,
        dynamicMembershipChange=False,
        appendEntriesUseBatch=True,
    )
    return Counter(address, conf)


def stop_counter(counter: Counter) -> None:
    counter.destroy()
    wait_until(lambda: not counter.tick_thread_alive(), deadline_seconds, "the pysyncobj tick thread to stop")


def test_real_syncobj_applies_commands_and_a_restart_replays_them_from_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = f"127.0.0.1:{free_port()}"
    journal = DurableJournal(tmp_path / "journal")
    counter = run_counter(journal, address, monkeypatch)
    try:
        for amount in (5, 7, 11):
            counter.add_amount(amount)
        wait_until(lambda: counter.total == 23, deadline_seconds, "three commands to apply")
    finally:
        stop_counter(counter)

    reopened = DurableJournal(tmp_path / "journal")
    # idx 1 is pysyncobj's initial no-op, then the leader's no-op, then the three commands.
    assert len(reopened) == 5
    assert [entry[1] for entry in reopened[:]] == [1, 2, 3, 4, 5]
    assert reopened.getCurrentTerm() >= 1
    assert reopened[-1][2] == reopened.getCurrentTerm()
    assert reopened.getVotedForNodeId() == address
    assert reopened.getRaftCommitIndex() == 5

    restarted = run_counter(reopened, address, monkeypatch)
    try:
        wait_until(lambda: restarted.total == 23, deadline_seconds, "the journal to replay after restart")
        restarted.add_amount(1)
        wait_until(lambda: restarted.total == 24, deadline_seconds, "a command after restart")
    finally:
        stop_counter(restarted)
    assert DurableJournal(tmp_path / "journal").last_index >= 6
