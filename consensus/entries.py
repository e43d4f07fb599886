"""Signed ledger entries: their canonical encodings, the signing payload, signing and verification."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum

from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey

from consensus.codec import CodecError, is_integer, pack, unpack

# Envelope format. A node refuses versions it does not know rather than guessing at their meaning.
envelope_format_version = 1

# Limits. An entry is one signed operation; a batch of entries travels in one Raft entry.
entry_bytes_max = 1024
account_name_characters_max = 48
reference_characters_max = 64
amount_max = 2**63 - 1
transfer_id_bytes = 16
public_key_bytes = 32
signature_bytes = 64

# Bakong-style account ids: `name@institution`. The institution part is the owning institution's id.
# Patterns are applied with fullmatch: `$` in re.match would accept a trailing newline.
account_name_pattern = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}@[a-z][a-z0-9_]{1,15}")
institution_id_pattern = re.compile(r"[a-z][a-z0-9_]{1,15}")
currency_code_pattern = re.compile(r"[A-Z]{3}")
cluster_id_pattern = re.compile(r"[a-z0-9][a-z0-9-]{2,63}")

_signing_domain = b"tonle/entry/v1"
_transfer_id_zero = bytes(transfer_id_bytes)
_transfer_id_max = b"\xff" * transfer_id_bytes


class EntryKind(IntEnum):
    """What an entry does. The number travels in the envelope; the name is bound into the signature."""

    TRANSFER = 1
    OPEN_ACCOUNT = 2
    ISSUE = 3


class EntryError(ValueError):
    """An entry that cannot be accepted as written. `code` is a stable, machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Transfer:
    """Move `amount` minor units of `currency` from the debit account to the credit account."""

    id: bytes
    debit_account: str
    credit_account: str
    amount: int
    currency: str


@dataclass(frozen=True, slots=True)
class OpenAccount:
    """Open a customer account `name@institution`, holding one currency, for the signing institution."""

    account: str
    currency: str


@dataclass(frozen=True, slots=True)
class Issue:
    """The central bank credits an institution's settlement account with newly issued money."""

    id: bytes
    credit_account: str
    amount: int
    currency: str


Body = Transfer | OpenAccount | Issue


@dataclass(frozen=True, slots=True)
class SignedEntry:
    """An entry as it travels and is stored: the body bytes plus who signed them, with what key."""

    cluster_id: str
    kind: EntryKind
    body_bytes: bytes
    signer: str
    public_key: bytes
    signature: bytes
    raw: bytes

    def signing_payload(self) -> bytes:
        return signing_payload(self.cluster_id, self.kind, self.body_bytes)

    def body(self) -> Body:
        return decode_body(self.kind, self.body_bytes)


def signing_payload(cluster_id: str, kind: EntryKind, body_bytes: bytes) -> bytes:
    """What a signature covers: a fixed domain, the network and the entry kind, then the body.

    The network id and kind are length-prefixed into the signed bytes, so a signature made for one network
    or one kind of entry never verifies for another, and no choice of ids can make two prefixes collide.
    """
    cluster = cluster_id.encode()
    kind_name = kind.name.lower().encode()
    return b"".join(
        (
            _signing_domain,
            len(cluster).to_bytes(1, "big"),
            cluster,
            len(kind_name).to_bytes(1, "big"),
            kind_name,
            body_bytes,
        )
    )


def _require_string(fields: list, position: int, name: str, pattern: re.Pattern[str]) -> str:
    value = fields[position]
    if type(value) is not str:
        raise EntryError("malformed_entry", f"{name} must be a string")
    if not pattern.fullmatch(value):
        raise EntryError(f"invalid_{name}", f"{name} {value!r} is not valid")
    return value


def _require_amount(value: object) -> int:
    if not is_integer(value):
        raise EntryError("malformed_entry", f"amount must be an integer, got {type(value).__name__}")
    if value <= 0:
        raise EntryError("amount_must_be_positive", f"amount must be at least 1, got {value}")
    if value > amount_max:
        raise EntryError("amount_out_of_range", f"amount must be at most {amount_max}")
    return value


def _require_transfer_id(value: object) -> bytes:
    if type(value) is not bytes or len(value) != transfer_id_bytes:
        raise EntryError("malformed_entry", f"id must be {transfer_id_bytes} bytes")
    if value == _transfer_id_zero:
        raise EntryError("id_must_not_be_zero", "id must not be zero")
    if value == _transfer_id_max:
        raise EntryError("id_must_not_be_int_max", "id must not be 2^128-1")
    return value


def _fields(body_bytes: bytes, count: int, kind: EntryKind) -> list:
    try:
        fields = unpack(body_bytes)
    except CodecError as error:
        raise EntryError("malformed_entry", f"{kind.name.lower()} body: {error}") from None
    if type(fields) is not list or len(fields) != count + 1:
        raise EntryError("malformed_entry", f"{kind.name.lower()} body must be an array of {count + 1}")
    if fields[0] != 1 or not is_integer(fields[0]):
        raise EntryError("unsupported_version", f"{kind.name.lower()} body version {fields[0]!r}")
    return fields[1:]


def decode_body(kind: EntryKind, body_bytes: bytes) -> Body:
    """Decode and validate the shape of a body. Rules that need state (accounts exist...) are in storage."""
    if kind is EntryKind.TRANSFER:
        fields = _fields(body_bytes, 5, kind)
        transfer = Transfer(
            id=_require_transfer_id(fields[0]),
            debit_account=_require_string(fields, 1, "debit_account", account_name_pattern),
            credit_account=_require_string(fields, 2, "credit_account", account_name_pattern),
            amount=_require_amount(fields[3]),
            currency=_require_string(fields, 4, "currency", currency_code_pattern),
        )
        return transfer
    if kind is EntryKind.OPEN_ACCOUNT:
        fields = _fields(body_bytes, 2, kind)
        return OpenAccount(
            account=_require_string(fields, 0, "account", account_name_pattern),
            currency=_require_string(fields, 1, "currency", currency_code_pattern),
        )
    if kind is EntryKind.ISSUE:
        fields = _fields(body_bytes, 4, kind)
        return Issue(
            id=_require_transfer_id(fields[0]),
            credit_account=_require_string(fields, 1, "credit_account", account_name_pattern),
            amount=_require_amount(fields[2]),
            currency=_require_string(fields, 3, "currency", currency_code_pattern),
        )
    raise EntryError("unknown_kind", f"entry kind {kind!r}")


def encode_body(body: Body) -> bytes:
    """The canonical body bytes: a versioned positional array."""
    if isinstance(body, Transfer):
        return pack([1, body.id, body.debit_account, body.credit_account, body.amount, body.currency])
    if isinstance(body, OpenAccount):
        return pack([1, body.account, body.currency])
    if isinstance(body, Issue):
        return pack([1, body.id, body.credit_account, body.amount, body.currency])
    raise TypeError(f"not an entry body: {type(body).__name__}")


def kind_of(body: Body) -> EntryKind:
    if isinstance(body, Transfer):
        return EntryKind.TRANSFER
    if isinstance(body, OpenAccount):
        return EntryKind.OPEN_ACCOUNT
    if isinstance(body, Issue):
        return EntryKind.ISSUE
    raise TypeError(f"not an entry body: {type(body).__name__}")


def sign_entry(body: Body, *, cluster_id: str, signer: str, signing_key: SigningKey) -> bytes:
    """Encode `body`, sign it for `cluster_id` as institution `signer`, and return the envelope bytes.

    The body is decoded again before signing so a client can never sign (and send) something that every
    node will refuse as malformed.
    """
    kind = kind_of(body)
    body_bytes = encode_body(body)
    decode_body(kind, body_bytes)
    signature = signing_key.sign(signing_payload(cluster_id, kind, body_bytes)).signature
    public_key = bytes(signing_key.verify_key)
    raw = pack([envelope_format_version, cluster_id, int(kind), body_bytes, signer, public_key, signature])
    if len(raw) > entry_bytes_max:
        raise EntryError("entry_too_large", f"entry is {len(raw)} bytes; the limit is {entry_bytes_max}")
    return raw


def decode_entry(raw: bytes) -> SignedEntry:
    """Decode an envelope's structure. The body is decoded separately (`SignedEntry.body`)."""
    if type(raw) is not bytes:
        raise EntryError("malformed_entry", "an entry must be bytes")
    if len(raw) > entry_bytes_max:
        raise EntryError("entry_too_large", f"entry is {len(raw)} bytes; the limit is {entry_bytes_max}")
    try:
        fields = unpack(raw)
    except CodecError as error:
        raise EntryError("malformed_entry", str(error)) from None
    if type(fields) is not list or len(fields) != 7:
        raise EntryError("malformed_entry", "an entry must be an array of 7 fields")
    version, cluster_id, kind_number, body_bytes, signer, public_key, signature = fields
    if not is_integer(version) or version != envelope_format_version:
        raise EntryError("unsupported_version", f"entry format version {version!r}")
    if type(cluster_id) is not str or not cluster_id_pattern.fullmatch(cluster_id):
        raise EntryError("malformed_entry", "cluster id must be a network id string")
    if not is_integer(kind_number) or kind_number not in EntryKind._value2member_map_:
        raise EntryError("unknown_kind", f"entry kind {kind_number!r}")
    if type(body_bytes) is not bytes:
        raise EntryError("malformed_entry", "body must be bytes")
    if type(signer) is not str or not institution_id_pattern.fullmatch(signer):
        raise EntryError("malformed_entry", "signer must be an institution id")
    if type(public_key) is not bytes or len(public_key) != public_key_bytes:
        raise EntryError("malformed_entry", f"public key must be {public_key_bytes} bytes")
    if type(signature) is not bytes or len(signature) != signature_bytes:
        raise EntryError("malformed_entry", f"signature must be {signature_bytes} bytes")
    return SignedEntry(
        cluster_id=cluster_id,
        kind=EntryKind(kind_number),
        body_bytes=body_bytes,
        signer=signer,
        public_key=public_key,
        signature=signature,
        raw=raw,
    )


def signature_is_valid(entry: SignedEntry) -> bool:
    """Ed25519 over the signing payload with the key named in the envelope.

    Whether that key may sign for `entry.signer` is decided in the apply, against replicated state; this
    check needs no state, so it runs in parallel threads ahead of the apply and its answer can be cached.
    libsodium releases the GIL and refuses small-order keys and non-canonical signatures.
    """
    try:
        crypto_sign_open(entry.signature + entry.signing_payload(), entry.public_key)
    except (BadSignatureError, ValueError):
        return False
    return True


def entry_key(body: Body) -> bytes:
    """The idempotency key under which the entry's outcome is recorded and awaited."""
    if isinstance(body, (Transfer, Issue)):
        return b"t" + body.id
    return b"a" + body.account.encode()
