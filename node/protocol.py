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
account_characters_max = 64
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
class LookupTransferRequest:
    request_id: int
    transfer_id: bytes


@dataclass(frozen=True, slots=True)
class BalanceRequest:
    request_id: int
    account: str


@dataclass(frozen=True, slots=True)
class SimpleRequest:
    """Requests with no arguments: `status`, `totals`, `accounts`."""

    request_id: int
    operation: str


Request = SubmitRequest | LookupTransferRequest | BalanceRequest | SimpleRequest

_simple_operations = frozenset({"status", "totals", "accounts"})


def _field(message: dict[str, Any], name: str, expected: type, request_id: int | None) -> Any:
    if name not in message:
        raise ProtocolError(ERROR_MALFORMED_REQUEST, f"missing field {name!r}", request_id)
    value = message[name]
    if type(value) is not expected:
        raise ProtocolError(
            ERROR_MALFORMED_REQUEST, f"field {name!r} must be {expected.__name__}, got {type(value).__name__}", request_id
        )
    return value


def parse_request(message: dict[str, Any]) -> Request:
    request_id = message.get("id")
    if type(request_id) is not int or not 0 <= request_id <= request_id_max:
        raise ProtocolError(ERROR_MALFORMED_REQUEST, "field 'id' must be a non-negative integer")
    operation = _field(message, "op", str, request_id)
    allowed = {"id", "op"}
    if operation == "submit":
        allowed |= {"entries", "forwarded"}
        entries = _field(message, "entries", list, request_id)
        if len(entries) > submit_entries_max:
            raise ProtocolError(
                ERROR_TOO_MANY_ENTRIES, f"{len(entries)} entries; the limit is {submit_entries_max}", request_id
            )
        for position, entry in enumerate(entries):
            if type(entry) is not bytes:
                raise ProtocolError(ERROR_MALFORMED_REQUEST, f"entries[{position}] must be bytes", request_id)
            if len(entry) > entry_bytes_max:
                raise ProtocolError(
                    ERROR_MALFORMED_REQUEST,
                    f"entries[{position}] is {len(entry)} bytes; the limit is {entry_bytes_max}",
                    request_id,
                )
        forwarded = message.get("forwarded", False)
        if type(forwarded) is not bool:
            raise ProtocolError(ERROR_MALFORMED_REQUEST, "field 'forwarded' must be a bool", request_id)
        request: Request = SubmitRequest(request_id, tuple(entries), forwarded)
    elif operation == "lookup_transfer":
        allowed |= {"transfer_id"}
        transfer_id = _field(message, "transfer_id", bytes, request_id)
        if len(transfer_id) != 16:
            raise ProtocolError(ERROR_MALFORMED_REQUEST, "transfer_id must be 16 bytes", request_id)
        request = LookupTransferRequest(request_id, transfer_id)
    elif operation == "balance":
        allowed |= {"account"}
        account = _field(message, "account", str, request_id)
        if len(account) > account_characters_max:
            raise ProtocolError(ERROR_MALFORMED_REQUEST, "account name is too long", request_id)
        request = BalanceRequest(request_id, account)
    elif operation in _simple_operations:
        request = SimpleRequest(request_id, operation)
    else:
        raise ProtocolError(ERROR_UNKNOWN_OPERATION, f"unknown operation {operation!r}", request_id)
    unknown = set(message) - allowed
    if unknown:
        raise ProtocolError(ERROR_MALFORMED_REQUEST, f"unknown fields {sorted(unknown)}", request_id)
    return request


def error_reply(request_id: int | None, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}
