"""Client API wire format: length-prefixed msgpack frames, strict request parsing and typed errors."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from consensus.entries import entry_bytes_max

frame_header = struct.Struct(">I")
frame_bytes_max_default = 1 << 20
# Below any frame limit a node may be configured with: enough for an error reply to any request.
submit_entries_max = 8192
request_id_max = 2**63 - 1

# Error codes a client can act on. `busy`, `no_leader`, `not_ready` and `timeout` are retryable with the
# same entry ids; the others mean the request itself is wrong.
ERROR_FRAME_TOO_LARGE = "frame_too_large"
ERROR_MALFORMED_FRAME = "malformed_frame"
ERROR_MALFORMED_REQUEST = "malformed_request"
ERROR_UNKNOWN_OPERATION = "unknown_operation"
ERROR_BUSY = "busy"
ERROR_NO_LEADER = "no_leader"
ERROR_NOT_READY = "not_ready"
ERROR_TOO_MANY_ENTRIES = "too_many_entries"
retryable_errors = frozenset({ERROR_BUSY, ERROR_NO_LEADER, ERROR_NOT_READY})

# Per-entry statuses in a submit reply.
STATUS_APPLIED = "applied"  # the outcome was read from applied state (ok or a pinned failure)
STATUS_REJECTED = "rejected"  # refused on intake; nothing was logged; safe to correct and resend
STATUS_UNKNOWN = "unknown"  # no outcome within the wait; resubmit with the same id to learn it


class ProtocolError(Exception):
    """A request or frame the server refuses, with the code sent back to the client."""

    def __init__(self, code: str, message: str, request_id: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


def encode_frame(message: dict[str, Any]) -> bytes:
    payload = msgpack.packb(message, use_bin_type=True)
    return frame_header.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            timestamp=0,
            max_str_len=len(payload),
            max_bin_len=len(payload),
            max_array_len=len(payload),
            max_map_len=len(payload),
            max_ext_len=0,
        )
    except Exception as error:  # noqa: BLE001 - any decoder failure is the peer's malformed frame
        raise ProtocolError(ERROR_MALFORMED_FRAME, f"not valid msgpack: {error}") from None
    if type(message) is not dict:
        raise ProtocolError(ERROR_MALFORMED_FRAME, "a frame must hold a map")
    return message


class FrameReader:
    """Splits a byte stream into frames. The length is checked before any of the body is buffered."""

    def __init__(self, frame_bytes_max: int) -> None:
        self.frame_bytes_max = frame_bytes_max
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= frame_header.size:
            (length,) = frame_header.unpack_from(self._buffer)
            if length > self.frame_bytes_max:
                raise ProtocolError(
                    ERROR_FRAME_TOO_LARGE, f"frame of {length} bytes; the limit is {self.frame_bytes_max}"
                )
            end = frame_header.size + length
            if len(self._buffer) < end:
                break
            frames.append(bytes(self._buffer[frame_header.size : end]))
            del self._buffer[:end]
        return frames

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)


# Requests ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    request_id: int
    entries: tuple[bytes, ...]
    forwarded: bool  # from another node: enqueue and answer at once; that node awaits the outcome itself


@dataclass(frozen=True, slots=True)
class QueryRequest:
    """A read: `operation` and its checked `arguments` (see `query_operations`)."""

    request_id: int
    operation: str
    arguments: dict[str, Any]


Request = SubmitRequest | QueryRequest

# Queries and their arguments: name -> (type, required). Values are checked for type and, below, range.
query_operations: dict[str, dict[str, tuple[type, bool]]] = {
    "status": {},
    "totals": {},
    "accounts": {},
    "nodes": {},
    "lookup_transfer": {"transfer_id": (bytes, True)},
    "transfers_by_reference": {"reference": (str, True), "limit": (int, False)},
    "balance": {"account": (str, True), "as_of_index": (int, False)},
    "history": {"account": (str, True), "start_ms": (int, False), "end_ms": (int, False), "limit": (int, False), "cursor": (bytes, False)},
    "institution": {"institution": (str, True)},
    "alias": {"alias": (str, True)},
    "receipt": {"transfer_id": (bytes, True)},
    "receipt_status": {"transfer_id": (bytes, True)},
    "tree_head": {"index": (int, False)},
    "consistency_proof": {"old_size": (int, True), "new_size": (int, True)},
    # From a validator: its signature over this node's tree head at an index (kept only if it verifies).
    "head_signature": {"index": (int, True), "validator": (str, True), "signature": (bytes, True)},
}
query_string_characters_max = 96
query_limit_max = 1000
query_cursor_bytes_max = 64


def _field(message: dict[str, Any], name: str, expected: type, request_id: int | None) -> Any:
    if name not in message:
        raise ProtocolError(ERROR_MALFORMED_REQUEST, f"missing field {name!r}", request_id)
    value = message[name]
    if type(value) is not expected:
        raise ProtocolError(
            ERROR_MALFORMED_REQUEST, f"field {name!r} must be {expected.__name__}, got {type(value).__name__}", request_id
        )
    return value


def _submit(message: dict[str, Any], request_id: int) -> SubmitRequest:
    entries = _field(message, "entries", list, request_id)
    if len(entries) > submit_entries_max:
        raise ProtocolError(ERROR_TOO_MANY_ENTRIES, f"{len(entries)} entries; the limit is {submit_entries_max}", request_id)
    for position, entry in enumerate(entries):
        if type(entry) is not bytes:
            raise ProtocolError(ERROR_MALFORMED_REQUEST, f"entries[{position}] must be bytes", request_id)
        if len(entry) > entry_bytes_max:
            raise ProtocolError(
                ERROR_MALFORMED_REQUEST, f"entries[{position}] is {len(entry)} bytes; the limit is {entry_bytes_max}", request_id
            )
    forwarded = message.get("forwarded", False)
    if type(forwarded) is not bool:
        raise ProtocolError(ERROR_MALFORMED_REQUEST, "field 'forwarded' must be a bool", request_id)
    return SubmitRequest(request_id, tuple(entries), forwarded)


def _query(operation: str, message: dict[str, Any], request_id: int) -> QueryRequest:
    arguments = {}
    for name, (expected, required) in query_operations[operation].items():
        if name not in message:
            if required:
                raise ProtocolError(ERROR_MALFORMED_REQUEST, f"missing field {name!r}", request_id)
            continue
        value = _field(message, name, expected, request_id)
        if expected is str and len(value) > query_string_characters_max:
            raise ProtocolError(ERROR_MALFORMED_REQUEST, f"field {name!r} is too long", request_id)
        if expected is int and not 0 <= value <= request_id_max:
            raise ProtocolError(ERROR_MALFORMED_REQUEST, f"field {name!r} must be a non-negative integer", request_id)
        if name == "limit" and not 1 <= value <= query_limit_max:
            raise ProtocolError(ERROR_MALFORMED_REQUEST, f"limit must be 1..{query_limit_max}", request_id)
        if name == "transfer_id" and len(value) != 16:
            raise ProtocolError(ERROR_MALFORMED_REQUEST, "transfer_id must be 16 bytes", request_id)
        if name == "signature" and len(value) != 64:
            raise ProtocolError(ERROR_MALFORMED_REQUEST, "signature must be 64 bytes", request_id)
        if name == "cursor" and len(value) > query_cursor_bytes_max:
            raise ProtocolError(ERROR_MALFORMED_REQUEST, "cursor is too long", request_id)
        arguments[name] = value
    return QueryRequest(request_id, operation, arguments)


def parse_request(message: dict[str, Any]) -> Request:
    request_id = message.get("id")
    if type(request_id) is not int or not 0 <= request_id <= request_id_max:
        raise ProtocolError(ERROR_MALFORMED_REQUEST, "field 'id' must be a non-negative integer")
    operation = _field(message, "op", str, request_id)
    if operation == "submit":
        allowed = {"id", "op", "entries", "forwarded"}
        request: Request = _submit(message, request_id)
    elif operation in query_operations:
        allowed = {"id", "op", *query_operations[operation]}
        request = _query(operation, message, request_id)
    else:
        raise ProtocolError(ERROR_UNKNOWN_OPERATION, f"unknown operation {operation!r}", request_id)
    unknown = set(message) - allowed
    if unknown:
        raise ProtocolError(ERROR_MALFORMED_REQUEST, f"unknown fields {sorted(unknown)}", request_id)
    return request


def error_reply(request_id: int | None, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}
