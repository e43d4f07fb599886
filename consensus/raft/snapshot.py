"""Snapshot files: an LMDB image of the ledger state with the Raft position it covers, in our own format."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import lmdb

from consensus.codec import CodecError, is_integer, pack, unpack
from storage.state import (
    LedgerStore,
    StateTransaction,
    StorageCorrupted,
    replacement_scratch_prefix,
    schema_version,
    write_environment_in_full_pages,
)

snapshot_magic = b"TONLESNP"
# Version 1 put the image's length before the image; version 2 puts it after, so a writer can stream the
# image from LMDB into the file. Both are read: a node upgraded in place keeps the snapshot it has.
snapshot_format_version = 2
snapshot_format_versions_readable = (1, 2)
snapshot_header_bytes_max = 1 << 20
snapshot_digest_bytes = 32
snapshot_image_bytes_max = 1 << 40
_prefix = struct.Struct(">8sII")
_image_length = struct.Struct(">Q")
_copy_chunk_bytes = 1 << 20
# The page cache holds a file in folios of up to 2 MiB (x86-64 large folios) and drops only folios wholly
# inside an advised range, so each drop reaches back this far over the previous chunk's boundary.
_drop_overlap_bytes = 8 << 20
# While a snapshot is written, every this many bytes are handed to writeback and then dropped from the cache.
_write_flush_bytes = 64 << 20
# The pipe LMDB streams the image through (the kernel's default is 64 KiB; larger means fewer wake-ups).
_pipe_bytes = 1 << 20

# pysyncobj's log entries are (command bytes, raft index, raft term) tuples.
RaftEntry = tuple[bytes, int, int]


class SnapshotError(ValueError):
    """A snapshot file that is not a well-formed, intact Tonle snapshot."""


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    cluster_id: str
    last_entry: RaftEntry
    previous_entry: RaftEntry
    voters: tuple[str, ...]
    applied_index: int
    state_hash: bytes


def _read_dropping_behind(source: BinaryIO, length: int) -> Iterator[bytes]:
    """Read `length` bytes in chunks, dropping each from the page cache once read. A snapshot is as large as
    the state and is read whole (verified at every start, copied on install): read through the cache it
    would evict the account and index pages the apply needs, and the node would then read them from disk."""
    descriptor = source.fileno()
    position = source.tell()
    end = position + length
    while position < end:
        chunk = source.read(min(_copy_chunk_bytes, end - position))
        if not chunk:
            raise SnapshotError("snapshot is truncated")
        low = max(0, position - _drop_overlap_bytes)
        position += len(chunk)
        os.posix_fadvise(descriptor, low, position - low, os.POSIX_FADV_DONTNEED)
        yield chunk
    os.posix_fadvise(descriptor, max(0, position - _drop_overlap_bytes), 0, os.POSIX_FADV_DONTNEED)  # 0: to the end


def _entry_fields(entry: RaftEntry) -> list:
    command, index, term = entry
    return [bytes(command), index, term]


def _parse_entry(fields: object) -> RaftEntry:
    if (
        type(fields) is not list
        or len(fields) != 3
        or type(fields[0]) is not bytes
        or not is_integer(fields[1])
        or not is_integer(fields[2])
        or fields[1] < 0
        or fields[2] < 0
    ):
        raise SnapshotError("a raft entry in the header is not [command, index, term]")
    return (fields[0], fields[1], fields[2])


def write_snapshot(path: Path, store: LedgerStore, header: SnapshotHeader, as_of: StateTransaction | None = None) -> None:
    """Write header + a compact copy of the LMDB environment + its length + a digest over all, then fsync.

    `as_of` is the read transaction the header's applied index and state hash were read from, so the image
    is exactly the state the header describes while the apply goes on writing.
    """
    encoded_header = pack(
        [
            header.cluster_id,
            _entry_fields(header.last_entry),
            _entry_fields(header.previous_entry),
            list(header.voters),
            header.applied_index,
            header.state_hash,
        ]
    )
    digest = hashlib.blake2b(digest_size=snapshot_digest_bytes, person=b"tonle-snapshot1")
    with open(path, "wb") as output:
        for part in (_prefix.pack(snapshot_magic, snapshot_format_version, len(encoded_header)), encoded_header):
            output.write(part)
            digest.update(part)
        length = _image_length.pack(_stream_image(store, as_of, output, digest))
        output.write(length)
        digest.update(length)
        output.write(digest.digest())
        output.flush()
        os.fsync(output.fileno())
        # Written pages stay cached once on disk; the file is read again only to be sent or installed.
        os.posix_fadvise(output.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _stream_image(store: LedgerStore, as_of: StateTransaction | None, output: BinaryIO, digest: Any) -> int:
    """Append a compact copy of the state to `output`, hashing it on the way; returns its length in bytes.

    LMDB writes the copy into a pipe on this thread (the one that owns `as_of`); a helper thread hashes it,
    appends it to the file, and every `_write_flush_bytes` starts writeback of what it wrote and drops it
    from the page cache a step later. So the image is written once, with no scratch copy as large as the
    state, and never fills the page cache. If the file cannot be written, the helper closes the pipe, LMDB's
    next write fails instead of blocking, and the helper's error is raised.
    """
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: the default size works too
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _pipe_bytes)
    outcome: dict[str, Any] = {}

    def drain() -> None:
        length = advised = 0
        try:
            while chunk := os.read(read_end, _copy_chunk_bytes):
                output.write(chunk)
                digest.update(chunk)
                length += len(chunk)
                if length - advised >= _write_flush_bytes:
                    # DONTNEED starts writing back the step just written, without waiting for it (no forced
                    # fsync for the apply's to queue behind), and drops the step before, written back by now.
                    output.flush()
                    end = output.tell()
                    low = max(0, end - 2 * (length - advised) - _drop_overlap_bytes)
                    os.posix_fadvise(output.fileno(), low, end - low, os.POSIX_FADV_DONTNEED)
                    advised = length
            outcome["length"] = length
        except BaseException as error:  # noqa: BLE001 - handed to the writing thread, which raises it
            outcome["error"] = error
        finally:
            os.close(read_end)

    helper = threading.Thread(target=drain, name="tonle-snapshot-stream", daemon=True)
    helper.start()
    try:
        store.copy_into(write_end, as_of)
    except lmdb.Error as copy_error:
        if "error" not in outcome:
            raise
        raise outcome["error"] from copy_error
    finally:
        os.close(write_end)
        helper.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["length"]


def read_header(path: Path) -> tuple[SnapshotHeader, int, int]:
    """Parse and verify a snapshot file. Returns the header, the image offset and the image length."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as source:
            prefix = source.read(_prefix.size)
            if len(prefix) != _prefix.size:
                raise SnapshotError("snapshot is shorter than its prefix")
            magic, version, header_length = _prefix.unpack(prefix)
            if magic != snapshot_magic:
                raise SnapshotError("not a Tonle snapshot (bad magic)")
            if version not in snapshot_format_versions_readable:
                raise SnapshotError(f"unsupported snapshot format version {version}")
            if header_length > snapshot_header_bytes_max:
                raise SnapshotError(f"snapshot header of {header_length} bytes is over the limit")
            encoded_header = source.read(header_length)
            if len(encoded_header) != header_length:
                raise SnapshotError("snapshot is truncated")
            image_offset = _prefix.size + header_length
            if version == 1:  # the image's length before the image
                image_length_bytes = source.read(_image_length.size)
                image_offset += _image_length.size
            else:  # after it, where a writer streaming the image knows it
                if size < image_offset + _image_length.size + snapshot_digest_bytes:
                    raise SnapshotError("snapshot is truncated")
                source.seek(size - snapshot_digest_bytes - _image_length.size)
                image_length_bytes = source.read(_image_length.size)
                source.seek(image_offset)
            if len(image_length_bytes) != _image_length.size:
                raise SnapshotError("snapshot is truncated")
            (image_length,) = _image_length.unpack(image_length_bytes)
            length_after_image = 0 if version == 1 else _image_length.size
            if (
                image_length > snapshot_image_bytes_max
                or image_offset + image_length + length_after_image + snapshot_digest_bytes != size
            ):
                raise SnapshotError("snapshot length does not match its header")
            digest = hashlib.blake2b(digest_size=snapshot_digest_bytes, person=b"tonle-snapshot1")
            for part in (prefix, encoded_header, image_length_bytes) if version == 1 else (prefix, encoded_header):
                digest.update(part)
            for chunk in _read_dropping_behind(source, image_length):
                digest.update(chunk)
            digest.update(source.read(length_after_image))
            if source.read(snapshot_digest_bytes) != digest.digest():
                raise SnapshotError("snapshot digest does not match: the file is damaged")
    except OSError as error:
        raise SnapshotError(f"cannot read snapshot {path}: {error}") from None
    try:
        fields = unpack(encoded_header)
    except CodecError as error:
        raise SnapshotError(f"snapshot header: {error}") from None
    if type(fields) is not list or len(fields) != 6:
        raise SnapshotError("snapshot header is not an array of 6 fields")
    cluster_id, last_entry, previous_entry, voters, applied_index, state_hash = fields
    if type(cluster_id) is not str or type(voters) is not list or any(type(v) is not str for v in voters):
        raise SnapshotError("snapshot header has fields of the wrong type")
    if not is_integer(applied_index) or type(state_hash) is not bytes:
        raise SnapshotError("snapshot header has fields of the wrong type")
    header = SnapshotHeader(
        cluster_id=cluster_id,
        last_entry=_parse_entry(last_entry),
        previous_entry=_parse_entry(previous_entry),
        voters=tuple(voters),
        applied_index=applied_index,
        state_hash=state_hash,
    )
    return header, image_offset, image_length


def install_snapshot(path: Path, header: SnapshotHeader, image_offset: int, image_length: int, store: LedgerStore) -> None:
    """Replace the store's state with the snapshot image, all at once or not at all.

    The image (an LMDB data file) is copied beside the state, opened read-only and checked in place: every
    record's checksum, no database this version does not know, the state hash recomputed from the records
    equal to the one the snapshot claims, its index and layout. Damaged or forged state is refused before
    the store is touched. The records are then appended to a new environment in bounded transactions
    (write_environment_in_full_pages: a single one would hold about the state's size in heap for the rest
    of the process), which takes the state's place (LedgerStore.replace_with).
    """
    with tempfile.TemporaryDirectory(dir=store.path.parent, prefix=replacement_scratch_prefix(store.path)) as scratch:
        image_directory = Path(scratch) / "image"
        image_directory.mkdir()
        with open(path, "rb") as source, open(image_directory / "data.mdb", "wb") as output:
            source.seek(image_offset)
            for chunk in _read_dropping_behind(source, image_length):
                output.write(chunk)
        try:
            image = LedgerStore(image_directory, map_size_bytes=max(image_length, 1 << 20), readonly=True)
        except lmdb.Error as error:
            raise SnapshotError(f"snapshot image is not a valid LMDB environment: {error}") from None
        state_directory = Path(scratch) / "state"
        try:
            with image.read() as reader:
                if reader.verify_records() != header.state_hash:
                    raise StorageCorrupted("snapshot records do not hash to the state hash it claims")
                if reader.state_hash() != header.state_hash:
                    raise StorageCorrupted("snapshot's recorded state hash is not the one its header claims")
                if reader.applied_index() != header.applied_index:
                    raise StorageCorrupted("snapshot state is not at the index its header claims")
                # A leader of another version may send a state this code would misread record by record.
                layout = reader.stored_schema_version()
                if layout != schema_version:
                    raise SnapshotError(
                        f"snapshot state is in layout {layout}; this node reads layout {schema_version}: "
                        "every node of a network must run a version with the same state layout"
                    )
                write_environment_in_full_pages(reader, state_directory, map_size_bytes=store.map_size_bytes())
        finally:
            image.close()
        store.replace_with(state_directory)


def restore_from_snapshot(
    path: Path, store: LedgerStore, cluster_id: str, verified: tuple[SnapshotHeader, int, int] | None = None
) -> tuple[SnapshotHeader, bool]:
    """Roll the store forward to a snapshot, never back. Returns the header and whether it was installed.

    pysyncobj hands its deserializer every snapshot it loads, at start-up and from a leader, and would
    then set its applied index to the snapshot's even when that is older than what this node applied
    (research/pysyncobj.md §4.5). Keeping the newer local state is safe: applied entries are committed,
    and the apply skips every index at or below the one the store records. `verified` is read_header's
    answer for this file, when the caller has it already.
    """
    header, image_offset, image_length = read_header(path) if verified is None else verified
    if header.cluster_id != cluster_id:
        raise SnapshotError(f"snapshot is for network {header.cluster_id!r}, not {cluster_id!r}")
    if header.applied_index <= store.summary().applied_index:
        return header, False
    install_snapshot(path, header, image_offset, image_length, store)
    return header, True
