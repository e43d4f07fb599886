"""Snapshot files: an LMDB image of the ledger state with the Raft position it covers, in our own format."""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import lmdb

from consensus.codec import CodecError, is_integer, pack, unpack
from storage.state import LedgerStore, StorageCorrupted

snapshot_magic = b"TONLESNP"
snapshot_format_version = 1
snapshot_header_bytes_max = 1 << 20
snapshot_digest_bytes = 32
snapshot_image_bytes_max = 1 << 40
_prefix = struct.Struct(">8sII")
_image_length = struct.Struct(">Q")
_copy_chunk_bytes = 1 << 20
# The page cache holds a file in folios of up to 2 MiB (x86-64 large folios) and drops only folios wholly
# inside an advised range, so each drop reaches back this far over the previous chunk's boundary.
_drop_overlap_bytes = 8 << 20

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
    """Write header + a compact copy of the LMDB environment + a digest over both, then fsync.

    `as_of` is the read transaction the header's applied index and state hash were read from, so the image
    is exactly the state the header describes while the apply goes on writing.
    """
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".snapshot-") as scratch:
        image_directory = Path(scratch)
        store.copy_to(image_directory, as_of)
        image = image_directory / "data.mdb"
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
            prefix = _prefix.pack(snapshot_magic, snapshot_format_version, len(encoded_header))
            image_length = _image_length.pack(image.stat().st_size)
            for part in (prefix, encoded_header, image_length):
                output.write(part)
                digest.update(part)
            with open(image, "rb") as source:
                for chunk in _read_dropping_behind(source, image.stat().st_size):
                    output.write(chunk)
                    digest.update(chunk)
            output.write(digest.digest())
            output.flush()
            os.fsync(output.fileno())
            # Written pages stay cached once on disk; the file is read again only to be sent or installed.
            os.posix_fadvise(output.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


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
            if version != snapshot_format_version:
                raise SnapshotError(f"unsupported snapshot format version {version}")
            if header_length > snapshot_header_bytes_max:
                raise SnapshotError(f"snapshot header of {header_length} bytes is over the limit")
            encoded_header = source.read(header_length)
            image_length_bytes = source.read(_image_length.size)
            if len(encoded_header) != header_length or len(image_length_bytes) != _image_length.size:
                raise SnapshotError("snapshot is truncated")
            (image_length,) = _image_length.unpack(image_length_bytes)
            image_offset = _prefix.size + header_length + _image_length.size
            if image_length > snapshot_image_bytes_max or image_offset + image_length + snapshot_digest_bytes != size:
                raise SnapshotError("snapshot length does not match its header")
            digest = hashlib.blake2b(digest_size=snapshot_digest_bytes, person=b"tonle-snapshot1")
            for part in (prefix, encoded_header, image_length_bytes):
                digest.update(part)
            for chunk in _read_dropping_behind(source, image_length):
                digest.update(chunk)
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
    """Replace the store's contents with the snapshot image in one write transaction.

    The image is opened read-only from a scratch copy; every record's checksum is verified as it is
    copied, and the state hash recomputed from the copied records must equal the one the snapshot claims,
    so damaged or forged state is refused before anything is committed.
    """
    with tempfile.TemporaryDirectory(dir=store.path.parent, prefix=".install-") as scratch:
        image_path = Path(scratch) / "data.mdb"
        with open(path, "rb") as source, open(image_path, "wb") as output:
            source.seek(image_offset)
            for chunk in _read_dropping_behind(source, image_length):
                output.write(chunk)
        try:
            image = LedgerStore(Path(scratch), map_size_bytes=max(image_length, 1 << 20), readonly=True)
        except lmdb.Error as error:
            raise SnapshotError(f"snapshot image is not a valid LMDB environment: {error}") from None
        try:
            with image.read() as reader, store.write() as transaction:
                transaction.replace_all(reader.dump())
                if transaction.recompute_state_hash() != header.state_hash:
                    raise StorageCorrupted("snapshot records do not hash to the state hash it claims")
                if transaction.state_hash() != header.state_hash:
                    raise StorageCorrupted("snapshot's recorded state hash is not the one its header claims")
                if transaction.applied_index() != header.applied_index:
                    raise StorageCorrupted("snapshot state is not at the index its header claims")
        finally:
            image.close()


def restore_from_snapshot(path: Path, store: LedgerStore, cluster_id: str) -> tuple[SnapshotHeader, bool]:
    """Roll the store forward to a snapshot, never back. Returns the header and whether it was installed.

    pysyncobj hands its deserializer every snapshot it loads, at start-up and from a leader, and would
    then set its applied index to the snapshot's even when that is older than what this node applied
    (research/pysyncobj.md §4.5). Keeping the newer local state is safe: applied entries are committed,
    and the apply skips every index at or below the one the store records.
    """
    header, image_offset, image_length = read_header(path)
    if header.cluster_id != cluster_id:
        raise SnapshotError(f"snapshot is for network {header.cluster_id!r}, not {cluster_id!r}")
    if header.applied_index <= store.summary().applied_index:
        return header, False
    install_snapshot(path, header, image_offset, image_length, store)
    return header, True
