"""Durable, checksummed Raft journal that stands in for pysyncobj's FileJournal."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, overload

import msgpack

logger = logging.getLogger(__name__)

log_file_name = "raft.log"
meta_file_name = "raft.meta"
temporary_suffix = ".tmp"

log_magic = b"TONLELOG"
log_format_version = 1
# magic | u32 format version | u32 reserved (always 0)
file_header = struct.Struct(">8sII")
# u32 payload length | u64 raft index | u64 raft term, then the payload, then the digest
record_header = struct.Struct(">IQQ")
digest_bytes = 16
record_overhead_bytes = record_header.size + digest_bytes
# The raft index sits right after the length field; resynchronisation searches for it.
record_index_field_offset_bytes = 4
record_index_field_bytes = 8
raft_index_max = 2**64 - 1

record_payload_bytes_max = 8 * 2**20
# The newest commands stay in memory: replication and the apply read within the last few batches; a
# follower further behind is read from the file (the page cache). 8 MiB is some 170 full 48 KiB batches.
tail_cache_bytes_max = 8 * 2**20
meta_file_bytes_max = 4 * 2**10
# Open-time scans and compaction copies move data in chunks of this size, so a large
# log costs few system calls without ever being read into memory whole.
io_chunk_bytes = 4 * 2**20

commit_index_default = 1

# pysyncobj's log entries are (command bytes, raft index, raft term) tuples.
JournalEntry = tuple[bytes, int, int]


class JournalError(Exception):
    """Base class of the journal's own errors."""


class JournalCorrupted(JournalError):
    """The files are not a journal this code wrote, or a record changed after it was written."""


class JournalFailed(JournalError):
    """A sync failed: the page cache can no longer be trusted, so the journal refuses to write."""


class JournalClosed(JournalError):
    """The journal was destroyed and its files are closed."""


class StaleJournalView(JournalError):
    """A view taken before a truncation, compaction or clear was used after it."""


class JournalInputRefused(ValueError):
    """An argument the journal will not store (oversized, out of order, wrong type)."""


class JournalObserver(Protocol):
    """Receives the journal's events; fsync_completed covers every fsync of raft.log data."""

    def fsync_completed(self, seconds: float, bytes_written: int) -> None: ...

    def corruption_detected(self, position: int, offset: int, reason: str) -> None: ...

    def torn_tail_truncated(self, offset: int, bytes_dropped: int) -> None: ...


class NullJournalObserver:
    """An observer that ignores every event."""

    def fsync_completed(self, seconds: float, bytes_written: int) -> None:
        pass

    def corruption_detected(self, position: int, offset: int, reason: str) -> None:
        pass

    def torn_tail_truncated(self, offset: int, bytes_dropped: int) -> None:
        pass


@dataclass(frozen=True, slots=True)
class JournalMeta:
    """The Raft state kept next to the log: term, vote, commit index and recovery floor."""

    term: int
    voted_for: str | None
    commit_index: int
    recovery_floor_index: int


@dataclass(frozen=True, slots=True)
class _Record:
    offset: int
    payload_length: int
    index: int
    term: int
    payload: bytes

    @property
    def end_offset(self) -> int:
        return self.offset + record_overhead_bytes + self.payload_length


@dataclass(frozen=True, slots=True)
class _ScanResult:
    first_index: int
    terms: array[int]
    offsets: array[int]
    payload_lengths: array[int]
    tail_cache: _TailCache
    valid_end_offset: int
    file_size: int
    problem: str | None
    # The highest raft index of a well-formed record behind the first bad one;
    # None when nothing valid follows it (a torn tail).
    index_after_hole_max: int | None


def _digest(*parts: bytes | memoryview) -> bytes:
    hasher = hashlib.blake2b(digest_size=digest_bytes)
    for part in parts:
        hasher.update(part)
    return hasher.digest()


def encode_meta(meta: JournalMeta) -> bytes:
    """raft.meta contents: a msgpack map followed by the blake2b digest of the map bytes."""
    body = msgpack.packb(
        {
            "term": meta.term,
            "voted_for": meta.voted_for,
            "commit_index": meta.commit_index,
            "recovery_floor_index": meta.recovery_floor_index,
        },
        use_bin_type=True,
    )
    return body + _digest(body)


def decode_meta(data: bytes, path: Path) -> JournalMeta:
    """Parse raft.meta contents; anything unexpected is JournalCorrupted naming the file."""
    if len(data) > meta_file_bytes_max:
        raise JournalCorrupted(f"{path}: {len(data)} bytes, above meta_file_bytes_max")
    if len(data) <= digest_bytes:
        raise JournalCorrupted(f"{path}: {len(data)} bytes, too short to hold a digest")
    body, digest = data[:-digest_bytes], data[-digest_bytes:]
    if _digest(body) != digest:
        raise JournalCorrupted(f"{path}: digest mismatch")
    try:
        value = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=meta_file_bytes_max,
            max_bin_len=0,
            max_array_len=0,
            max_map_len=4,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException) as error:
        raise JournalCorrupted(f"{path}: not a msgpack map: {error}") from error
    expected_keys = {"term", "voted_for", "commit_index", "recovery_floor_index"}
    if not isinstance(value, dict) or set(value) != expected_keys:
        raise JournalCorrupted(f"{path}: expected a map with keys {sorted(expected_keys)}")
    for key in ("term", "commit_index", "recovery_floor_index"):
        if type(value[key]) is not int or value[key] < 0:
            raise JournalCorrupted(f"{path}: {key} is not a non-negative integer")
    if value["voted_for"] is not None and type(value["voted_for"]) is not str:
        raise JournalCorrupted(f"{path}: voted_for is neither a string nor nil")
    return JournalMeta(
        term=value["term"],
        voted_for=value["voted_for"],
        commit_index=value["commit_index"],
        recovery_floor_index=value["recovery_floor_index"],
    )


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Up to length bytes at offset; shorter only at the end of the file."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    received = len(data)
    while received < length:
        more = os.pread(fd, length - received, offset + received)
        if not more:
            break
        parts.append(more)
        received += len(more)
    return b"".join(parts)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _TailCache:
    """The commands of the newest entries, a contiguous run of raft indexes ending at the last."""

    def __init__(self) -> None:
        self._commands: dict[int, bytes] = {}
        self._lowest_index = 0
        self.bytes_total = 0

    def get(self, index: int) -> bytes | None:
        return self._commands.get(index)

    def append(self, index: int, command: bytes) -> None:
        if not self._commands:
            self._lowest_index = index
        assert index == self._lowest_index + len(self._commands), "tail cache must stay contiguous"
        self._commands[index] = command
        self.bytes_total += len(command)
        # The newest entry always stays: it is read on every tick (journal[-1]).
        while self.bytes_total > tail_cache_bytes_max and len(self._commands) > 1:
            self.bytes_total -= len(self._commands.pop(self._lowest_index))
            self._lowest_index += 1

    def drop_from(self, index: int) -> None:
        if index <= self._lowest_index:
            self.clear()
            return
        for doomed in range(index, self._lowest_index + len(self._commands)):
            self.bytes_total -= len(self._commands.pop(doomed))

    def drop_below(self, index: int) -> None:
        highest_index = self._lowest_index + len(self._commands) - 1
        if index > highest_index:
            self.clear()
            return
        for doomed in range(self._lowest_index, index):
            self.bytes_total -= len(self._commands.pop(doomed))
        self._lowest_index = max(self._lowest_index, index)

    def clear(self) -> None:
        self._commands.clear()
        self._lowest_index = 0
        self.bytes_total = 0


class _WindowReader:
    """Reads a file through a large window so a sequential scan costs few system calls."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self.size = size
        self._window = b""
        self._window_offset = 0

    def read(self, offset: int, length: int) -> bytes:
        """Up to length bytes at offset; shorter only at the end of the file."""
        end = min(offset + length, self.size)
        if offset < self._window_offset or end > self._window_end():
            self._load(offset, end - offset)
        start = offset - self._window_offset
        return self._window[start:start + max(end - offset, 0)]

    def find(self, pattern: re.Pattern[bytes], offset: int, match_bytes_max: int) -> int:
        """Absolute offset of the first match at or after offset, or -1.

        Matches may look at up to match_bytes_max bytes; that many minus one are read again
        with the next window so a match across two windows is not missed.
        """
        while offset < self.size:
            if not self._window_offset <= offset < self._window_end():
                self._load(offset, io_chunk_bytes)
            hit = pattern.search(self._window, offset - self._window_offset)
            if hit is not None:
                return self._window_offset + hit.start()
            if self._window_end() >= self.size:
                return -1
            offset = max(offset + 1, self._window_end() - match_bytes_max + 1)
            self._load(offset, io_chunk_bytes)
        return -1

    def _window_end(self) -> int:
        return self._window_offset + len(self._window)

    def _load(self, offset: int, length: int) -> None:
        self._window = _pread_exact(self._fd, max(length, io_chunk_bytes), offset)
        self._window_offset = offset


def _read_record(reader: _WindowReader, offset: int) -> tuple[_Record | None, str]:
    header = reader.read(offset, record_header.size)
    if len(header) < record_header.size:
        return None, "incomplete record header"
    payload_length, index, term = record_header.unpack(header)
    if payload_length > record_payload_bytes_max:
        return None, f"payload length {payload_length} above record_payload_bytes_max"
    total = record_overhead_bytes + payload_length
    if offset + total > reader.size:
        return None, "record extends past the end of the file"
    body = memoryview(reader.read(offset, total))
    if _digest(body[:-digest_bytes]) != body[-digest_bytes:]:
        return None, "digest mismatch"
    payload = bytes(body[record_header.size:-digest_bytes])
    return _Record(offset, payload_length, index, term, payload), ""


def _index_field_pattern(index_low: int, index_high: int) -> re.Pattern[bytes]:
    """Matches where an index field in [index_low, index_high] could start.

    The big-endian bytes the two bounds share must be there; when those are all zero, one of
    the remaining bytes must not be (index 0 is never written), so runs of zeros, common in
    a torn tail, are skipped by the regex engine instead of offset by offset in Python.
    """
    low_bytes = struct.pack(">Q", index_low)
    high_bytes = struct.pack(">Q", index_high)
    shared = 0
    while shared < record_index_field_bytes and low_bytes[shared] == high_bytes[shared]:
        shared += 1
    prefix = re.escape(low_bytes[:shared])
    if any(low_bytes[:shared]) or shared == record_index_field_bytes:
        return re.compile(prefix, re.DOTALL)
    rest_bytes = record_index_field_bytes - shared
    return re.compile(prefix + rb"(?=.{0,%d}[^\x00])" % (rest_bytes - 1), re.DOTALL)


def _find_record(
    reader: _WindowReader, offset: int, index_low: int, index_high: int, term_low: int
) -> _Record | None:
    """First well-formed record at or after offset whose index and term could follow the log.

    A genuine record's index lies in [index_low, index_high]; searching for index fields that
    could hold such a value skips most offsets without parsing them.
    """
    pattern = _index_field_pattern(index_low, index_high)
    while offset + record_overhead_bytes <= reader.size:
        hit = reader.find(
            pattern, offset + record_index_field_offset_bytes, record_index_field_bytes
        )
        if hit < 0:
            return None
        candidate = hit - record_index_field_offset_bytes
        header = reader.read(candidate, record_header.size)
        if len(header) < record_header.size:
            return None
        _, index, term = record_header.unpack(header)
        if index_low <= index <= index_high and term >= term_low:
            record, _ = _read_record(reader, candidate)
            if record is not None:
                return record
        offset = candidate + 1
    return None


def _check_file_header(fd: int, path: Path) -> None:
    header = _pread_exact(fd, file_header.size, 0)
    if len(header) < file_header.size:
        raise JournalCorrupted(
            f"{path}: file header is {len(header)} bytes, expected {file_header.size}"
        )
    magic, version, reserved = file_header.unpack(header)
    if magic != log_magic:
        raise JournalCorrupted(f"{path}: magic is {magic!r}, expected {log_magic!r}")
    if version != log_format_version:
        raise JournalCorrupted(
            f"{path}: format version {version} is not supported (expected {log_format_version})"
        )
    if reserved != 0:
        raise JournalCorrupted(f"{path}: reserved header field is {reserved}, expected 0")


def _scan_log(fd: int, path: Path) -> _ScanResult:
    """Verify every record; report where the valid prefix ends and what lies behind it."""
    _check_file_header(fd, path)
    reader = _WindowReader(fd, os.fstat(fd).st_size)
    terms, offsets, payload_lengths = array("Q"), array("Q"), array("L")
    tail_cache = _TailCache()
    first_index = 0
    offset = file_header.size
    problem: str | None = None
    previous: _Record | None = None
    while offset < reader.size:
        record, problem = _read_record(reader, offset)
        if record is not None and previous is not None:
            if record.index != previous.index + 1:
                problem = f"raft index {record.index} does not follow {previous.index}"
            elif record.term < previous.term:
                problem = f"term {record.term} is below the previous term {previous.term}"
        if problem:
            break
        assert record is not None
        if previous is None:
            first_index = record.index
        terms.append(record.term)
        offsets.append(record.offset)
        payload_lengths.append(record.payload_length)
        tail_cache.append(record.index, record.payload)
        previous = record
        offset = record.end_offset
    index_after_hole_max = None
    if problem:
        index_after_hole_max = _highest_index_after(reader, offset, previous)
    return _ScanResult(
        first_index=first_index,
        terms=terms,
        offsets=offsets,
        payload_lengths=payload_lengths,
        tail_cache=tail_cache,
        valid_end_offset=offset,
        file_size=reader.size,
        problem=problem or None,
        index_after_hole_max=index_after_hole_max,
    )


def _highest_index_after(
    reader: _WindowReader, bad_offset: int, last_good: _Record | None
) -> int | None:
    """The highest raft index among well-formed records behind a bad one, or None."""
    index_low = last_good.index + 1 if last_good is not None else 1
    term_low = last_good.term if last_good is not None else 0
    # Without a record before the hole nothing says where indexes start (the log may
    # have been compacted), so the first search accepts any index.
    bounded = last_good is not None
    highest = None
    offset = bad_offset + 1
    while index_low <= raft_index_max:
        # Each record takes at least record_overhead_bytes, which bounds how far indexes
        # can climb in the rest of the file.
        index_high = raft_index_max
        if bounded:
            index_high = min(
                raft_index_max, index_low + (reader.size - offset) // record_overhead_bytes
            )
        record = _find_record(reader, offset, index_low, index_high, term_low)
        if record is None:
            return highest
        highest = record.index
        index_low, term_low, bounded = record.index + 1, record.term, True
        offset = record.end_offset
    return highest


class JournalView(Sequence[JournalEntry]):
    """A lazy slice of the journal: commands are read only when an entry is accessed."""

    __slots__ = ("_journal", "_positions", "_generation")

    def __init__(self, journal: DurableJournal, positions: range, generation: int) -> None:
        self._journal = journal
        self._positions = positions
        self._generation = generation

    def __len__(self) -> int:
        return len(self._positions)

    @overload
    def __getitem__(self, item: int) -> JournalEntry: ...

    @overload
    def __getitem__(self, item: slice) -> JournalView: ...

    def __getitem__(self, item: int | slice) -> JournalEntry | JournalView:
        self._journal._check_view(self._generation)
        if isinstance(item, slice):
            return JournalView(self._journal, self._positions[item], self._generation)
        return self._journal._entry(self._positions[item])

    def __iter__(self) -> Iterator[JournalEntry]:
        for position in self._positions:
            self._journal._check_view(self._generation)
            yield self._journal._entry(position)

    def __repr__(self) -> str:
        return f"JournalView(positions={self._positions!r})"


class DurableJournal:
    """pysyncobj's journal interface over fsynced, checksummed files.

    Single-threaded: pysyncobj's tick thread owns it (the adapter's before_send hook runs in
    that thread too).
    """

    def __init__(
        self,
        directory: Path,
        *,
        fsync_enabled: bool = True,
        observer: JournalObserver | None = None,
    ) -> None:
        self._directory = Path(directory)
        self._log_path = self._directory / log_file_name
        self._meta_path = self._directory / meta_file_name
        self._fsync_enabled = fsync_enabled
        self._observer: JournalObserver = observer or NullJournalObserver()
        self._fd: int | None = None
        self._failure: OSError | None = None
        self._first_index = 0
        self._terms: array[int] = array("Q")
        self._offsets: array[int] = array("Q")
        self._payload_lengths: array[int] = array("L")
        self._end_offset = file_header.size
        self._tail_cache = _TailCache()
        self._dirty = False
        self._unsynced_bytes = 0
        # Bumped by every change that moves or removes positions, so older views refuse use.
        self._generation = 0
        self._meta = JournalMeta(0, None, commit_index_default, 0)
        self._commit_index = commit_index_default
        self._open()

    # -- pysyncobj interface -------------------------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        """Append an entry (not yet durable: call sync() before acknowledging it)."""
        self._check_writable()
        self._check_new_entry(command, idx, term)
        header = record_header.pack(len(command), idx, term)
        record_bytes = record_overhead_bytes + len(command)
        self._append([header, command, _digest(header, command)], record_bytes)
        if not self._terms:
            self._first_index = idx
        self._terms.append(term)
        self._offsets.append(self._end_offset)
        self._payload_lengths.append(len(command))
        self._end_offset += record_bytes
        self._tail_cache.append(idx, bytes(command))
        self._dirty = True
        self._unsynced_bytes += record_bytes

    def clear(self) -> None:
        """Drop every entry, durably."""
        self._truncate_after(0)

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        """Durably drop positions [entryFrom, len) (a follower's conflicting suffix)."""
        _check_position("entryFrom", entryFrom)
        if entryFrom < len(self):
            self._truncate_after(entryFrom)

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Drop positions [0, entryTo) by rewriting the kept suffix; crash-atomic."""
        _check_position("entryTo", entryTo)
        if entryTo == 0:
            return
        if entryTo >= len(self):
            self.clear()
            return
        self._compact(entryTo)

    @overload
    def __getitem__(self, item: int) -> JournalEntry: ...

    @overload
    def __getitem__(self, item: slice) -> JournalView: ...

    def __getitem__(self, item: int | slice) -> JournalEntry | JournalView:
        positions = range(len(self._terms))
        if isinstance(item, slice):
            return JournalView(self, positions[item], self._generation)
        return self._entry(positions[item])

    def __len__(self) -> int:
        return len(self._terms)

    def _destroy(self) -> None:
        """Sync the log, persist a changed commit index and close the file."""
        if self._fd is None:
            return
        try:
            if self._failure is None:
                self.sync()
                self._persist_commit_index()
        finally:
            os.close(self._fd)
            self._fd = None

    def flush(self) -> None:
        """pysyncobj's name for sync()."""
        self.sync()

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        """Remember the commit index; onOneSecondTimer persists it."""
        _check_position("raftCommitIndex", raftCommitIndex)
        self._commit_index = raftCommitIndex

    def getRaftCommitIndex(self) -> int:
        return self._commit_index

    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:
        """Persist term and vote durably before returning (Raft: before any vote is sent)."""
        self._check_writable()
        _check_position("term", term)
        if votedForNodeId is not None and type(votedForNodeId) is not str:
            raise JournalInputRefused(
                f"votedForNodeId must be a str or None, not {votedForNodeId!r}"
            )
        if term < self._meta.term:
            raise JournalInputRefused(f"term {term} is below the current term {self._meta.term}")
        voted_for = self._meta.voted_for
        if term == self._meta.term and voted_for is not None and votedForNodeId != voted_for:
            raise JournalInputRefused(f"already voted for {voted_for!r} in term {term}")
        self._write_meta(replace(self._meta, term=term, voted_for=votedForNodeId))

    def getCurrentTerm(self) -> int:
        return self._meta.term

    def getVotedForNodeId(self) -> str | None:
        return self._meta.voted_for

    def onOneSecondTimer(self) -> None:
        """Persist the commit index if it changed since it was last written."""
        self._persist_commit_index()

    # -- ours ----------------------------------------------------------------------------

    def sync(self) -> bool:
        """fdatasync the log if anything was appended since the last sync; return whether it did."""
        self._check_writable()
        if not self._dirty:
            return False
        self._sync_log()
        return self._fsync_enabled

    @property
    def dirty(self) -> bool:
        return self._dirty

    @property
    def recovery_floor_index(self) -> int:
        """Votes must wait until the log reaches this index again (0: no floor)."""
        return self._meta.recovery_floor_index

    def clear_recovery_floor(self) -> None:
        """Persist floor 0 once the adapter has seen the log re-filled up to the floor."""
        self._check_writable()
        if self._meta.recovery_floor_index != 0:
            self._write_meta(replace(self._meta, recovery_floor_index=0))

    @property
    def first_index(self) -> int:
        return self._first_index if self._terms else 0

    @property
    def last_index(self) -> int:
        return self._first_index + len(self._terms) - 1 if self._terms else 0

    def term_at(self, index: int) -> int | None:
        """The term of the entry at Raft index `index`, or None when this journal does not hold it."""
        position = index - self._first_index
        if not self._terms or position < 0 or position >= len(self._terms):
            return None
        return self._terms[position]

    # -- entries -------------------------------------------------------------------------

    def _entry(self, position: int) -> JournalEntry:
        index = self._first_index + position
        command = self._tail_cache.get(index)
        if command is None:
            command = self._load_command(position)
        return (command, index, self._terms[position])

    def _load_command(self, position: int) -> bytes:
        """Read an evicted command from the file, verifying its digest on every read."""
        if self._fd is None:
            raise JournalClosed(f"{self._log_path}: journal is closed")
        offset = self._offsets[position]
        payload_length = self._payload_lengths[position]
        body = memoryview(_pread_exact(self._fd, record_overhead_bytes + payload_length, offset))
        index, term = self._first_index + position, self._terms[position]
        problem = ""
        if len(body) != record_overhead_bytes + payload_length:
            problem = "record is shorter than when it was written"
        elif record_header.unpack(body[:record_header.size]) != (payload_length, index, term):
            problem = "record header changed since it was written"
        elif _digest(body[:-digest_bytes]) != body[-digest_bytes:]:
            problem = "digest mismatch"
        if problem:
            self._observer.corruption_detected(position, offset, problem)
            raise JournalCorrupted(
                f"{self._log_path}: record at position {position} (raft index {index}, "
                f"offset {offset}): {problem}"
            )
        return bytes(body[record_header.size:-digest_bytes])

    def _check_view(self, generation: int) -> None:
        if generation != self._generation:
            raise StaleJournalView(
                "the journal was truncated, compacted or cleared after this view was taken"
            )

    def _check_new_entry(self, command: bytes, idx: int, term: int) -> None:
        if not isinstance(command, bytes):
            raise JournalInputRefused(f"command must be bytes, not {type(command).__name__}")
        if len(command) > record_payload_bytes_max:
            raise JournalInputRefused(
                f"command of {len(command)} bytes is above record_payload_bytes_max "
                f"({record_payload_bytes_max})"
            )
        if type(idx) is not int or not 1 <= idx <= raft_index_max:
            raise JournalInputRefused(f"idx must be an int in [1, 2**64), not {idx!r}")
        if type(term) is not int or not 0 <= term <= raft_index_max:
            raise JournalInputRefused(f"term must be an int in [0, 2**64), not {term!r}")
        if self._terms and idx != self.last_index + 1:
            raise JournalInputRefused(f"idx {idx} does not follow the last index {self.last_index}")
        if self._terms and term < self._terms[-1]:
            raise JournalInputRefused(
                f"term {term} is below the last entry's term {self._terms[-1]}"
            )

    # -- writing -------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._fd is None:
            raise JournalClosed(f"{self._log_path}: journal is closed")
        if self._failure is not None:
            raise JournalFailed(
                f"{self._log_path}: an earlier write or sync failed ({self._failure}); "
                "restart and recover from the files and the cluster"
            ) from self._failure

    def _append(self, parts: list[bytes], total_bytes: int) -> None:
        """Append one record; on error, cut any partial write so no torn record stays behind."""
        assert self._fd is not None
        try:
            written = os.writev(self._fd, parts)
            if written < total_bytes:
                _write_all(self._fd, memoryview(b"".join(parts))[written:])
        except OSError:
            try:
                os.ftruncate(self._fd, self._end_offset)
            except OSError as truncate_error:
                self._fail(truncate_error)
            raise

    def _truncate_after(self, position: int) -> None:
        """Keep positions [0, position), durably."""
        self._check_writable()
        assert self._fd is not None
        new_end_offset = self._offsets[position] if position < len(self) else self._end_offset
        os.ftruncate(self._fd, new_end_offset)
        unsynced_start_offset = self._end_offset - self._unsynced_bytes
        self._unsynced_bytes = max(0, new_end_offset - unsynced_start_offset)
        self._tail_cache.drop_from(self._first_index + position)
        del self._terms[position:]
        del self._offsets[position:]
        del self._payload_lengths[position:]
        if not self._terms:
            self._first_index = 0
        self._end_offset = new_end_offset
        self._generation += 1
        self._dirty = True
        self._sync_log()

    def _compact(self, position: int) -> None:
        """Rewrite positions [position, len) into a new file and swap it in atomically."""
        self._check_writable()
        assert self._fd is not None
        temporary_path = self._log_path.with_name(log_file_name + temporary_suffix)
        keep_offset = self._offsets[position]
        new_fd = os.open(
            temporary_path,
            os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC,
            0o644,
        )
        try:
            _write_all(new_fd, file_header.pack(log_magic, log_format_version, 0))
            self._copy_range(new_fd, keep_offset, self._end_offset)
            self._fsync(new_fd, file_header.size + self._end_offset - keep_offset)
            os.replace(temporary_path, self._log_path)
        except BaseException:
            os.close(new_fd)
            temporary_path.unlink(missing_ok=True)
            raise
        # The name now points at the new file: adopt it before anything else can fail.
        os.close(self._fd)
        self._fd = new_fd
        shift = keep_offset - file_header.size
        self._tail_cache.drop_below(self._first_index + position)
        self._first_index += position
        del self._terms[:position]
        del self._payload_lengths[:position]
        self._offsets = array("Q", (offset - shift for offset in self._offsets[position:]))
        self._end_offset -= shift
        self._generation += 1
        self._dirty = False
        self._unsynced_bytes = 0
        self._fsync_directory()

    def _copy_range(self, destination_fd: int, start_offset: int, end_offset: int) -> None:
        assert self._fd is not None
        offset = start_offset
        while offset < end_offset:
            chunk = os.pread(self._fd, min(io_chunk_bytes, end_offset - offset), offset)
            if not chunk:
                raise JournalCorrupted(
                    f"{self._log_path}: file ended at offset {offset} during compaction"
                )
            _write_all(destination_fd, chunk)
            offset += len(chunk)

    def _sync_log(self) -> None:
        assert self._fd is not None
        self._fsync(self._fd, self._unsynced_bytes)
        self._dirty = False
        self._unsynced_bytes = 0

    def _fsync(self, fd: int, bytes_written: int) -> None:
        """fdatasync log data; a failure poisons the journal (retrying a failed fsync lies)."""
        if not self._fsync_enabled:
            return
        started = time.perf_counter()
        try:
            os.fdatasync(fd)
        except OSError as error:
            self._fail(error)
            raise JournalFailed(f"{self._log_path}: fdatasync failed: {error}") from error
        self._observer.fsync_completed(time.perf_counter() - started, bytes_written)

    def _fsync_directory(self) -> None:
        if not self._fsync_enabled:
            return
        directory_fd = os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory_fd)
        except OSError as error:
            self._fail(error)
            raise JournalFailed(f"{self._directory}: directory fsync failed: {error}") from error
        finally:
            os.close(directory_fd)

    def _fail(self, error: OSError) -> None:
        logger.critical("journal %s is unusable after an IO error: %s", self._log_path, error)
        self._failure = error

    # -- meta ----------------------------------------------------------------------------

    def _persist_commit_index(self) -> None:
        self._check_writable()
        if self._clamped_commit_index() != self._meta.commit_index:
            self._write_meta(self._meta)

    def _clamped_commit_index(self) -> int:
        if self._terms and self._commit_index > self.last_index:
            return self.last_index
        return self._commit_index

    def _write_meta(self, meta: JournalMeta) -> None:
        """Write raft.meta via temp file + fsync + rename + directory fsync."""
        meta = replace(meta, commit_index=self._clamped_commit_index())
        data = encode_meta(meta)
        if len(data) > meta_file_bytes_max:
            raise JournalInputRefused(f"meta of {len(data)} bytes is above meta_file_bytes_max")
        # A persisted commit index must never run ahead of the durable log.
        self.sync()
        temporary_path = self._meta_path.with_name(meta_file_name + temporary_suffix)
        self._write_file_atomically(temporary_path, self._meta_path, data)
        self._meta = meta

    def _write_file_atomically(self, temporary_path: Path, path: Path, data: bytes) -> None:
        fd = os.open(temporary_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, data)
            if self._fsync_enabled:
                try:
                    os.fsync(fd)
                except OSError as error:
                    self._fail(error)
                    raise JournalFailed(f"{temporary_path}: fsync failed: {error}") from error
            os.replace(temporary_path, path)
        except BaseException:
            temporary_path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self._fsync_directory()

    # -- opening -------------------------------------------------------------------------

    def _open(self) -> None:
        self._create_directory()
        for stale in (log_file_name, meta_file_name):
            # A leftover temp file is an interrupted rewrite; the real file is still whole.
            (self._directory / (stale + temporary_suffix)).unlink(missing_ok=True)
        meta_exists = self._meta_path.exists()
        if not self._log_path.exists():
            if meta_exists:
                raise JournalCorrupted(f"{self._log_path} is missing but {self._meta_path} exists")
            self._create_log()
        self._fd = os.open(self._log_path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        try:
            scan = _scan_log(self._fd, self._log_path)
            if meta_exists:
                self._meta = decode_meta(self._read_meta_bytes(), self._meta_path)
            elif scan.offsets or scan.problem:
                raise JournalCorrupted(
                    f"{self._meta_path} is missing but {self._log_path} has records"
                )
            self._adopt(scan)
            if not meta_exists:
                self._write_meta(self._meta)
            self._recover(scan)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise

    def _create_directory(self) -> None:
        try:
            self._directory.mkdir(mode=0o700)
        except FileExistsError:
            return
        if self._fsync_enabled:
            parent_fd = os.open(self._directory.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(parent_fd)
            finally:
                os.close(parent_fd)

    def _create_log(self) -> None:
        temporary_path = self._log_path.with_name(log_file_name + temporary_suffix)
        header = file_header.pack(log_magic, log_format_version, 0)
        self._write_file_atomically(temporary_path, self._log_path, header)

    def _read_meta_bytes(self) -> bytes:
        with open(self._meta_path, "rb", buffering=0) as meta_file:
            return meta_file.read(meta_file_bytes_max + 1)

    def _adopt(self, scan: _ScanResult) -> None:
        self._first_index = scan.first_index
        self._terms = scan.terms
        self._offsets = scan.offsets
        self._payload_lengths = scan.payload_lengths
        self._tail_cache = scan.tail_cache
        self._end_offset = scan.valid_end_offset
        if self._terms:
            self._commit_index = min(self._meta.commit_index, self.last_index)
        else:
            self._commit_index = commit_index_default

    def _recover(self, scan: _ScanResult) -> None:
        """Cut a torn tail or a hole; after a hole, persist a floor that blocks voting."""
        if scan.problem is None:
            return
        bad_offset = scan.valid_end_offset
        if scan.index_after_hole_max is None:
            self._truncate_file(bad_offset)
            logger.warning(
                "journal %s: torn tail at offset %d (%s), dropped %d bytes",
                self._log_path, bad_offset, scan.problem, scan.file_size - bad_offset,
            )
            self._observer.torn_tail_truncated(bad_offset, scan.file_size - bad_offset)
            return
        floor = max(
            scan.index_after_hole_max, self._meta.commit_index, self._meta.recovery_floor_index
        )
        # The floor goes to disk before the records behind the hole are cut: a crash in
        # between must not leave a clean-looking short log without a floor.
        self._write_meta(replace(self._meta, recovery_floor_index=floor))
        self._truncate_file(bad_offset)
        logger.error(
            "journal %s: corrupt record at position %d, offset %d (%s); dropped everything "
            "after it (valid records up to raft index %d followed); recovery floor %d",
            self._log_path, len(self), bad_offset, scan.problem, scan.index_after_hole_max, floor,
        )
        self._observer.corruption_detected(len(self), bad_offset, scan.problem)

    def _truncate_file(self, offset: int) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, offset)
        self._dirty = True
        self._sync_log()


def _check_position(name: str, value: int) -> None:
    if type(value) is not int or value < 0:
        raise JournalInputRefused(f"{name} must be a non-negative int, not {value!r}")
