"""Signed tree heads and transfer receipts: binary, JSON, text and QR encodings, and offline verification."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey

from config.schema import Genesis, node_name_pattern
from consensus import merkle
from consensus.codec import CodecError, is_integer, pack, unpack
from consensus.entries import (
    EntryError,
    Issue,
    Redeem,
    Transfer,
    cluster_id_pattern,
    decode_entry,
    signature_bytes,
    signature_is_valid,
    transfer_like_kinds,
)

receipt_format_version = 1
leaf_format_version = 1
text_prefix = "TONLE1:"
_head_signing_domain = b"tonle/tree-head/v1"

# Limits. A receipt is meant to fit in one QR code; the binary bound is generous next to that and bounds
# every form before any parsing (text is Base45, 3 characters per 2 bytes; JSON is hex plus field names).
receipt_bytes_max = 8192
receipt_json_bytes_max = 32768
receipt_text_characters_max = len(text_prefix) + receipt_bytes_max // 2 * 3
receipt_signatures_max = 32
result_characters_max = 64
u64_max = 2**64 - 1
# QR version 40 at error correction level M holds 3391 alphanumeric characters: the largest symbol
# phone cameras still read from paper, with 15% of it recoverable when the print is damaged.
qr_text_characters_max = 3391
qr_module_pixels = 4
# ISO/IEC 18004 asks for a quiet zone of four modules around the symbol.
qr_quiet_zone_modules = 4

result_pattern = re.compile(rf"[a-z][a-z0-9_]{{0,{result_characters_max - 1}}}")
_lower_hex_pattern = re.compile(r"(?:[0-9a-f]{2})*")

# RFC 9285: the 45 characters of QR alphanumeric mode, so the text form uses QR's densest text mode.
base45_alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"
_base45_values = {character: value for value, character in enumerate(base45_alphabet)}


class ReceiptError(ValueError):
    """A receipt that cannot be decoded or encoded as asked. `code` is a stable, machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _malformed(message: str) -> ReceiptError:
    return ReceiptError("malformed", message)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise _malformed(message)


def _is_u64(value: object) -> bool:
    return is_integer(value) and 0 <= value <= u64_max


# Base45 (RFC 9285) ------------------------------------------------------------------------------------


def base45_encode(data: bytes) -> str:
    characters = []
    for start in range(0, len(data) - 1, 2):
        value = data[start] * 256 + data[start + 1]
        characters += (value % 45, value // 45 % 45, value // 2025)
    if len(data) % 2:
        characters += (data[-1] % 45, data[-1] // 45)
    return "".join(base45_alphabet[value] for value in characters)


def base45_decode(text: str) -> bytes:
    """Decode RFC 9285 Base45, refusing characters outside the alphabet and groups that overflow (§4.2)."""
    try:
        values = [_base45_values[character] for character in text]
    except KeyError as error:
        raise _malformed(f"{error.args[0]!r} is not a Base45 character") from None
    if len(values) % 3 == 1:
        raise _malformed("Base45 text cannot end in a single character")
    decoded = bytearray()
    for start in range(0, len(values), 3):
        group = values[start : start + 3]
        value = sum(digit * 45**position for position, digit in enumerate(group))
        width = len(group) - 1
        if value >= 256**width:
            raise _malformed(f"Base45 group {text[start : start + 3]!r} is out of range")
        decoded += value.to_bytes(width, "big")
    return bytes(decoded)


# Types ---------------------------------------------------------------------------------------------------


def encode_leaf_data(entry_raw: bytes, result: str, raft_index: int, cluster_time_ms: int) -> bytes:
    """The bytes hashed into the ledger's tree for one applied transfer or issue, whatever its result."""
    return pack([leaf_format_version, entry_raw, result, raft_index, cluster_time_ms])


@dataclass(frozen=True, slots=True)
class TreeHead:
    """The ledger at one applied Raft index: the receipt tree and the state hash, what validators sign so a
    receipt needs no node and an auditor can check a replay of the log against it."""

    cluster_id: str
    tree_size: int
    root_hash: bytes
    state_hash: bytes
    applied_index: int
    cluster_time_ms: int

    def __post_init__(self) -> None:
        _require(type(self.cluster_id) is str and bool(cluster_id_pattern.fullmatch(self.cluster_id)), "cluster id")
        _require(_is_u64(self.tree_size), "tree size must be a u64")
        _require(type(self.root_hash) is bytes and len(self.root_hash) == merkle.hash_bytes, "root hash")
        _require(type(self.state_hash) is bytes and len(self.state_hash) == merkle.hash_bytes, "state hash")
        _require(_is_u64(self.applied_index), "applied index must be a u64")
        _require(_is_u64(self.cluster_time_ms), "head cluster time must be a u64")

    def signing_payload(self) -> bytes:
        cluster = self.cluster_id.encode()
        fields = pack([self.tree_size, self.root_hash, self.state_hash, self.applied_index, self.cluster_time_ms])
        return _head_signing_domain + len(cluster).to_bytes(1, "big") + cluster + fields


@dataclass(frozen=True, slots=True)
class HeadSignature:
    """One validator's Ed25519 signature over a tree head's signing payload."""

    validator: str
    signature: bytes

    def __post_init__(self) -> None:
        _require(type(self.validator) is str and bool(node_name_pattern.fullmatch(self.validator)), "validator name")
        _require(type(self.signature) is bytes and len(self.signature) == signature_bytes, "head signature")


def sign_tree_head(head: TreeHead, validator: str, signing_key: SigningKey) -> HeadSignature:
    return HeadSignature(validator, signing_key.sign(head.signing_payload()).signature)


@dataclass(frozen=True, slots=True)
class Receipt:
    """Proof that one transfer or issue was applied with a result, checkable with the genesis alone."""

    entry_raw: bytes
    result: str
    raft_index: int
    cluster_time_ms: int
    leaf_index: int
    inclusion_path: tuple[bytes, ...]
    head: TreeHead
    signatures: tuple[HeadSignature, ...]

    def __post_init__(self) -> None:
        _require(type(self.entry_raw) is bytes, "entry must be bytes")
        _require(type(self.result) is str and bool(result_pattern.fullmatch(self.result)), "result")
        _require(_is_u64(self.raft_index), "raft index must be a u64")
        _require(_is_u64(self.cluster_time_ms), "cluster time must be a u64")
        _require(_is_u64(self.leaf_index), "leaf index must be a u64")
        path = self.inclusion_path
        _require(type(path) is tuple and len(path) <= merkle.proof_hashes_max, "inclusion path length")
        _require(all(type(item) is bytes and len(item) == merkle.hash_bytes for item in path), "path hash")
        _require(isinstance(self.head, TreeHead), "tree head")
        signatures = self.signatures
        _require(type(signatures) is tuple and len(signatures) <= receipt_signatures_max, "signature count")
        _require(all(isinstance(item, HeadSignature) for item in signatures), "signatures")

    @property
    def cluster_id(self) -> str:
        return self.head.cluster_id

    def leaf_data(self) -> bytes:
        return encode_leaf_data(self.entry_raw, self.result, self.raft_index, self.cluster_time_ms)


# Encodings -----------------------------------------------------------------------------------------------


def _fields(receipt: Receipt) -> list[Any]:
    head = receipt.head
    return [
        receipt_format_version,
        head.cluster_id,
        receipt.entry_raw,
        receipt.result,
        receipt.raft_index,
        receipt.cluster_time_ms,
        receipt.leaf_index,
        list(receipt.inclusion_path),
        [head.tree_size, head.root_hash, head.state_hash, head.applied_index, head.cluster_time_ms],
        [[item.validator, item.signature] for item in receipt.signatures],
    ]


def _receipt_from_fields(fields: object) -> Receipt:
    _require(type(fields) is list and len(fields) == 10, "a receipt is an array of 10 fields")
    version, cluster_id, entry_raw, result, raft_index, cluster_time_ms, leaf_index, path, head, signatures = fields
    _require(is_integer(version) and version == receipt_format_version, f"receipt format {version!r}")
    _require(type(path) is list, "inclusion path must be an array")
    _require(type(head) is list and len(head) == 5, "tree head must be an array of 5")
    _require(type(signatures) is list, "signatures must be an array")
    _require(all(type(item) is list and len(item) == 2 for item in signatures), "a signature is [name, bytes]")
    return Receipt(
        entry_raw=entry_raw,
        result=result,
        raft_index=raft_index,
        cluster_time_ms=cluster_time_ms,
        leaf_index=leaf_index,
        inclusion_path=tuple(path),
        head=TreeHead(cluster_id, *head),
        signatures=tuple(HeadSignature(name, signature) for name, signature in signatures),
    )


def encode_receipt_binary(receipt: Receipt) -> bytes:
    """The compact form: canonical msgpack, what the text form and the QR code carry."""
    encoded = pack(_fields(receipt))
    if len(encoded) > receipt_bytes_max:
        raise ReceiptError("receipt_too_large", f"{len(encoded)} bytes; the limit is {receipt_bytes_max}")
    return encoded


def decode_receipt_binary(data: bytes) -> Receipt:
    _require(isinstance(data, (bytes, bytearray, memoryview)), "a binary receipt must be bytes")
    _require(len(data) <= receipt_bytes_max, f"a binary receipt is at most {receipt_bytes_max} bytes")
    try:
        fields = unpack(bytes(data))
    except CodecError as error:
        raise _malformed(str(error)) from None
    return _receipt_from_fields(fields)


def encode_receipt_text(receipt: Receipt) -> str:
    """`TONLE1:` and Base45 of the binary form: every character is in QR alphanumeric mode."""
    return text_prefix + base45_encode(encode_receipt_binary(receipt))


def decode_receipt_text(text: str) -> Receipt:
    _require(type(text) is str, "a text receipt must be a string")
    limit = receipt_text_characters_max
    _require(len(text) <= limit, f"a text receipt is at most {limit} characters")
    _require(text.startswith(text_prefix), f"a text receipt starts with {text_prefix}")
    return decode_receipt_binary(base45_decode(text[len(text_prefix) :]))


def _transfer_fields(body: Transfer | Issue | Redeem) -> dict[str, str | int | None]:
    """The transfer as a person reads it; an issue has no debit account (the central bank creates money)
    and a redemption no credit account (it takes money out of circulation)."""
    return {
        "kind": type(body).__name__.lower(),
        "id": body.id.hex(),
        "debit": getattr(body, "debit_account", None),
        "credit": getattr(body, "credit_account", None),
        "amount": body.amount,
        "currency": body.currency,
    }


def _readable_transfer(entry_raw: bytes) -> dict[str, str | int | None] | None:
    """For the JSON form only: the verifier ignores it and decodes the entry itself."""
    try:
        body = decode_entry(entry_raw).body()
    except EntryError:
        return None
    return _transfer_fields(body) if isinstance(body, (Transfer, Issue, Redeem)) else None


def encode_receipt_json(receipt: Receipt) -> str:
    head = receipt.head
    document = {
        "format": receipt_format_version,
        "cluster_id": head.cluster_id,
        "entry_raw": receipt.entry_raw.hex(),
        "result": receipt.result,
        "raft_index": receipt.raft_index,
        "cluster_time_ms": receipt.cluster_time_ms,
        "leaf_index": receipt.leaf_index,
        "inclusion_path": [item.hex() for item in receipt.inclusion_path],
        "tree_head": {
            "tree_size": head.tree_size,
            "root_hash": head.root_hash.hex(),
            "state_hash": head.state_hash.hex(),
            "applied_index": head.applied_index,
            "cluster_time_ms": head.cluster_time_ms,
        },
        "signatures": [{"validator": item.validator, "signature": item.signature.hex()} for item in receipt.signatures],
        "transfer": _readable_transfer(receipt.entry_raw),
    }
    return json.dumps(document, indent=2, sort_keys=False, ensure_ascii=True, allow_nan=False)


_json_keys = {"format", "cluster_id", "entry_raw", "result", "raft_index", "cluster_time_ms", "leaf_index",
              "inclusion_path", "tree_head", "signatures"}
_json_ignored_keys = {"transfer"}
_json_head_keys = {"tree_size", "root_hash", "state_hash", "applied_index", "cluster_time_ms"}
_json_signature_keys = {"validator", "signature"}


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    _require(len(document) == len(pairs), "a JSON object repeats a key")
    return document


def _refuse_json_number(text: str) -> Any:
    raise _malformed(f"{text} is not an integer")


def _object(value: object, keys: set[str], optional: set[str], name: str) -> dict[str, Any]:
    _require(type(value) is dict, f"{name} must be an object")
    present = set(value)
    _require(keys <= present <= keys | optional, f"{name} must have exactly the keys {sorted(keys)}")
    return value


def _hex(value: object, name: str) -> bytes:
    _require(type(value) is str and bool(_lower_hex_pattern.fullmatch(value)), f"{name} must be lowercase hex")
    return bytes.fromhex(value)


def decode_receipt_json(text: str | bytes) -> Receipt:
    """The JSON form, strictly: exact keys, lowercase hex, integers only; `transfer` is ignored."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    _require(isinstance(text, bytes), "a JSON receipt must be text")
    _require(len(text) <= receipt_json_bytes_max, f"a JSON receipt is at most {receipt_json_bytes_max} bytes")
    try:
        text = text.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise _malformed("a JSON receipt must be UTF-8") from None
    try:
        document = json.loads(
            text, object_pairs_hook=_json_object, parse_float=_refuse_json_number, parse_constant=_refuse_json_number
        )
    except ReceiptError:
        raise
    except (ValueError, RecursionError) as error:
        raise _malformed(f"not valid JSON: {error}") from None
    document = _object(document, _json_keys, _json_ignored_keys, "a receipt")
    head = _object(document["tree_head"], _json_head_keys, set(), "tree_head")
    path = document["inclusion_path"]
    signatures = document["signatures"]
    _require(type(path) is list and type(signatures) is list, "inclusion_path and signatures must be arrays")
    return _receipt_from_fields([
        document["format"],
        document["cluster_id"],
        _hex(document["entry_raw"], "entry_raw"),
        document["result"],
        document["raft_index"],
        document["cluster_time_ms"],
        document["leaf_index"],
        [_hex(item, "inclusion_path") for item in path],
        [
            head["tree_size"],
            _hex(head["root_hash"], "root_hash"),
            _hex(head["state_hash"], "state_hash"),
            head["applied_index"],
            head["cluster_time_ms"],
        ],
        [
            [item["validator"], _hex(item["signature"], "signature")]
            for item in (_object(entry, _json_signature_keys, set(), "a signature") for entry in signatures)
        ],
    ])


def decode_receipt(data: bytes | str) -> Receipt:
    """Any form, told apart by its first bytes: `TONLE1:` text, a JSON object, or the binary form."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    _require(isinstance(data, (bytes, bytearray, memoryview)), "a receipt must be bytes or text")
    data = bytes(data)
    if data.startswith(text_prefix.encode("ascii")):
        # Only line ends are trimmed: a space is a Base45 character and may end the text.
        trimmed = data.rstrip(b"\r\n")
        _require(trimmed.isascii(), "a text receipt is ASCII")
        return decode_receipt_text(trimmed.decode("ascii"))
    if data.lstrip(b" \t\r\n")[:1] == b"{":
        return decode_receipt_json(data)
    return decode_receipt_binary(data)


def _qr_code(receipt: Receipt) -> Any:
    # Imported here: segno's writers pull in sockets and clocks (urllib, PDF dates), and the deterministic
    # core imports this module for leaf encoding and verification, never for pictures.
    import segno

    text = encode_receipt_text(receipt)
    if len(text) > qr_text_characters_max:
        message = f"the text form is {len(text)} characters; one QR code holds {qr_text_characters_max}"
        raise ReceiptError("receipt_too_large_for_qr", message)
    return segno.make_qr(text, error="m", version=None, mode="alphanumeric", mask=None, eci=False, boost_error=False)


def receipt_qr_png(receipt: Receipt) -> bytes:
    output = io.BytesIO()
    _qr_code(receipt).save(
        output,
        kind="png",
        scale=qr_module_pixels,
        border=qr_quiet_zone_modules,
        dark="#000",
        light="#fff",
        compresslevel=9,
    )
    return output.getvalue()


def receipt_qr_svg(receipt: Receipt) -> str:
    output = io.BytesIO()
    _qr_code(receipt).save(
        output,
        kind="svg",
        scale=qr_module_pixels,
        border=qr_quiet_zone_modules,
        dark="#000",
        light="#fff",
        xmldecl=True,
        svgns=True,
        title="Tonle receipt",
        encoding="utf-8",
        nl=True,
    )
    return output.getvalue().decode("utf-8")


# Verification --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verification:
    """The verdict on a receipt: `reason` is "valid" or the first check that failed; details are for people."""

    valid: bool
    reason: str
    details: Mapping[str, str | int | None]


def _invalid(reason: str, message: str, **details: str | int | None) -> Verification:
    return Verification(False, reason, {"message": message, **details})


def _signature_verifies(signature: bytes, payload: bytes, public_key: bytes) -> bool:
    try:
        crypto_sign_open(signature + payload, public_key)
    except (BadSignatureError, ValueError):
        return False
    return True


def verify_tree_head(head: TreeHead, signatures: tuple[HeadSignature, ...], genesis: Genesis) -> Verification:
    """Is `head` signed by a strict majority of the genesis validators, and by nobody else?"""
    if head.cluster_id != genesis.cluster_id:
        return _invalid("wrong_network", f"signed for network {head.cluster_id}, not {genesis.cluster_id}")
    keys = {validator.name: validator.public_key for validator in genesis.validators}
    for item in signatures:
        if item.validator not in keys:
            return _invalid("unknown_signer", f"{item.validator} is not a validator of {genesis.cluster_id}")
    names = [item.validator for item in signatures]
    for name in names:
        if names.count(name) > 1:
            return _invalid("duplicate_signer", f"{name} signs more than once")
    payload = head.signing_payload()
    for item in signatures:
        if not _signature_verifies(item.signature, payload, keys[item.validator]):
            return _invalid("head_signature_invalid", f"the signature of {item.validator} does not verify")
    required = len(keys) // 2 + 1
    if len(signatures) < required:
        message = f"{len(signatures)} of {len(keys)} validators signed; {required} are needed"
        return _invalid("insufficient_signatures", message)
    return Verification(True, "valid", {"signed_by": ", ".join(names)})


def verify_receipt(receipt: Receipt | bytes | str, genesis: Genesis) -> Verification:
    """Check a receipt with nothing but the genesis: the first failing check is the reason."""
    if not isinstance(receipt, Receipt):
        try:
            receipt = decode_receipt(receipt)
        except ReceiptError as error:
            return _invalid("malformed", error.message)
    head = receipt.head
    head_verification = verify_tree_head(head, receipt.signatures, genesis)
    if not head_verification.valid:
        return head_verification
    try:
        entry = decode_entry(receipt.entry_raw)
        body = entry.body()
    except EntryError as error:
        return _invalid("entry_malformed", error.message, code=error.code)
    if entry.kind not in transfer_like_kinds:
        return _invalid("entry_malformed", f"a receipt is for a transfer, issue or redemption, not {entry.kind.name.lower()}")
    if not signature_is_valid(entry):
        return _invalid("entry_signature_invalid", "the entry's signature does not verify with the key it names")
    if receipt.leaf_index >= head.tree_size:
        return _invalid("leaf_index_out_of_range", f"leaf {receipt.leaf_index} of a tree of {head.tree_size}")
    leaf = merkle.leaf_hash(receipt.leaf_data())
    if not merkle.verify_inclusion(leaf, receipt.leaf_index, head.tree_size, receipt.inclusion_path, head.root_hash):
        return _invalid("inclusion_proof_invalid", "the entry, its result and position do not lead to the signed root")
    return Verification(True, "valid", {
        "cluster_id": head.cluster_id,
        **_transfer_fields(body),
        "signer": entry.signer,
        "result": receipt.result,
        "raft_index": receipt.raft_index,
        "cluster_time_ms": receipt.cluster_time_ms,
        "leaf_index": receipt.leaf_index,
        "tree_size": head.tree_size,
        "root_hash": head.root_hash.hex(),
        "state_hash": head.state_hash.hex(),
        "applied_index": head.applied_index,
        "head_cluster_time_ms": head.cluster_time_ms,
        **head_verification.details,
    })
