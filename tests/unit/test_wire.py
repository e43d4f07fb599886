"""Tests for the pickle-free Raft message codec: exact round trips and every strictness rule."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consensus.raft.wire import (
    WireError,
    decode_message,
    encode_message,
    encode_message_parts,
    message_type_label,
    wire_entries_max,
    wire_entry_bytes_max,
    wire_snapshot_chunk_bytes_max,
)

repository_root = Path(__file__).resolve().parents[2]


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def append_entries(entries: list[tuple[bytes, int, int]], **overrides: object) -> dict[str, object]:
    message: dict[str, object] = {
        "type": "append_entries",
        "term": 7,
        "commit_index": 40,
        "prevLogIdx": 41,
        "prevLogTerm": 6,
        "entries": entries,
    }
    message.update(overrides)
    return message


def pickle_exploit(marker: Path) -> bytes:
    # A protocol-0 pickle for builtins.open(marker, "w"): unpickling it would create the marker.
    # Written out by hand so that nothing in the test suite imports pickle either.
    return b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."


every_message = [
    append_entries([(b"\x00first", 42, 7), (b"\x01", 43, 7)]),
    append_entries([]),
    append_entries([], prevLogIdx=None, prevLogTerm=None),
    {"type": "append_entries", "term": 3, "commit_index": 9, "serialized": None},
    {"type": "append_entries", "term": 3, "commit_index": 9, "serialized": (b"chunk", True, False)},
    {"type": "append_entries", "term": 3, "commit_index": 9, "serialized": (b"", False, True)},
    {"type": "next_node_idx", "term": 8, "next_node_idx": 44, "reset": False, "success": True},
    {"type": "request_vote", "term": 8, "last_log_index": 43, "last_log_term": 7},
    {"type": "response_vote", "term": 8},
    {"type": "timeout_now", "term": 8},
]


@pytest.mark.parametrize("message", every_message, ids=lambda message: str(message)[:60])
def test_every_supported_message_round_trips_to_the_exact_pysyncobj_dict(
    message: dict[str, object],
) -> None:
    decoded = decode_message(encode_message(message))

    assert decoded == message
    assert list(decoded) == list(message)


def test_decoded_entries_are_tuples_like_pysyncobj_log_entries() -> None:
    decoded = decode_message(encode_message(append_entries([(b"command", 42, 7)])))

    assert decoded["entries"] == [(b"command", 42, 7)]
    assert type(decoded["entries"][0]) is tuple  # type: ignore[index]


def test_message_codes_are_the_documented_compact_arrays() -> None:
    assert msgpack.unpackb(encode_message({"type": "response_vote", "term": 5})) == [5, 5]
    assert msgpack.unpackb(encode_message({"type": "timeout_now", "term": 5})) == [6, 5]
    assert msgpack.unpackb(encode_message(every_message[0]))[0] == 1
    assert msgpack.unpackb(encode_message(every_message[3]))[0] == 2


@settings(max_examples=200, deadline=None)
@given(
    term=st.integers(min_value=0, max_value=2**64 - 1),
    commit_index=st.integers(min_value=0, max_value=2**64 - 1),
    entries=st.lists(
        st.tuples(
            st.binary(max_size=64),
            st.integers(min_value=0, max_value=2**64 - 1),
            st.integers(min_value=0, max_value=2**64 - 1),
        ),
        max_size=20,
    ),
)
def test_any_valid_append_entries_round_trips(
    term: int, commit_index: int, entries: list[tuple[bytes, int, int]]
) -> None:
    message = append_entries(entries, term=term, commit_index=commit_index)

    assert decode_message(encode_message(message)) == message


@pytest.mark.parametrize(
    "payload",
    [
        pack([5, True]),
        pack([3, 1, 10, 1, True]),
        pack([1, 1, 1, 1, 1, [[b"x", True, 1]]]),
    ],
    ids=["term", "reset", "entry-index"],
)
def test_bool_where_an_integer_belongs_is_refused(payload: bytes) -> None:
    with pytest.raises(WireError, match="non-negative integer|boolean"):
        decode_message(payload)


def test_encoding_refuses_bool_as_integer() -> None:
    with pytest.raises(WireError, match="'term' must be a non-negative integer"):
        encode_message({"type": "response_vote", "term": True})


def test_encoding_refuses_integers_msgpack_cannot_carry() -> None:
    assert decode_message(encode_message({"type": "response_vote", "term": 2**64 - 1}))
    with pytest.raises(WireError, match="below 2\\*\\*64"):
        encode_message({"type": "response_vote", "term": 2**64})


@pytest.mark.parametrize("payload", [pack([5, 1.0]), pack([4, 1, 2, 3.5])], ids=["term", "last"])
def test_float_is_refused(payload: bytes) -> None:
    with pytest.raises(WireError, match="non-negative integer"):
        decode_message(payload)


@pytest.mark.parametrize("payload", [pack([5, 1, 2]), pack([3, 1, 1, False, True, 0])])
def test_extra_field_is_refused(payload: bytes) -> None:
    with pytest.raises(WireError, match="must have"):
        decode_message(payload)


def test_missing_field_is_refused() -> None:
    with pytest.raises(WireError, match="must have 4 fields"):
        decode_message(pack([4, 1, 2]))


def test_encoding_refuses_an_extra_dict_field() -> None:
    with pytest.raises(WireError, match="unsupported message response_vote"):
        encode_message({"type": "response_vote", "term": 1, "extra": 2})


def test_entry_at_the_size_limit_is_accepted_and_one_byte_more_is_refused() -> None:
    at_limit = append_entries([(b"x" * wire_entry_bytes_max, 42, 7)])
    over_limit_payload = pack([1, 7, 40, 41, 6, [[b"x" * (wire_entry_bytes_max + 1), 42, 7]]])

    assert decode_message(encode_message(at_limit)) == at_limit
    with pytest.raises(WireError, match="exceeds"):
        decode_message(over_limit_payload)
    with pytest.raises(WireError, match="exceeds"):
        encode_message(append_entries([(b"x" * (wire_entry_bytes_max + 1), 42, 7)]))


def test_snapshot_chunk_above_its_limit_is_refused() -> None:
    oversized = b"x" * (wire_snapshot_chunk_bytes_max + 1)

    with pytest.raises(WireError, match="snapshot chunk"):
        decode_message(pack([2, 1, 1, [oversized, True, False]]))
    with pytest.raises(WireError, match="snapshot chunk"):
        encode_message(
            {
                "type": "append_entries",
                "term": 1,
                "commit_index": 1,
                "serialized": (oversized, True, False),
            }
        )


def test_too_many_entries_are_refused() -> None:
    entries = [(b"", index, 1) for index in range(wire_entries_max + 1)]
    at_limit = pack([1, 1, 1, 0, 0, [list(entry) for entry in entries[:-1]]])
    over_limit = pack([1, 1, 1, 0, 0, [list(entry) for entry in entries]])

    assert decode_message(at_limit)["entries"] == entries[:-1]
    with pytest.raises(WireError):
        decode_message(over_limit)
    with pytest.raises(WireError, match="entries exceed"):
        encode_message(append_entries(entries))


@pytest.mark.parametrize("payload", [pack([0, 1]), pack([7, 1]), pack([99])], ids=["0", "7", "99"])
def test_unknown_message_code_is_refused(payload: bytes) -> None:
    with pytest.raises(WireError, match="unknown message code"):
        decode_message(payload)


@pytest.mark.parametrize(
    "message",
    [
        {"type": "apply_command", "command": b"\x00x", "request_id": 3},
        {"type": "apply_command_response", "request_id": 3, "log_idx": 5, "log_term": 1},
        {
            "type": "append_entries",
            "transmission": "start",
            "data": b"chunk",
            "term": 1,
            "commit_index": 1,
            "prevLogIdx": 1,
            "prevLogTerm": 1,
        },
        ["status"],
        "readonly",
        {"type": "append_entries", "term": 1, "commit_index": 1, "serialized": False},
    ],
    ids=["apply_command", "apply_response", "transmission", "utility", "string", "bad-snapshot"],
)
def test_unsupported_pysyncobj_messages_cannot_be_encoded(message: object) -> None:
    with pytest.raises(WireError):
        encode_message(message)


@pytest.mark.parametrize(
    "payload",
    [
        pack({"type": "apply_command", "command": b"x"}),
        pack(["status"]),
        pack([1, 1, 1, 0, 0, [[b"x", 1, 1]], "transmission"]),
        pack([5, "1"]),
        pack([1, 1, 1, 0, 0, [["text-not-bytes", 1, 1]]]),
        pack([1, 1, 1, 0, None, []]),
        pack([5, 1]) + b"\x00",
        pack([5, 1])[:-1],
        b"",
        msgpack.packb([5, msgpack.ExtType(1, b"x")]),
    ],
    ids=[
        "map",
        "utility-list",
        "transmission-extra",
        "string-term",
        "string-command",
        "half-none-prev",
        "trailing",
        "truncated",
        "empty",
        "ext",
    ],
)
def test_anything_but_one_exact_message_is_refused(payload: bytes) -> None:
    with pytest.raises(WireError):
        decode_message(payload)


@pytest.mark.parametrize(
    "payload",
    [pack([5, -1]), pack([1, 1, 1, 0, 0, [[b"x", -5, 1]]]), pack([3, 1, -2, False, True])],
    ids=["term", "entry-index", "next-node-index"],
)
def test_negative_integer_is_refused(payload: bytes) -> None:
    with pytest.raises(WireError, match="non-negative integer"):
        decode_message(payload)


def test_a_pickle_payload_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    exploit = pickle_exploit(marker)

    for payload in (exploit, zlib.compress(exploit, 3)):
        with pytest.raises(WireError):
            decode_message(payload)
    assert not marker.exists()


def test_nested_array_bomb_is_refused_without_building_it() -> None:
    # 1000 entries whose command is an array of 4096 empty arrays: under 4 MiB on the wire, but a
    # plain msgpack.unpackb would build four million lists (hundreds of megabytes) before any check.
    inner = b"\xdc\x10\x00" + b"\x90" * 4096
    bomb = bytes([0x96, 0x01, 0x01, 0x01, 0xC0, 0xC0, 0xDC, 0x03, 0xE8])
    bomb += (b"\x93" + inner + b"\x01\x01") * 1000

    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="must not be an array or map"):
            decode_message(bomb)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(bomb) < 4 * 2**20
    assert peak_bytes < 2**20


def test_container_in_a_leaf_position_is_refused() -> None:
    with pytest.raises(WireError, match="must not be an array or map"):
        decode_message(pack([1, 1, 1, 0, 0, [[[b"x"], 1, 1]]]))


def test_previous_index_and_term_must_both_be_none_or_both_integers() -> None:
    with pytest.raises(WireError, match="both be None"):
        encode_message(append_entries([], prevLogIdx=None))


def test_oversized_append_entries_is_split_into_consecutive_valid_messages() -> None:
    entries = [(b"\x01", index, 3) for index in range(2, 2 + 2 * wire_entries_max + 10)]
    message = append_entries(entries, prevLogIdx=1, prevLogTerm=2)

    parts = [decode_message(payload) for payload in encode_message_parts(message, 4 * 2**20)]
    part_entries: list[list[tuple[bytes, int, int]]] = [
        part["entries"] for part in parts  # type: ignore[misc]
    ]

    assert [len(entries) for entries in part_entries] == [wire_entries_max, wire_entries_max, 10]
    boundaries = [1, 1 + wire_entries_max, 1 + 2 * wire_entries_max]
    assert [part["prevLogIdx"] for part in parts] == boundaries
    assert [part["prevLogTerm"] for part in parts] == [2, 3, 3]
    assert [entry for entries in part_entries for entry in entries] == entries
    assert all(part["term"] == 7 and part["commit_index"] == 40 for part in parts)


def test_append_entries_is_split_by_bytes_to_fit_the_frame() -> None:
    entries = [(b"x" * wire_entry_bytes_max, index, 3) for index in range(2, 12)]
    part_bytes_max = 3 * wire_entry_bytes_max + 200

    payloads = encode_message_parts(append_entries(entries, prevLogIdx=1), part_bytes_max)

    decoded: list[list[tuple[bytes, int, int]]] = [
        decode_message(payload)["entries"] for payload in payloads  # type: ignore[misc]
    ]
    assert len(payloads) > 1
    assert all(len(payload) <= part_bytes_max for payload in payloads)
    assert [entry for entries in decoded for entry in entries] == entries


def test_heartbeat_and_other_messages_are_one_part() -> None:
    heartbeat = append_entries([])

    assert [decode_message(p) for p in encode_message_parts(heartbeat, 4 * 2**20)] == [heartbeat]
    assert len(encode_message_parts({"type": "response_vote", "term": 1}, 4 * 2**20)) == 1


def test_a_message_that_cannot_fit_any_part_is_refused() -> None:
    with pytest.raises(WireError, match="cannot fit"):
        encode_message_parts(append_entries([(b"x" * 1000, 2, 1)]), 500)
    with pytest.raises(WireError, match="exceeds"):
        encode_message_parts({"type": "response_vote", "term": 1}, 1)


def test_message_type_label_is_bounded() -> None:
    assert message_type_label({"type": "apply_command"}) == "apply_command"
    assert message_type_label({"type": "anything else"}) == "other"
    assert message_type_label(["status"]) == "other"
    assert message_type_label({"type": ["unhashable"]}) == "other"


def test_codec_imports_neither_pickle_nor_pysyncobj() -> None:
    probe = (
        "import sys, consensus.raft.wire;"
        "print('pickle' in sys.modules, 'pysyncobj' in sys.modules)"
    )

    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=repository_root,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )

    assert result.stdout.split() == ["False", "False"]
