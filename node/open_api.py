"""The Bakong-style Open API: an HTTP JSON listener answering Bakong's check endpoints from applied state."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from enum import IntEnum
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consensus.entries import EntryKind, TransferFlags, account_name_pattern, alias_pattern, institution_id_pattern
from storage import queries
from storage.entry_hashes import EntryHashIndex, EntryHashIndexBehind
from storage.records import get_currency, time_of_index
from storage.state import LedgerStore, StateTransaction

if TYPE_CHECKING:
    from node.server import LedgerNode

logger = logging.getLogger("tonle.open_api")

# Limits of one HTTP exchange. The Open API answers one request per connection (Connection: close).
request_head_bytes_max = 8192
request_body_bytes_max = 16384
request_read_timeout_seconds = 5.0
open_api_connections_max = 256
bearer_token_characters_max = 256
# Bakong's own limit for check_transaction_by_md5_list (bsthen/bakong-khqr `check_bulk_payments`).
md5_list_entries_max = 50
# Transfers examined for one lookup key (an MD5, a hash prefix, a reference token) before giving up.
lookup_candidates_max = 100
# What a lookup by hash tells the caller to wait while the node rebuilds its entry-hash index.
index_rebuilding_retry_seconds = 1
# How often the token file is checked for changes (new tokens, revoked ones), at most.
tokens_file_check_seconds = 1.0
# Per-institution token buckets, unless the token file says otherwise.
requests_per_second_default = 10
burst_default = 20
requests_per_second_max = 100_000
burst_max = 100_000
# A new token: 32 random bytes, URL-safe base64 (43 characters). Only its SHA-256 is ever stored.
token_random_bytes = 32
token_hash_bytes = 32

md5_hex_characters = 32
full_hash_hex_characters = 64
short_hash_hex_characters = 8
transfer_id_hex_characters = 32
# An amount in a request (short-hash lookup) is compared exactly; one with more digits, or a larger power of
# ten, than this cannot be the amount of any transfer (at most 2**63 - 1 minor units).
amount_digits_max = 40
amount_exponent_max = 40

# Reference tokens written by `tonle pay` (node/pay.py): one for the MD5 of a dynamic KHQR, another for a
# static one (many payments share a static code's MD5, so Bakong refuses to look it up: error 2).
md5_token_prefix = "md5:"
static_md5_token_prefix = "static-md5:"

_hex = re.compile(r"[0-9a-fA-F]+", re.ASCII)
_bearer = re.compile(r"Bearer ([A-Za-z0-9\-._~+/]+=*)", re.ASCII)
_sha256_hex = re.compile(r"[0-9a-f]{64}", re.ASCII)
_header_name = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", re.ASCII)
_content_length = re.compile(r"[0-9]{1,9}", re.ASCII)

_reasons = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class ErrorCode(IntEnum):
    """Bakong Open API `errorCode` values (Bakong Open API Document; khqr-sdk `fetch.type.ts`)."""

    TRANSACTION_NOT_FOUND = 1
    STATIC_QR_NOT_SUPPORTED = 2
    TRANSACTION_FAILED = 3
    DEEPLINK_PROVIDER_ERROR = 4
    MISSING_REQUIRED_FIELDS = 5
    UNAUTHORIZED = 6
    EMAIL_SERVER_DOWN = 7
    EMAIL_ALREADY_REGISTERED = 8
    CANNOT_CONNECT = 9
    NOT_REGISTERED = 10
    ACCOUNT_ID_NOT_FOUND = 11
    ACCOUNT_ID_INVALID = 12


# Bakong's messages, word for word, so integrators' log matching keeps working.
message_transaction_found = "Getting transaction successfully."
message_transaction_not_found = "Transaction could not be found. Please check and try again."
message_static_qr = "Sorry, the system does not support static QR code."
message_transaction_failed = "Transaction failed."
message_missing_fields = "Missing required fields."
message_unauthorized = "Unauthorized."
message_account_exists = "Account ID exists"
message_account_not_found = "Account ID not found"
message_account_invalid = "Account ID is invalid"
message_too_many_requests = "Too many requests. Please retry later."

response_success = 0
response_failure = 1


class OpenApiConfigError(Exception):
    """The Open API token file cannot be used; every problem found is listed, one per line."""

    def __init__(self, problems: tuple[str, ...]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# Access: tokens and rate limits ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: `burst` requests at once, refilled at `requests_per_second`."""

    requests_per_second: int
    burst: int


@dataclass(frozen=True, slots=True)
class ApiToken:
    institution: str
    sha256: bytes


default_rate_limit = RateLimit(requests_per_second_default, burst_default)


@dataclass(frozen=True, slots=True)
class OpenApiAccess:
    """Who may call: SHA-256 hashes of bearer tokens, each for one institution, and per-institution limits."""

    tokens: tuple[ApiToken, ...]
    rate_limits: dict[str, RateLimit] = field(default_factory=dict)

    def institution_for(self, token: str) -> str | None:
        """The institution a token belongs to. Every stored hash is compared, in constant time each, so the
        time taken says nothing about which hash (or how much of it) matched."""
        presented = token_digest(token)
        found: str | None = None
        for candidate in self.tokens:
            if hmac.compare_digest(presented, candidate.sha256):
                found = candidate.institution
        return found

    def rate_limit(self, institution: str) -> RateLimit:
        return self.rate_limits.get(institution, default_rate_limit)


def new_token() -> str:
    return secrets.token_urlsafe(token_random_bytes)


def token_digest(token: str) -> bytes:
    """Tokens are 256 random bits, so a plain SHA-256 is enough: there is nothing to brute-force."""
    return hashlib.sha256(token.encode()).digest()


def load_access(path: Path) -> OpenApiAccess:
    """Read a token file:

        [[tokens]]
        institution = "aba"
        sha256 = "<64 lower-case hex digits: SHA-256 of the token>"

        [[rate_limits]]            # optional; the default is 10 requests a second, bursts of 20
        institution = "aba"
        requests_per_second = 50
        burst = 100
    """
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise OpenApiConfigError((f"{path}: cannot read: {error.strerror or error}",)) from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise OpenApiConfigError((f"{path}: not valid TOML: {error}",)) from None
    problems: list[str] = []
    for key in document:
        if key not in ("tokens", "rate_limits"):
            problems.append(f"{path}: {key}: unknown key")
    tokens = _read_tokens(path, document.get("tokens", []), problems)
    rate_limits = _read_rate_limits(path, document.get("rate_limits", []), problems)
    if problems:
        raise OpenApiConfigError(tuple(problems))
    return OpenApiAccess(tuple(tokens), rate_limits)


def _tables(path: Path, name: str, value: object, problems: list[str]) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        problems.append(f"{path}: {name}: expected an array of tables ([[{name}]])")
        return []
    return [(f"{path}: {name}[{position}]", item) for position, item in enumerate(value)]


def _keys(where: str, table: dict[str, Any], expected: tuple[str, ...], problems: list[str]) -> bool:
    unknown = sorted(set(table) - set(expected))
    missing = [key for key in expected if key not in table]
    problems.extend(f"{where}.{key}: unknown key" for key in unknown)
    problems.extend(f"{where}.{key}: missing required key" for key in missing)
    return not unknown and not missing


def _institution(where: str, value: object, problems: list[str]) -> str | None:
    if not isinstance(value, str) or not institution_id_pattern.fullmatch(value):
        problems.append(f"{where}.institution: must be an institution id, got {value!r}")
        return None
    return value


def _read_tokens(path: Path, value: object, problems: list[str]) -> list[ApiToken]:
    tokens: list[ApiToken] = []
    seen: set[bytes] = set()
    for where, table in _tables(path, "tokens", value, problems):
        if not _keys(where, table, ("institution", "sha256"), problems):
            continue
        institution = _institution(where, table["institution"], problems)
        digest = table["sha256"]
        if not isinstance(digest, str) or not _sha256_hex.fullmatch(digest):
            problems.append(f"{where}.sha256: must be {2 * token_hash_bytes} lower-case hex digits")
            continue
        if bytes.fromhex(digest) in seen:
            problems.append(f"{where}.sha256: the same token is listed twice")
            continue
        seen.add(bytes.fromhex(digest))
        if institution is not None:
            tokens.append(ApiToken(institution, bytes.fromhex(digest)))
    return tokens


def _read_rate_limits(path: Path, value: object, problems: list[str]) -> dict[str, RateLimit]:
    limits: dict[str, RateLimit] = {}
    for where, table in _tables(path, "rate_limits", value, problems):
        if not _keys(where, table, ("institution", "requests_per_second", "burst"), problems):
            continue
        institution = _institution(where, table["institution"], problems)
        rate = _bounded(where, "requests_per_second", table["requests_per_second"], requests_per_second_max, problems)
        burst = _bounded(where, "burst", table["burst"], burst_max, problems)
        if institution in limits:
            problems.append(f"{where}.institution: {institution} has two rate limits")
        elif institution is not None and rate is not None and burst is not None:
            limits[institution] = RateLimit(rate, burst)
    return limits


def _bounded(where: str, name: str, value: object, maximum: int, problems: list[str]) -> int | None:
    # bool is a subclass of int, but `true` is not 1 requests a second.
    if type(value) is not int or not 1 <= value <= maximum:
        problems.append(f"{where}.{name}: must be an integer 1..{maximum}, got {value!r}")
        return None
    return value


class RateLimiter:
    """One token bucket per institution, shared by all of its tokens."""

    def __init__(self, access: OpenApiAccess, clock: Callable[[], float]) -> None:
        self._access = access
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # institution -> (tokens, at)

    def replace_access(self, access: OpenApiAccess) -> None:
        """New limits apply from the next request; the buckets keep what they hold (no free burst)."""
        self._access = access

    def admit(self, institution: str) -> float:
        """0 if the request may go ahead (and it is counted), else the seconds until one would be admitted."""
        limit = self._access.rate_limit(institution)
        now = self._clock()
        tokens, at = self._buckets.get(institution, (float(limit.burst), now))
        tokens = min(float(limit.burst), tokens + (now - at) * limit.requests_per_second)
        if tokens >= 1.0:
            self._buckets[institution] = (tokens - 1.0, now)
            return 0.0
        self._buckets[institution] = (tokens, now)
        return (1.0 - tokens) / limit.requests_per_second


# Answers ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    document: Any
    headers: tuple[tuple[str, str], ...] = ()


class _BadRequest(Exception):
    """A request body the API cannot read (errorCode 5): what is wrong, for the server log only."""


def bakong_reply(code: int, message: str, error_code: ErrorCode | None, data: Any = None) -> dict[str, Any]:
    return {
        "responseCode": code,
        "responseMessage": message,
        "errorCode": None if error_code is None else int(error_code),
        "data": data,
    }


def _failure(status: int, message: str, error_code: ErrorCode | None, *headers: tuple[str, str]) -> Response:
    return Response(status, bakong_reply(response_failure, message, error_code), headers)


_not_found = bakong_reply(response_failure, message_transaction_not_found, ErrorCode.TRANSACTION_NOT_FOUND)
_failed = bakong_reply(response_failure, message_transaction_failed, ErrorCode.TRANSACTION_FAILED)
_static = bakong_reply(response_failure, message_static_qr, ErrorCode.STATIC_QR_NOT_SUPPORTED)


@dataclass(frozen=True, slots=True)
class _Caller:
    institution: str
    central_bank: bool


@dataclass(frozen=True, slots=True)
class _Finding:
    """What a lookup found: a payment (`transaction` set), a failed one, a static QR, or nothing."""

    status: str  # SUCCESS | FAILED | STATIC_QR | NOT_FOUND
    transaction: dict[str, Any] | None = None


_found_nothing = _Finding("NOT_FOUND")


class OpenApi:
    """The endpoints, answered from one read transaction of the node's applied state each."""

    def __init__(self, store: LedgerStore, access: OpenApiAccess, entry_hashes: EntryHashIndex | None = None) -> None:
        self._store = store
        self._entry_hashes = entry_hashes
        self._access = access
        self._endpoints: dict[str, Callable[[StateTransaction, _Caller, Any], dict[str, Any]]] = {
            "/v1/check_transaction_by_md5": self._by_md5,
            "/v1/check_transaction_by_hash": self._by_hash,
            "/v1/check_transaction_by_short_hash": self._by_short_hash,
            "/v1/check_transaction_by_external_ref": self._by_external_ref,
            "/v1/check_transaction_by_md5_list": self._by_md5_list,
            "/v1/check_bakong_account": self._account,
        }

    def replace_access(self, access: OpenApiAccess) -> None:
        self._access = access

    def knows(self, path: str) -> bool:
        return path in self._endpoints

    def authenticate(self, authorization: str | None) -> str | None:
        """The calling institution, if the bearer token is one of ours and the institution is active."""
        if authorization is None or len(authorization) > bearer_token_characters_max:
            return None
        match = _bearer.fullmatch(authorization)
        if match is None:
            return None
        institution = self._access.institution_for(match.group(1))
        if institution is None:
            return None
        with self._store.read() as transaction:
            record = queries.institution(transaction, institution)
        return institution if record is not None and record["status"] == "active" else None

    def answer(self, path: str, institution: str, body: bytes) -> Response:
        try:
            request = _parse_json(body)
        except _BadRequest:
            return _failure(400, message_missing_fields, ErrorCode.MISSING_REQUIRED_FIELDS)
        with self._store.read() as transaction:
            record = queries.institution(transaction, institution)
            caller = _Caller(institution, record is not None and record["role"] == "central_bank")
            try:
                return Response(200, self._endpoints[path](transaction, caller, request))
            except _BadRequest:
                return _failure(400, message_missing_fields, ErrorCode.MISSING_REQUIRED_FIELDS)
            except EntryHashIndexBehind as behind:
                # Bakong has no code for this; 503 with Retry-After is what its SDKs' HTTP clients retry on.
                return _failure(503, f"Lookup by hash is being rebuilt ({behind}).", None, ("Retry-After", str(index_rebuilding_retry_seconds)))

    # Endpoints ------------------------------------------------------------------------------------------

    def _by_md5(self, transaction: StateTransaction, caller: _Caller, request: Any) -> dict[str, Any]:
        return _single(self._md5(transaction, caller, _text(request, "md5")))

    def _by_hash(self, transaction: StateTransaction, caller: _Caller, request: Any) -> dict[str, Any]:
        digest = _text(request, "hash").lower()
        if len(digest) != full_hash_hex_characters or not _hex.fullmatch(digest):
            return _not_found
        found = queries.transfers_with_hash(transaction, self._entry_hashes, bytes.fromhex(digest), lookup_candidates_max)
        return _single(self._pick(transaction, caller, found))

    def _by_short_hash(self, transaction: StateTransaction, caller: _Caller, request: Any) -> dict[str, Any]:
        prefix = _text(request, "hash").lower()
        currency = _text(request, "currency")
        amount = _number(request, "amount")
        if len(prefix) != short_hash_hex_characters or not _hex.fullmatch(prefix):
            return _not_found
        currency_record = get_currency(transaction, currency)
        minor = None if currency_record is None else _minor_units(amount, currency_record.decimals)
        if minor is None:
            return _not_found
        found = [
            transfer
            for transfer in queries.transfers_with_hash(transaction, self._entry_hashes, bytes.fromhex(prefix), lookup_candidates_max)
            if transfer.get("currency") == currency and _payment_amount(transfer) == minor
        ]
        return _single(self._pick(transaction, caller, found))

    def _by_external_ref(self, transaction: StateTransaction, caller: _Caller, request: Any) -> dict[str, Any]:
        """The transfer id the payer's institution chose (what its receipt shows), else any reference token."""
        reference = _text(request, "externalRef")
        if len(reference) == transfer_id_hex_characters and _hex.fullmatch(reference):
            by_id = queries.transfer(transaction, bytes.fromhex(reference))
            finding = self._pick(transaction, caller, [by_id] if by_id is not None else [])
            if finding.status != "NOT_FOUND":
                return _single(finding)
        if len(reference.split()) != 1:
            return _not_found
        found = queries.transfers_with_reference(transaction, reference, lookup_candidates_max)
        return _single(self._pick(transaction, caller, found))

    def _by_md5_list(self, transaction: StateTransaction, caller: _Caller, request: Any) -> dict[str, Any]:
        # The SDKs disagree on the body: khqr-sdk sends {"md5List": [...]}, bakong-khqr a bare array.
        md5_list = request.get("md5List") if isinstance(request, dict) else request
        if not isinstance(md5_list, list) or not 1 <= len(md5_list) <= md5_list_entries_max:
            raise _BadRequest(f"md5List must hold 1 to {md5_list_entries_max} MD5s")
        if not all(isinstance(item, str) and item for item in md5_list):
            raise _BadRequest("every md5 must be a non-empty string")
        items = []
        for md5 in md5_list:
            finding = self._md5(transaction, caller, md5)
            items.append({
                "md5": md5,
                "status": finding.status,
                "message": _messages[finding.status],
                "transaction": finding.transaction,
            })
        return bakong_reply(response_success, message_transaction_found, None, items)

    def _account(self, transaction: StateTransaction, caller: _Caller, request: Any) -> dict[str, Any]:
        account_id = _text(request, "accountId")
        if not account_name_pattern.fullmatch(account_id):
            return bakong_reply(response_failure, message_account_invalid, ErrorCode.ACCOUNT_ID_INVALID)
        account = queries.balance(transaction, account_id)
        # A closed account can no longer be paid: for a payer asking "does this account exist", it does not.
        if account is None or account["closed"]:
            return bakong_reply(response_failure, message_account_not_found, ErrorCode.ACCOUNT_ID_NOT_FOUND)
        return bakong_reply(response_success, message_account_exists, None)

    # Lookups --------------------------------------------------------------------------------------------

    def _md5(self, transaction: StateTransaction, caller: _Caller, md5: str) -> _Finding:
        md5 = md5.lower()
        if len(md5) != md5_hex_characters or not _hex.fullmatch(md5):
            return _found_nothing
        found = queries.transfers_with_reference(transaction, md5_token_prefix + md5, lookup_candidates_max)
        finding = self._pick(transaction, caller, found)
        if finding.status != "NOT_FOUND":
            return finding
        static = queries.transfers_with_reference(transaction, static_md5_token_prefix + md5, lookup_candidates_max)
        if self._pick(transaction, caller, static).status != "NOT_FOUND":
            return _Finding("STATIC_QR")
        return _found_nothing

    def _pick(self, transaction: StateTransaction, caller: _Caller, found: list[dict[str, Any]]) -> _Finding:
        """The first payment the caller may see that succeeded; else a failure it may see; else nothing.

        An institution sees only transfers on which it or its customers are a party (as Bakong's members
        do); the central bank sees them all. What it may not see is answered exactly as what does not exist.
        """
        failed = False
        for transfer in found:
            status = _payment_status(transfer)
            if status is None or not _visible(transaction, caller, transfer):
                continue
            if status == "SUCCESS":
                return _Finding("SUCCESS", _transaction_document(transaction, transfer))
            failed = True
        return _Finding("FAILED") if failed else _found_nothing


_messages = {
    "SUCCESS": message_transaction_found,
    "NOT_FOUND": message_transaction_not_found,
    "FAILED": message_transaction_failed,
    "STATIC_QR": message_static_qr,
}


def _single(finding: _Finding) -> dict[str, Any]:
    if finding.status == "SUCCESS":
        return bakong_reply(response_success, message_transaction_found, None, finding.transaction)
    return {"FAILED": _failed, "STATIC_QR": _static}.get(finding.status, _not_found)


def _payment_status(transfer: dict[str, Any]) -> str | None:
    """SUCCESS or FAILED for a payment; None for what is not one (yet): issues, redemptions, the post or
    void of a pending transfer, and a pending transfer still reserved."""
    if transfer["kind"] != int(EntryKind.TRANSFER) or "debit_account" not in transfer:
        return None
    flags = TransferFlags(transfer["flags"])
    if flags & (TransferFlags.POST_PENDING | TransferFlags.VOID_PENDING):
        return None
    if transfer["result"] != "ok":
        return "FAILED"
    if TransferFlags.PENDING not in flags:
        return "SUCCESS"
    state = transfer["pending"]["state"]
    if state == "posted":
        return "SUCCESS"
    return None if state == "pending" else "FAILED"


def _payment_amount(transfer: dict[str, Any]) -> int:
    pending = transfer.get("pending")
    return pending["posted_amount"] if pending is not None else transfer["amount_moved"]


def _owner(transaction: StateTransaction, name: str) -> str | None:
    if alias_pattern.fullmatch(name):
        alias = queries.alias(transaction, name)
        if alias is None:
            return None
        name = alias["account"]
    return name.rpartition("@")[2]


def _visible(transaction: StateTransaction, caller: _Caller, transfer: dict[str, Any]) -> bool:
    if caller.central_bank or transfer["signer"] == caller.institution:
        return True
    return caller.institution in (
        _owner(transaction, transfer["debit_account"]),
        _owner(transaction, transfer["credit_account"]),
    )


def _transaction_document(transaction: StateTransaction, transfer: dict[str, Any]) -> dict[str, Any]:
    """Bakong's transaction shape. The hash is the SHA-256 of the signed entry, as every node stores it;
    the external reference is the transfer id its payer chose."""
    currency = get_currency(transaction, transfer["currency"])
    decimals = 0 if currency is None else currency.decimals
    acknowledged_ms = transfer["cluster_time_ms"]
    pending = transfer.get("pending")
    if pending is not None:
        acknowledged_ms = time_of_index(transaction, pending["resolved_index"]) or acknowledged_ms
    amount = _payment_amount(transfer)
    return {
        "hash": hashlib.sha256(transfer["entry"]).hexdigest(),
        "fromAccountId": transfer["debit_account"],
        "toAccountId": transfer["credit_account"],
        "currency": transfer["currency"],
        "amount": amount if decimals == 0 else Decimal(amount).scaleb(-decimals),
        "description": transfer["reference"] or None,
        "createdDateMs": transfer["cluster_time_ms"],
        "acknowledgedDateMs": acknowledged_ms,
        "externalRef": transfer["id"].hex(),
    }


# JSON -------------------------------------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise _BadRequest(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise _BadRequest("a key appears twice")
    return document


def _parse_json(body: bytes) -> Any:
    """Floats become Decimal, so 0.1 USD is exactly 10 cents; duplicate keys and NaN are refused."""
    try:
        return json.loads(
            body.decode("utf-8"), parse_float=Decimal, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise _BadRequest(str(error)) from None


def _text(request: Any, name: str) -> str:
    value = request.get(name) if isinstance(request, dict) else None
    if not isinstance(value, str) or value == "":
        raise _BadRequest(f"{name} must be a non-empty string")
    return value


def _number(request: Any, name: str) -> Decimal:
    value = request.get(name) if isinstance(request, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise _BadRequest(f"{name} must be a number")
    return Decimal(value)


def _minor_units(amount: Decimal, decimals: int) -> int | None:
    """`amount` in minor units, exactly; None if no transfer can carry it (negative, huge, or finer than a
    minor unit). Decimal arithmetic would round to its context precision; Fraction does not."""
    sign, digits, exponent = amount.as_tuple()
    if sign or not isinstance(exponent, int) or abs(exponent) > amount_exponent_max or len(digits) > amount_digits_max:
        return None
    minor = Fraction(int("".join(map(str, digits)))) * Fraction(10) ** (exponent + decimals)
    return minor.numerator if minor.denominator == 1 else None


def encode_json(value: Any) -> str:
    """JSON with Decimal amounts written exactly ("12.50"), which json.dumps cannot do without floats."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ",".join(encode_json(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(key)}:{encode_json(item)}" for key, item in value.items()) + "}"
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


# HTTP ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Head:
    method: str
    path: str
    headers: dict[str, str]


class _HttpError(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def _parse_head(head: bytes) -> _Head:
    try:
        lines = head.decode("ascii").split("\r\n")
        method, target, version = lines[0].split(" ")
    except (UnicodeDecodeError, ValueError):
        raise _HttpError(_failure(400, "Bad request.", None)) from None
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _HttpError(_failure(400, "Bad request.", None))
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line == "":
            continue
        name, separator, value = line.partition(":")
        if not separator or not _header_name.fullmatch(name):
            raise _HttpError(_failure(400, "Bad request.", None))
        name = name.lower()
        # Two lengths or two credentials are ambiguous: answering either would be a guess.
        if name in headers and name in ("content-length", "authorization", "transfer-encoding"):
            raise _HttpError(_failure(400, "Bad request.", None))
        headers[name] = value.strip(" \t")
    return _Head(method, target.partition("?")[0], headers)


def _encode_response(response: Response) -> bytes:
    body = (encode_json(response.document) + "\n").encode("utf-8")
    headers = "".join(f"{name}: {value}\r\n" for name, value in response.headers)
    head = (
        f"HTTP/1.1 {response.status} {_reasons.get(response.status, '')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{headers}"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _file_version(path: Path) -> tuple[int, int] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size)


class OpenApiServer:
    """A small HTTP/1.1 server for the Open API: POST only, one request per connection."""

    def __init__(
        self,
        store: LedgerStore,
        access: OpenApiAccess,
        *,
        clock: Callable[[], float] = time.monotonic,
        connections_max: int = open_api_connections_max,
        read_timeout_seconds: float = request_read_timeout_seconds,
        tokens_file: Path | None = None,
        entry_hashes: EntryHashIndex | None = None,
    ) -> None:
        self._api = OpenApi(store, access, entry_hashes)
        self._limiter = RateLimiter(access, clock)
        self._clock = clock
        # `tonle open-api token` appends to the file while the node runs: a new token works within a second,
        # without a restart. A file that became invalid is logged and the tokens already loaded stay.
        self._tokens_file = tokens_file
        self._tokens_file_version = _file_version(tokens_file) if tokens_file is not None else None
        self._tokens_checked_at = clock()
        self._connections_max = connections_max
        self._read_timeout_seconds = read_timeout_seconds
        self._open = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=request_head_bytes_max)

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > self._connections_max:
                response: Response | None = _failure(503, "Too many connections.", None)
            else:
                response = await self._exchange(reader)
            if response is not None:
                writer.write(_encode_response(response))
                await writer.drain()
        except ConnectionError:
            pass
        except Exception:  # noqa: BLE001 - a failed answer must not take the listener down
            logger.exception("open API request failed")
            writer.write(_encode_response(_failure(500, "Internal server error.", None)))
        finally:
            self._open -= 1
            writer.close()

    async def _exchange(self, reader: asyncio.StreamReader) -> Response | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._read_timeout_seconds)
        except asyncio.LimitOverrunError:
            return _failure(431, "Request header too large.", None)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            return None
        try:
            request = _parse_head(head)
            self._check_route(request)
            # The body (at most request_body_bytes_max) is read even for a request about to be refused:
            # closing on unread bytes resets the connection, and the client would lose its 401 or 429.
            body = await self._body(reader, request)
        except _HttpError as error:
            return error.response
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            return None
        self._reload_tokens_if_changed()
        institution = self._api.authenticate(request.headers.get("authorization"))
        if institution is None:
            return _failure(401, message_unauthorized, ErrorCode.UNAUTHORIZED, ("WWW-Authenticate", "Bearer"))
        wait_seconds = self._limiter.admit(institution)
        if wait_seconds > 0:
            retry_after = str(max(1, math.ceil(wait_seconds)))
            return _failure(429, message_too_many_requests, None, ("Retry-After", retry_after))
        return self._api.answer(request.path, institution, body)

    def _reload_tokens_if_changed(self) -> None:
        now = self._clock()
        if self._tokens_file is None or now - self._tokens_checked_at < tokens_file_check_seconds:
            return
        self._tokens_checked_at = now
        version = _file_version(self._tokens_file)
        if version == self._tokens_file_version:
            return
        self._tokens_file_version = version
        try:
            access = load_access(self._tokens_file)
        except OpenApiConfigError as error:
            logger.error("open API token file not reloaded, the loaded tokens stay in force:\n%s", error)
            return
        self._api.replace_access(access)
        self._limiter.replace_access(access)
        logger.info("open API token file reloaded: %d tokens", len(access.tokens))

    def _check_route(self, request: _Head) -> None:
        if not self._api.knows(request.path):
            raise _HttpError(_failure(404, "Not found.", None))
        if request.method != "POST":
            raise _HttpError(_failure(405, "Only POST.", None, ("Allow", "POST")))

    async def _body(self, reader: asyncio.StreamReader, request: _Head) -> bytes:
        if "transfer-encoding" in request.headers:
            raise _HttpError(_failure(400, "Transfer-Encoding is not supported; send Content-Length.", None))
        length_text = request.headers.get("content-length", "0")
        if not _content_length.fullmatch(length_text):
            raise _HttpError(_failure(400, "Bad request.", None))
        length = int(length_text)
        if length > request_body_bytes_max:
            raise _HttpError(_failure(413, f"Request body over {request_body_bytes_max} bytes.", None))
        return await asyncio.wait_for(reader.readexactly(length), self._read_timeout_seconds)


async def start_open_api(node: LedgerNode, host: str, port: int) -> OpenApiServer:
    """Serve the Open API of a running node on host:port, with the token file its configuration names."""
    tokens_file = node.config.open_api.tokens_file
    if tokens_file is None:
        raise OpenApiConfigError(("open_api.tokens_file: required when open_api.listen_address is set",))
    server = OpenApiServer(node.store, load_access(tokens_file), tokens_file=tokens_file, entry_hashes=node.entry_hashes)
    await server.start(host, port)
    return server


# `tonle open-api token` -----------------------------------------------------------------------------------


def add_open_api_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `open-api` and its sub-commands on the `tonle` parser's sub-command set."""
    open_api = subparsers.add_parser("open-api", help="the Bakong-style HTTP Open API of a node")
    commands = open_api.add_subparsers(dest="open_api_command", required=True, metavar="ACTION")
    token = commands.add_parser(
        "token", help="create a bearer token for an institution: prints it once, stores only its SHA-256"
    )
    token.add_argument("--file", required=True, help="the token file a node's [open_api] tokens_file names")
    token.add_argument("--institution", required=True)
    token.set_defaults(handler=command_open_api_token)


def command_open_api_token(arguments: argparse.Namespace) -> int:
    path = Path(arguments.file)
    if not institution_id_pattern.fullmatch(arguments.institution):
        print(f"tonle open-api: {arguments.institution!r} is not an institution id", file=sys.stderr)
        return 1
    if path.exists():
        try:
            load_access(path)
        except OpenApiConfigError as error:
            print(f"tonle open-api: not adding to an invalid token file:\n{error}", file=sys.stderr)
            return 1
    token = new_token()
    digest = token_digest(token).hex()
    with path.open("a", encoding="utf-8") as file:
        file.write(f'\n[[tokens]]\ninstitution = "{arguments.institution}"\nsha256 = "{digest}"\n')
    print(json.dumps({"institution": arguments.institution, "token": token, "sha256": digest}, indent=2))
    return 0
