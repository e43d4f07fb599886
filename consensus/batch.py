"""The Raft entry payload: a batch of signed entries stamped by the proposing leader."""

from __future__ import annotations

from dataclasses import dataclass

from consensus.codec import CodecError, is_integer, pack, unpack
from consensus.entries import entry_bytes_max

batch_format_version = 1

# One batch is one pysyncobj log entry. pysyncobj sends an entry of appendEntriesBatchSizeBytes (64 KiB)
# or more through a chunked path that marks its last chunk with the wrong length (research/pysyncobj.md
# §7.2 B1) and unpickles the reassembled chunks. Batches stay well under that threshold, and the wire codec
# refuses the chunked variant outright.
batch_bytes_max = 57344
batch_entries_max = 4096
# Header room: format version, time, checkpoint (index + 32-byte hash) and array headers.
batch_overhead_bytes_max = 96


class BatchError(ValueError):
    """A batch payload that is not a well-formed batch. Deterministic: every node refuses it alike."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The proposer's own (applied index, state hash), so every replica can compare its history."""

    index: int
    state_hash: bytes


@dataclass(frozen=True, slots=True)
class Batch:
    proposer_time_ms: int
    checkpoint: Checkpoint | None
    entries: tuple[bytes, ...]


def encode_batch(batch: Batch) -> bytes:
    checkpoint = None if batch.checkpoint is None else [batch.checkpoint.index, batch.checkpoint.state_hash]
    raw = pack([batch_format_version, batch.proposer_time_ms, checkpoint, list(batch.entries)])
    if len(raw) > batch_bytes_max:
        raise BatchError(f"batch is {len(raw)} bytes; the limit is {batch_bytes_max}")
    return raw


def decode_batch(raw: bytes) -> Batch:
    if len(raw) > batch_bytes_max:
        raise BatchError(f"batch is {len(raw)} bytes; the limit is {batch_bytes_max}")
    try:
        fields = unpack(raw)
    except CodecError as error:
        raise BatchError(str(error)) from None
    if type(fields) is not list or len(fields) != 4:
        raise BatchError("a batch is an array of 4 fields")
    version, proposer_time_ms, checkpoint, entries = fields
    if not is_integer(version) or version != batch_format_version:
        raise BatchError(f"unsupported batch format version {version!r}")
    if not is_integer(proposer_time_ms) or proposer_time_ms < 0:
        raise BatchError("proposer time must be a non-negative integer")
    decoded_checkpoint = None
    if checkpoint is not None:
        if (
            type(checkpoint) is not list
            or len(checkpoint) != 2
            or not is_integer(checkpoint[0])
            or checkpoint[0] < 0
            or type(checkpoint[1]) is not bytes
        ):
            raise BatchError("a checkpoint is [index, state hash]")
        decoded_checkpoint = Checkpoint(checkpoint[0], checkpoint[1])
    if type(entries) is not list or len(entries) > batch_entries_max:
        raise BatchError(f"entries must be an array of at most {batch_entries_max}")
    for entry in entries:
        if type(entry) is not bytes or len(entry) > entry_bytes_max:
            raise BatchError(f"each entry must be bytes of at most {entry_bytes_max}")
    return Batch(proposer_time_ms, decoded_checkpoint, tuple(entries))


def encoded_size(entries_bytes: int, entry_count: int) -> int:
    """An upper bound on the encoded size of a batch holding entries of `entries_bytes` in total.

    Lets the proposer decide whether one more entry fits without encoding the batch again.
    """
    per_entry_header_bytes_max = 3  # msgpack bin 8/16 header for entries up to entry_bytes_max
    return batch_overhead_bytes_max + entries_bytes + entry_count * per_entry_header_bytes_max
