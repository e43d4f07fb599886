"""Signed ledger entries: every kind, its canonical encoding, the signing payload, signing and verification."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import IntEnum, IntFlag
from typing import Any, ClassVar

from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey

from consensus.codec import CodecError, is_integer, pack, unpack

# Envelope format. A node refuses versions it does not know rather than guessing at their meaning.
envelope_format_version = 1
body_format_version = 1

# Limits. An entry is one signed operation; a batch of entries travels in one Raft entry.
entry_bytes_max = 1024
amount_max = 2**63 - 1
transfer_id_bytes = 16
public_key_bytes = 32
signature_bytes = 64
reference_characters_max = 128
display_name_characters_max = 80
user_data_bytes_max = 32
code_max = 2**16 - 1
timeout_seconds_max = 2**32 - 1
rate_term_max = 2**32 - 1
address_characters_max = 261

# Bakong-style account ids: `name@institution`, the institution part naming the owner. Aliases are phone
# numbers in E.164 form. Patterns are applied with fullmatch: `$` in re.match would accept a trailing newline.
account_name_pattern = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}@[a-z][a-z0-9_]{1,15}")
alias_pattern = re.compile(r"\+[1-9][0-9]{7,14}")
institution_id_pattern = re.compile(r"[a-z][a-z0-9_]{1,15}")
node_name_pattern = re.compile(r"[a-z][a-z0-9-]{0,31}")
currency_code_pattern = re.compile(r"[A-Z]{3}")
cluster_id_pattern = re.compile(r"[a-z0-9][a-z0-9-]{2,63}")
reference_pattern = re.compile(r"[\x20-\x7e]{0,128}")
address_pattern = re.compile(r"[A-Za-z0-9.\-\[\]:]{1,253}:[0-9]{1,5}")

institution_roles = ("bank", "mfi", "psp", "foreign_switch")
kyc_tiers = ("basic", "intermediate", "full", "bank", "unlimited")

_signing_domain = b"tonle/entry/v1"
_transfer_id_zero = bytes(transfer_id_bytes)
_transfer_id_max = b"\xff" * transfer_id_bytes


class EntryKind(IntEnum):
    """What an entry does. The number travels in the envelope; the name is bound into the signature."""

    TRANSFER = 1
    OPEN_ACCOUNT = 2
    ISSUE = 3
    REDEEM = 4
    CLOSE_ACCOUNT = 5
    FREEZE_ACCOUNT = 6
    UNFREEZE_ACCOUNT = 7
    ADMIT_INSTITUTION = 8
    SUSPEND_INSTITUTION = 9
    REINSTATE_INSTITUTION = 10
    ROTATE_KEY = 11
    REGISTER_ALIAS = 12
    UNREGISTER_ALIAS = 13
    SET_KYC_TIER = 14
    ADMIT_NODE = 15


class TransferFlags(IntFlag):
    """TigerBeetle's transfer flags, with the same meanings."""

    NONE = 0
    LINKED = 1  # applies with the next entry, all or nothing; the last entry of a chain does not set it
    PENDING = 2  # reserve the amount; post or void it later, or let it expire
    POST_PENDING = 4  # post (all or part of) the pending transfer named by pending_id
    VOID_PENDING = 8  # release the pending transfer named by pending_id
    BALANCING_DEBIT = 16  # move at most `amount`: as much as the debit account's limit allows
    BALANCING_CREDIT = 32  # move at most `amount`: as much as the credit account's limit allows


transfer_flags_all = 63
_phase_flags = int(TransferFlags.PENDING | TransferFlags.POST_PENDING | TransferFlags.VOID_PENDING)
_resolving_flags = int(TransferFlags.POST_PENDING | TransferFlags.VOID_PENDING)
_balancing_flags = int(TransferFlags.BALANCING_DEBIT | TransferFlags.BALANCING_CREDIT)
_pending_flag = int(TransferFlags.PENDING)


class AccountFlags(IntFlag):
    NONE = 0
    DEBITS_MUST_NOT_EXCEED_CREDITS = 1
    CREDITS_MUST_NOT_EXCEED_DEBITS = 2


class EntryError(ValueError):
    """An entry that cannot be accepted as written. `code` is a stable, machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# Field checks. Each takes the field's name and value and returns the value or raises EntryError. -----


def _string(pattern: re.Pattern[str], *, empty_allowed: bool = False) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if type(value) is not str:
            raise EntryError("malformed_entry", f"{name} must be a string")
        if value == "" and empty_allowed:
            return value
        if not pattern.fullmatch(value):
            raise EntryError(f"invalid_{name}", f"{name} {value[:80]!r} is not valid")
        return value

    return check


def _account_or_alias(name: str, value: Any) -> str:
    if type(value) is not str:
        raise EntryError("malformed_entry", f"{name} must be a string")
    if value == "" or account_name_pattern.fullmatch(value) or alias_pattern.fullmatch(value):
        return value
    raise EntryError(f"invalid_{name}", f"{name} {value[:80]!r} is neither an account id nor an E.164 alias")


def _unsigned(maximum: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if not is_integer(value):
            raise EntryError("malformed_entry", f"{name} must be an integer, got {type(value).__name__}")
        if not 0 <= value <= maximum:
            raise EntryError(f"{name}_out_of_range", f"{name} must be in 0..{maximum}, got {value}")
        return value

    return check


def _amount(name: str, value: Any) -> int:
    if not is_integer(value):
        raise EntryError("malformed_entry", f"{name} must be an integer, got {type(value).__name__}")
    if value < 0:
        raise EntryError("amount_must_be_positive", f"{name} must not be negative, got {value}")
    if value > amount_max:
        raise EntryError("amount_out_of_range", f"{name} must be at most {amount_max}")
    return value


def _transfer_id(name: str, value: Any) -> bytes:
    if type(value) is not bytes or len(value) != transfer_id_bytes:
        raise EntryError("malformed_entry", f"{name} must be {transfer_id_bytes} bytes")
    if value == _transfer_id_zero:
        raise EntryError(f"{name}_must_not_be_zero", f"{name} must not be zero")
    if value == _transfer_id_max:
        raise EntryError(f"{name}_must_not_be_int_max", f"{name} must not be 2^128-1")
    return value


def _optional_transfer_id(name: str, value: Any) -> bytes:
    if value == b"":
        return value
    return _transfer_id(name, value)


def _bytes(maximum: int) -> Callable[[str, Any], bytes]:
    def check(name: str, value: Any) -> bytes:
        if type(value) is not bytes or len(value) > maximum:
            raise EntryError("malformed_entry", f"{name} must be at most {maximum} bytes")
        return value

    return check


def _public_key(name: str, value: Any) -> bytes:
    if type(value) is not bytes or len(value) != public_key_bytes:
        raise EntryError("malformed_entry", f"{name} must be {public_key_bytes} bytes")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if type(value) is not str or value not in options:
            raise EntryError(f"invalid_{name}", f"{name} must be one of {', '.join(options)}")
        return value

    return check


def _display_name(name: str, value: Any) -> str:
    if type(value) is not str or not 1 <= len(value) <= display_name_characters_max or not value.isprintable():
        raise EntryError(f"invalid_{name}", f"{name} must be 1..{display_name_characters_max} printable characters")
    return value


_account = _string(account_name_pattern)
_currency = _string(currency_code_pattern)
_optional_currency = _string(currency_code_pattern, empty_allowed=True)
_institution = _string(institution_id_pattern)
_alias = _string(alias_pattern)


# Bodies ---------------------------------------------------------------------------------------------


class _Body:
    """Bodies encode as `[body_format_version, field, ...]` in declaration order; `checks` validate each."""

    kind: ClassVar[EntryKind]
    checks: ClassVar[tuple[Callable[[str, Any], Any], ...]]

    def validate(self) -> None:
        """Rules between fields that need no state (the apply checks the rest)."""


@dataclass(frozen=True, slots=True)
class Transfer(_Body):
    """Move `amount` minor units from the debit account to the credit account (TigerBeetle semantics).

    For post/void of a pending transfer, the accounts and currency may be left empty (taken from the
    pending transfer) and an amount of 0 means the whole pending amount. `rate_numerator/denominator`,
    when set, declare this leg of a linked currency exchange: its amount must equal the previous leg's
    amount times the rate, rounded down, so the rate is part of what the signer signed.
    """

    kind: ClassVar[EntryKind] = EntryKind.TRANSFER
    id: bytes
    debit_account: str
    credit_account: str
    amount: int
    currency: str
    flags: int = 0
    pending_id: bytes = b""
    timeout_seconds: int = 0
    reference: str = ""
    code: int = 0
    rate_numerator: int = 0
    rate_denominator: int = 0

    def validate(self) -> None:
        # Plain int bit tests: this runs for every transfer on every node, and enum operations are slow.
        flags = self.flags
        phases = bin(flags & _phase_flags).count("1")
        balancing = flags & _balancing_flags
        resolving = bool(flags & _resolving_flags)
        if phases > 1 or (balancing and resolving):
            raise EntryError("flags_are_mutually_exclusive", "at most one of pending/post/void, and no balancing with post/void")
        if resolving:
            if self.pending_id == b"":
                raise EntryError("pending_id_must_not_be_zero", "post and void name the pending transfer in pending_id")
            if self.pending_id == self.id:
                raise EntryError("pending_id_must_be_different", "pending_id must name another transfer")
        else:
            if self.pending_id != b"":
                raise EntryError("pending_id_must_be_zero", "only post and void name a pending transfer")
            if self.amount == 0 and not balancing:
                raise EntryError("amount_must_be_positive", "amount must be at least 1")
            if self.debit_account == "" or self.credit_account == "" or self.currency == "":
                raise EntryError("malformed_entry", "accounts and currency are required")
        if self.timeout_seconds and not flags & _pending_flag:
            raise EntryError("timeout_reserved_for_pending_transfer", "only a pending transfer has a timeout")
        if (self.rate_numerator == 0) != (self.rate_denominator == 0):
            raise EntryError("invalid_rate", "a rate needs both a numerator and a denominator")


Transfer.checks = (
    _transfer_id,
    _account_or_alias,
    _account_or_alias,
    _amount,
    _optional_currency,
    _unsigned(transfer_flags_all),
    _optional_transfer_id,
    _unsigned(timeout_seconds_max),
    _string(reference_pattern, empty_allowed=True),
    _unsigned(code_max),
    _unsigned(rate_term_max),
    _unsigned(rate_term_max),
)


@dataclass(frozen=True, slots=True)
class OpenAccount(_Body):
    """Open `name@institution` in one currency, for the signing institution, with limits and a KYC tier."""

    kind: ClassVar[EntryKind] = EntryKind.OPEN_ACCOUNT
    account: str
    currency: str
    flags: int = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
    code: int = 0
    user_data: bytes = b""
    tier: str = "basic"

    def validate(self) -> None:
        both = AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS | AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS
        if AccountFlags(self.flags) & both == both:
            raise EntryError("flags_are_mutually_exclusive", "an account limits debits or credits, not both")


OpenAccount.checks = (
    _account,
    _currency,
    _unsigned(int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS | AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS)),
    _unsigned(code_max),
    _bytes(user_data_bytes_max),
    _choice(kyc_tiers),
)


@dataclass(frozen=True, slots=True)
class Issue(_Body):
    """The central bank credits an institution's settlement account with newly issued money."""

    kind: ClassVar[EntryKind] = EntryKind.ISSUE
    id: bytes
    credit_account: str
    amount: int
    currency: str

    def validate(self) -> None:
        if self.amount == 0:
            raise EntryError("amount_must_be_positive", "amount must be at least 1")


Issue.checks = (_transfer_id, _account, _amount, _currency)


@dataclass(frozen=True, slots=True)
class Redeem(_Body):
    """The central bank takes money back out of circulation from an institution's settlement account."""

    kind: ClassVar[EntryKind] = EntryKind.REDEEM
    id: bytes
    debit_account: str
    amount: int
    currency: str

    def validate(self) -> None:
        if self.amount == 0:
            raise EntryError("amount_must_be_positive", "amount must be at least 1")


Redeem.checks = (_transfer_id, _account, _amount, _currency)


@dataclass(frozen=True, slots=True)
class CloseAccount(_Body):
    """The owner closes an account with nothing in it; it then takes no more debits or credits."""

    kind: ClassVar[EntryKind] = EntryKind.CLOSE_ACCOUNT
    account: str


CloseAccount.checks = (_account,)


@dataclass(frozen=True, slots=True)
class FreezeAccount(_Body):
    """The central bank freezes an account: no debits or credits until it is unfrozen."""

    kind: ClassVar[EntryKind] = EntryKind.FREEZE_ACCOUNT
    account: str


FreezeAccount.checks = (_account,)


@dataclass(frozen=True, slots=True)
class UnfreezeAccount(_Body):
    kind: ClassVar[EntryKind] = EntryKind.UNFREEZE_ACCOUNT
    account: str


UnfreezeAccount.checks = (_account,)


@dataclass(frozen=True, slots=True)
class AdmitInstitution(_Body):
    """The central bank admits an institution; its settlement accounts open in every currency."""

    kind: ClassVar[EntryKind] = EntryKind.ADMIT_INSTITUTION
    institution: str
    name: str
    role: str
    public_key: bytes


AdmitInstitution.checks = (_institution, _display_name, _choice(institution_roles), _public_key)


@dataclass(frozen=True, slots=True)
class SuspendInstitution(_Body):
    """The central bank suspends an institution: nothing it signs is applied until it is reinstated."""

    kind: ClassVar[EntryKind] = EntryKind.SUSPEND_INSTITUTION
    institution: str


SuspendInstitution.checks = (_institution,)


@dataclass(frozen=True, slots=True)
class ReinstateInstitution(_Body):
    kind: ClassVar[EntryKind] = EntryKind.REINSTATE_INSTITUTION
    institution: str


ReinstateInstitution.checks = (_institution,)


@dataclass(frozen=True, slots=True)
class RotateKey(_Body):
    """Replace an institution's signing key (signed by it or by the central bank).

    The old key is retired, not forgotten: entries it signed stay verifiable (the key travels in each
    entry, and the institution's key history records when each key was valid), new entries need the new key.
    """

    kind: ClassVar[EntryKind] = EntryKind.ROTATE_KEY
    institution: str
    public_key: bytes


RotateKey.checks = (_institution, _public_key)


@dataclass(frozen=True, slots=True)
class RegisterAlias(_Body):
    """The owning institution registers a phone number (E.164) for one of its accounts; unique network-wide."""

    kind: ClassVar[EntryKind] = EntryKind.REGISTER_ALIAS
    alias: str
    account: str


RegisterAlias.checks = (_alias, _account)


@dataclass(frozen=True, slots=True)
class UnregisterAlias(_Body):
    kind: ClassVar[EntryKind] = EntryKind.UNREGISTER_ALIAS
    alias: str


UnregisterAlias.checks = (_alias,)


@dataclass(frozen=True, slots=True)
class SetKycTier(_Body):
    """The owning institution sets an account's KYC tier, which sets its daily outflow limits."""

    kind: ClassVar[EntryKind] = EntryKind.SET_KYC_TIER
    account: str
    tier: str


SetKycTier.checks = (_account, _choice(kyc_tiers))


@dataclass(frozen=True, slots=True)
class AdmitNode(_Body):
    """The central bank admits an institution's node, so it can join as a read-only replica while the
    network runs (its key then authenticates its Raft connections, as genesis nodes' keys do)."""

    kind: ClassVar[EntryKind] = EntryKind.ADMIT_NODE
    name: str
    institution: str
    public_key: bytes
    raft_address: str
    client_address: str
    admin_address: str


AdmitNode.checks = (
    _string(node_name_pattern),
    _institution,
    _public_key,
    _string(address_pattern),
    _string(address_pattern),
    _string(address_pattern),
)


Body = (
    Transfer
    | OpenAccount
    | Issue
    | Redeem
    | CloseAccount
    | FreezeAccount
    | UnfreezeAccount
    | AdmitInstitution
    | SuspendInstitution
    | ReinstateInstitution
    | RotateKey
    | RegisterAlias
    | UnregisterAlias
    | SetKycTier
    | AdmitNode
)
_body_types: dict[EntryKind, type] = {
    body_type.kind: body_type
    for body_type in (
        Transfer, OpenAccount, Issue, Redeem, CloseAccount, FreezeAccount, UnfreezeAccount, AdmitInstitution,
        SuspendInstitution, ReinstateInstitution, RotateKey, RegisterAlias, UnregisterAlias, SetKycTier, AdmitNode,
    )
}
_field_names = {body_type: tuple(field.name for field in fields(body_type)) for body_type in _body_types.values()}
# Kinds whose outcome is pinned under a 128-bit id chosen by the client.
transfer_like_kinds = frozenset({EntryKind.TRANSFER, EntryKind.ISSUE, EntryKind.REDEEM})


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
        (_signing_domain, len(cluster).to_bytes(1, "big"), cluster, len(kind_name).to_bytes(1, "big"), kind_name, body_bytes)
    )


def decode_body(kind: EntryKind, body_bytes: bytes) -> Body:
    """Decode and validate a body's shape. Rules that need state (accounts exist...) are in storage."""
    body_type = _body_types.get(kind)
    if body_type is None:
        raise EntryError("unknown_kind", f"entry kind {kind!r}")
    try:
        values = unpack(body_bytes)
    except CodecError as error:
        raise EntryError("malformed_entry", f"{kind.name.lower()} body: {error}") from None
    names = _field_names[body_type]
    if type(values) is not list or not values or not is_integer(values[0]):
        raise EntryError("malformed_entry", f"{kind.name.lower()} body must be an array")
    if values[0] != body_format_version:
        raise EntryError("unsupported_version", f"{kind.name.lower()} body version {values[0]!r}")
    if len(values) != len(names) + 1:
        raise EntryError("malformed_entry", f"{kind.name.lower()} body must have {len(names)} fields")
    body = body_type(*(check(name, value) for check, name, value in zip(body_type.checks, names, values[1:], strict=True)))
    body.validate()
    return body


def encode_body(body: Body) -> bytes:
    """The canonical body bytes: a versioned positional array of the fields in declaration order."""
    return pack([body_format_version, *(getattr(body, field.name) for field in fields(body))])


def sign_entry(body: Body, *, cluster_id: str, signer: str, signing_key: SigningKey) -> bytes:
    """Encode `body`, sign it for `cluster_id` as institution `signer`, and return the envelope bytes.

    The body is decoded again before signing so a client can never sign (and send) something that every
    node will refuse as malformed.
    """
    kind = body.kind
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
        values = unpack(raw)
    except CodecError as error:
        raise EntryError("malformed_entry", str(error)) from None
    if type(values) is not list or len(values) != 7:
        raise EntryError("malformed_entry", "an entry must be an array of 7 fields")
    version, cluster_id, kind_number, body_bytes, signer, public_key, signature = values
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
    return SignedEntry(cluster_id, EntryKind(kind_number), body_bytes, signer, public_key, signature, raw)


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


def entry_key(entry: SignedEntry, body: Body) -> bytes:
    """The key under which an entry's outcome is awaited (and, for transfer-like kinds, pinned).

    Transfer-like entries are keyed by their id; every other kind by a digest of its kind and body, so
    the same request sent twice waits for one outcome.
    """
    if entry.kind in transfer_like_kinds:
        return b"t" + body.id  # type: ignore[union-attr]
    return b"e" + hashlib.blake2b(bytes([entry.kind]) + entry.body_bytes, digest_size=16).digest()
