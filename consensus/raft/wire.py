"""Strict, pickle-free msgpack codec for the pysyncobj Raft messages that Tonle puts on the wire."""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Final

import msgpack

wire_entry_bytes_max: Final = 60 * 2**10
wire_entries_max: Final = 4096
# pysyncobj sends snapshots in conf.logCompactionBatchSize chunks (64 KiB by default); the adapter
# must keep that setting at or below this bound or snapshot installs would be refused.
wire_snapshot_chunk_bytes_max: Final = 2**20

code_append_entries: Final = 1
code_install_snapshot: Final = 2
code_next_node_index: Final = 3
code_request_vote: Final = 4
code_response_vote: Final = 5
code_timeout_now: Final = 6

message_type_by_code: Final[Mapping[int, str]] = {
    code_append_entries: "append_entries",
    code_install_snapshot: "append_entries",
    code_next_node_index: "next_node_idx",
    code_request_vote: "request_vote",
    code_response_vote: "response_vote",
    code_timeout_now: "timeout_now",
}

_known_pysyncobj_types: Final = frozenset(
    {*message_type_by_code.values(), "apply_command", "apply_command_response"}
)
_append_entries_keys: Final = frozenset(
    {"type", "term", "commit_index", "prevLogIdx", "prevLogTerm", "entries"}
)
_install_snapshot_keys: Final = frozenset({"type", "term", "commit_index", "serialized"})
_next_node_index_keys: Final = frozenset({"type", "term", "next_node_idx", "reset", "success"})
_request_vote_keys: Final = frozenset({"type", "term", "last_log_index", "last_log_term"})
_term_only_keys: Final = frozenset({"type", "term"})

# Worst-case msgpack overhead: per entry an array header, a bin32 header and two uint64 (1+5+9+9);
# per message the outer array, the code, four uint64 fields and the entries array header.
_entry_overhead_bytes: Final = 24
_message_overhead_bytes: Final = 64
_read_chunk_bytes: Final = 2**16
_unsigned_64_max: Final = 2**64 - 1  # the largest integer msgpack can carry

# First bytes of msgpack maps and arrays. A leaf field must never start a container, so a hostile
# payload cannot make the decoder build nested lists: 4 MiB of 0x90 inside arrays would otherwise
# allocate about 250 MB of list objects.
_container_first_bytes: Final = frozenset([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])


class WireError(ValueError):
    """A message that cannot be encoded, or a payload that is not exactly one supported message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode_message(message: object) -> bytes:
    """Encode one pysyncobj message dict as a compact msgpack array; WireError if unsupported."""
    return _pack(_message_fields(message))


def encode_message_parts(message: object, part_bytes_max: int) -> tuple[bytes, ...]:
    """Encode a message, splitting an oversized append_entries into consecutive ones.

    pysyncobj bounds an append_entries by bytes, not by entry count, so a run of tiny entries (for
    example many leader no-ops) can exceed wire_entries_max; sending such a message nowhere would
    stall that follower forever. The parts are exactly what pysyncobj would have sent with a
    smaller appendEntriesBatchSizeBytes: each one's prevLogIdx/prevLogTerm is the previous part's
    last entry, so the follower checks log matching at every boundary.
    """
    fields = _message_fields(message, entries_max=None)
    if fields[0] != code_append_entries:
        payload = _pack(fields)
        if len(payload) > part_bytes_max:
            raise WireError(f"message of {len(payload)} bytes exceeds {part_bytes_max}")
        return (payload,)
    _, term, commit_index, previous_index, previous_term, entries = fields
    payloads: list[bytes] = []
    for part in _entry_parts(entries, part_bytes_max):
        payloads.append(
            _pack([code_append_entries, term, commit_index, previous_index, previous_term, part])
        )
        if part:
            previous_index, previous_term = part[-1][1], part[-1][2]
    return tuple(payloads)


def decode_message(payload: bytes) -> dict[str, object]:
    """Decode one payload into exactly the dict pysyncobj expects; WireError on anything else."""
    reader = _SchemaReader(payload)
    length = reader.array_header()
    code = reader.integer("code")
    if code == code_append_entries:
        message = _decode_append_entries(reader, length)
    elif code == code_install_snapshot:
        message = _decode_install_snapshot(reader, length)
    elif code == code_next_node_index:
        _require_length(length, 5, code)
        message = {
            "type": "next_node_idx",
            "term": reader.integer("term"),
            "next_node_idx": reader.integer("next_node_idx"),
            "reset": reader.boolean("reset"),
            "success": reader.boolean("success"),
        }
    elif code == code_request_vote:
        _require_length(length, 4, code)
        message = {
            "type": "request_vote",
            "term": reader.integer("term"),
            "last_log_index": reader.integer("last_log_index"),
            "last_log_term": reader.integer("last_log_term"),
        }
    elif code in (code_response_vote, code_timeout_now):
        _require_length(length, 2, code)
        message = {"type": message_type_by_code[code], "term": reader.integer("term")}
    else:
        raise WireError(f"unknown message code {code}")
    reader.end()
    return message


def message_type_label(message: object) -> str:
    """A bounded label for a pysyncobj message, safe to use in metrics and logs."""
    if isinstance(message, Mapping):
        message_type = message.get("type")
        if isinstance(message_type, str) and message_type in _known_pysyncobj_types:
            return message_type
    return "other"


def _pack(fields: list[object]) -> bytes:
    return msgpack.packb(
        fields,
        use_bin_type=True,
        strict_types=True,
        use_single_float=False,
        autoreset=True,
        datetime=False,
        unicode_errors="strict",
    )


def _message_fields(message: object, entries_max: int | None = wire_entries_max) -> list[object]:
    if not isinstance(message, Mapping):
        raise WireError(f"unsupported message of type {type(message).__name__}")
    keys = frozenset(message.keys())
    message_type = message.get("type")
    if message_type == "append_entries" and keys == _append_entries_keys:
        return _append_entries_fields(message, entries_max)
    if message_type == "append_entries" and keys == _install_snapshot_keys:
        return [
            code_install_snapshot,
            _integer(message["term"], "term"),
            _integer(message["commit_index"], "commit_index"),
            _snapshot_chunk(message["serialized"]),
        ]
    if message_type == "next_node_idx" and keys == _next_node_index_keys:
        return [
            code_next_node_index,
            _integer(message["term"], "term"),
            _integer(message["next_node_idx"], "next_node_idx"),
            _boolean(message["reset"], "reset"),
            _boolean(message["success"], "success"),
        ]
    if message_type == "request_vote" and keys == _request_vote_keys:
        return [
            code_request_vote,
            _integer(message["term"], "term"),
            _integer(message["last_log_index"], "last_log_index"),
            _integer(message["last_log_term"], "last_log_term"),
        ]
    if message_type in ("response_vote", "timeout_now") and keys == _term_only_keys:
        code = code_response_vote if message_type == "response_vote" else code_timeout_now
        return [code, _integer(message["term"], "term")]
    fields = ", ".join(sorted(map(str, keys)))
    raise WireError(f"unsupported message {message_type_label(message)} with fields {fields}")


def _append_entries_fields(message: Mapping[str, object], entries_max: int | None) -> list[object]:
    previous_index, previous_term = message["prevLogIdx"], message["prevLogTerm"]
    if (previous_index is None) != (previous_term is None):
        raise WireError("prevLogIdx and prevLogTerm must both be None or both be integers")
    entries = message["entries"]
    if isinstance(entries, (str, bytes, bytearray, Mapping)) or not isinstance(entries, Iterable):
        raise WireError("field 'entries' must be a sequence of (command, index, term)")
    encoded_entries = [_entry(entry) for entry in entries]
    if entries_max is not None and len(encoded_entries) > entries_max:
        raise WireError(f"{len(encoded_entries)} entries exceed {entries_max}")
    return [
        code_append_entries,
        _integer(message["term"], "term"),
        _integer(message["commit_index"], "commit_index"),
        None if previous_index is None else _integer(previous_index, "prevLogIdx"),
        None if previous_term is None else _integer(previous_term, "prevLogTerm"),
        encoded_entries,
    ]


def _entry(entry: object) -> list[object]:
    if not isinstance(entry, (tuple, list)) or len(entry) != 3:
        raise WireError("each entry must be a (command, index, term) triple")
    command, index, term = entry
    return [
        _binary(command, "entry command", wire_entry_bytes_max),
        _integer(index, "entry index"),
        _integer(term, "entry term"),
    ]


def _snapshot_chunk(serialized: object) -> list[object] | None:
    if serialized is None:
        return None
    if not isinstance(serialized, tuple) or len(serialized) != 3:
        raise WireError("field 'serialized' must be None or (data, isFirst, isLast)")
    data, is_first, is_last = serialized
    return [
        _binary(data, "snapshot chunk", wire_snapshot_chunk_bytes_max),
        _boolean(is_first, "isFirst"),
        _boolean(is_last, "isLast"),
    ]


def _entry_parts(entries: list[list[object]], part_bytes_max: int) -> list[list[list[object]]]:
    budget_bytes = part_bytes_max - _message_overhead_bytes
    parts: list[list[list[object]]] = [[]]
    part_bytes = 0
    for entry in entries:
        entry_bytes = len(entry[0]) + _entry_overhead_bytes  # type: ignore[arg-type]
        if entry_bytes > budget_bytes:
            raise WireError(f"entry of {entry_bytes} bytes cannot fit in {part_bytes_max} bytes")
        part_full = len(parts[-1]) == wire_entries_max or part_bytes + entry_bytes > budget_bytes
        if parts[-1] and part_full:
            parts.append([])
            part_bytes = 0
        parts[-1].append(entry)
        part_bytes += entry_bytes
    return parts


def _integer(value: object, field: str) -> int:
    # bool is a subclass of int; a True where a term belongs is a bug or an attack, never a 1.
    if type(value) is not int or not 0 <= value <= _unsigned_64_max:
        raise WireError(f"field {field!r} must be a non-negative integer below 2**64")
    return value


def _boolean(value: object, field: str) -> bool:
    if type(value) is not bool:
        raise WireError(f"field {field!r} must be a boolean")
    return value


def _binary(value: object, field: str, length_max: int) -> bytes:
    if type(value) is not bytes:
        raise WireError(f"field {field!r} must be bytes")
    if len(value) > length_max:
        raise WireError(f"{field} of {len(value)} bytes exceeds {length_max}")
    return value


def _require_length(length: int, expected: int, code: int) -> None:
    if length != expected:
        raise WireError(f"message code {code} must have {expected} fields, got {length}")


def _decode_append_entries(reader: _SchemaReader, length: int) -> dict[str, object]:
    _require_length(length, 6, code_append_entries)
    term = reader.integer("term")
    commit_index = reader.integer("commit_index")
    previous_index = reader.optional_integer("prevLogIdx")
    previous_term = reader.optional_integer("prevLogTerm")
    if (previous_index is None) != (previous_term is None):
        raise WireError("prevLogIdx and prevLogTerm must both be None or both be integers")
    count = reader.array_header()
    if count > wire_entries_max:
        raise WireError(f"{count} entries exceed {wire_entries_max}")
    entries = []
    for _ in range(count):
        if reader.array_header() != 3:
            raise WireError("each entry must be a (command, index, term) triple")
        command = reader.binary("entry command", wire_entry_bytes_max)
        entries.append((command, reader.integer("entry index"), reader.integer("entry term")))
    return {
        "type": "append_entries",
        "term": term,
        "commit_index": commit_index,
        "prevLogIdx": previous_index,
        "prevLogTerm": previous_term,
        "entries": entries,
    }


def _decode_install_snapshot(reader: _SchemaReader, length: int) -> dict[str, object]:
    _require_length(length, 4, code_install_snapshot)
    term = reader.integer("term")
    commit_index = reader.integer("commit_index")
    serialized: tuple[bytes, bool, bool] | None = None
    if not reader.next_is_nil():
        if reader.array_header() != 3:
            raise WireError("field 'serialized' must be nil or [data, isFirst, isLast]")
        serialized = (
            reader.binary("snapshot chunk", wire_snapshot_chunk_bytes_max),
            reader.boolean("isFirst"),
            reader.boolean("isLast"),
        )
    else:
        reader.nil()
    return {
        "type": "append_entries",
        "term": term,
        "commit_index": commit_index,
        "serialized": serialized,
    }


class _SchemaReader:
    """Reads a payload field by field, so decoding builds only the objects the schema allows."""

    def __init__(self, payload: bytes) -> None:
        if type(payload) is not bytes:
            raise WireError("payload must be bytes")
        self._payload = payload
        # A file-like source is read in chunks instead of feed() copying the whole payload first.
        self._unpacker = msgpack.Unpacker(
            io.BytesIO(payload),
            read_size=min(_read_chunk_bytes, max(len(payload), 1)),
            raw=False,
            use_list=True,
            strict_map_key=True,
            timestamp=0,
            max_buffer_size=max(len(payload), 1),
            max_bin_len=max(wire_entry_bytes_max, wire_snapshot_chunk_bytes_max),
            max_str_len=0,
            max_array_len=wire_entries_max,
            max_map_len=0,
            max_ext_len=0,
        )

    def array_header(self) -> int:
        try:
            return self._unpacker.read_array_header()
        except (ValueError, msgpack.UnpackException) as error:
            offset = self._unpacker.tell()
            raise WireError(f"expected an array at offset {offset}: {error}") from None

    def integer(self, field: str) -> int:
        return _integer(self._leaf(field), field)

    def optional_integer(self, field: str) -> int | None:
        value = self._leaf(field)
        return None if value is None else _integer(value, field)

    def boolean(self, field: str) -> bool:
        return _boolean(self._leaf(field), field)

    def binary(self, field: str, length_max: int) -> bytes:
        return _binary(self._leaf(field), field, length_max)

    def next_is_nil(self) -> bool:
        offset = self._unpacker.tell()
        return offset < len(self._payload) and self._payload[offset] == 0xC0

    def nil(self) -> None:
        self._leaf("nil")

    def end(self) -> None:
        if self._unpacker.tell() != len(self._payload):
            trailing_bytes = len(self._payload) - self._unpacker.tell()
            raise WireError(f"{trailing_bytes} trailing bytes after the message")

    def _leaf(self, field: str) -> object:
        offset = self._unpacker.tell()
        if offset >= len(self._payload):
            raise WireError(f"payload ends before field {field!r}")
        if self._payload[offset] in _container_first_bytes:
            raise WireError(f"field {field!r} must not be an array or map")
        try:
            return self._unpacker.unpack()
        except (ValueError, msgpack.UnpackException) as error:
            raise WireError(f"field {field!r} is not valid msgpack: {error}") from None
