"""Canonical msgpack encoding: one byte string per value, strict decoding that refuses anything else."""

from __future__ import annotations

from typing import Any

import msgpack

# Bounds handed to the msgpack decoder so a hostile length prefix cannot make it allocate.
# They are generous next to any real entry; the byte limits of the caller are the real bound.
decoded_string_bytes_max = 1 << 20
decoded_items_max = 1 << 16


class CodecError(ValueError):
    """Bytes that are not the canonical msgpack encoding of a value of the expected shape."""


def _refuse_extension(code: int, data: bytes) -> Any:
    raise CodecError(f"msgpack extension type {code} is not allowed")


def pack(value: Any) -> bytes:
    """Encode with the one canonical form: minimal integer widths, str as UTF-8 str, bytes as bin."""
    return msgpack.packb(value, use_bin_type=True)


def unpack(raw: bytes) -> Any:
    """Decode `raw` and insist it is the canonical encoding of what it decodes to.

    Re-encoding and comparing is what makes an encoding canonical: a value with a non-minimal integer
    width, a float32, a str/bin swap or trailing bytes decodes, but re-encodes to different bytes, so it is
    refused. Two honest encoders therefore always produce the same bytes, and signatures and hashes over
    those bytes mean one thing.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, got {type(raw).__name__}")
    try:
        value = msgpack.unpackb(
            raw,
            raw=False,
            use_list=True,
            strict_map_key=True,
            timestamp=0,
            ext_hook=_refuse_extension,
            max_str_len=decoded_string_bytes_max,
            max_bin_len=decoded_string_bytes_max,
            max_array_len=decoded_items_max,
            max_map_len=decoded_items_max,
            max_ext_len=0,
        )
    except CodecError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as error:
        raise CodecError(f"not valid msgpack: {error}") from None
    if pack(value) != bytes(raw):
        raise CodecError("not the canonical encoding")
    return value


def is_integer(value: Any) -> bool:
    """True for int but not bool (bool is a subclass of int in Python, and never an amount)."""
    return type(value) is int
