"""The Open API over real HTTP and a real LMDB ledger: endpoints, Bakong's shapes and codes, tokens and limits."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from config.loader import load_node_config
from config.schema import ConfigError, Role
from consensus.entries import (
    CloseAccount,
    Issue,
    OpenAccount,
    SuspendInstitution,
    Transfer,
    TransferFlags,
    decode_entry,
)
from node import open_api
from node.cluster import LocalCluster
from node.khqr import generate, md5_hex
from node.open_api import (
    ApiToken,
    OpenApiAccess,
    OpenApiConfigError,
    OpenApiServer,
    RateLimit,
    RateLimiter,
    add_open_api_commands,
    encode_json,
    load_access,
    start_open_api,
    token_digest,
)
from node.pay import qr_payment
from node.server import LedgerNode
from storage.entry_hashes import lookup_scan_entries_max, put_log
from tests.ledger_fixtures import Ledger, make_network, tid

deadline_seconds = 10.0
start_ms = 1_700_000_000_000
tokens = {name: f"token-of-{name}-{'x' * 20}" for name in ("aba", "acleda", "wing", "nbc", "ghost", "flood")}
# A second token of wing's (they share one rate limit), and two of aba's at and over the header limit.
tokens["longest"] = "f" * (open_api.bearer_token_characters_max - len("Bearer "))
tokens["too-long"] = "g" * (open_api.bearer_token_characters_max - len("Bearer ") + 1)
owners = {"flood": "wing", "longest": "aba", "too-long": "aba"}


class ManualClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def khqr(account: str, amount: int | None, currency: str = "KHR", bill: str | None = "INV-1", created_ms: int | None = None) -> str:
    created = created_ms if created_ms is not None else time.time_ns() // 1_000_000
    return generate(
        bakong_account_id=account, merchant_name="Shop", merchant_city="Phnom Penh", currency=currency,
        amount_minor=amount, created_ms=created if amount is not None else None,
        expires_ms=created + 600_000 if amount is not None else None, bill_number=bill,
    )


@dataclass
class Api:
    port: int
    ledger: Ledger
    clock: ManualClock

    def call(
        self, path: str, body: Any = None, *, token: str | None = "aba", raw: bytes | None = None,
        method: str = "POST", headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=deadline_seconds)
        sent = raw if raw is not None else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            all_headers["Authorization"] = f"Bearer {tokens.get(token, token)}"
        try:
            connection.request(method, path, body=sent, headers=all_headers)
            response = connection.getresponse()
            payload = response.read()
        finally:
            connection.close()
        return response.status, {name.lower(): value for name, value in response.getheaders()}, json.loads(payload), payload

    def check(self, path: str, body: Any, token: str = "aba") -> Any:
        status, _headers, document, _raw = self.call(path, body, token=token)
        assert status == 200, document
        return document


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    network = make_network((("aba", Role.BANK), ("acleda", Role.BANK), ("wing", Role.PSP)))
    ledger = Ledger(tmp_path / "state", network, start_ms=start_ms)
    sign = network.sign
    results = ledger.results(
        sign(OpenAccount("shop@aba", "KHR", tier="full"), "aba"),
        sign(OpenAccount("shop.usd@aba", "USD", tier="full"), "aba"),
        sign(OpenAccount("gone@aba", "KHR"), "aba"),
        sign(OpenAccount("dara@acleda", "KHR", tier="full"), "acleda"),
        sign(OpenAccount("dara.usd@acleda", "USD", tier="full"), "acleda"),
        sign(Issue(tid(1), "settlement.khr@acleda", 10_000_000, "KHR"), "nbc"),
        sign(Issue(tid(2), "settlement.usd@acleda", 1_000_000, "USD"), "nbc"),
        sign(Transfer(tid(3), "settlement.khr@acleda", "dara@acleda", 5_000_000, "KHR"), "acleda"),
        sign(Transfer(tid(4), "settlement.usd@acleda", "dara.usd@acleda", 500_000, "USD"), "acleda"),
        sign(CloseAccount("gone@aba"), "aba"),
    )
    assert results == ["ok"] * 10
    yield ledger
    ledger.store.close()


def access() -> OpenApiAccess:
    return OpenApiAccess(
        tuple(ApiToken(owners.get(name, name), token_digest(token)) for name, token in tokens.items()),
        {"wing": RateLimit(requests_per_second=1, burst=2)},
    )


@contextlib.contextmanager
def serve(ledger: Ledger, **options: Any) -> Iterator[Api]:
    """An OpenApiServer on its own event loop in a thread; the test talks to it over real sockets."""
    loop = asyncio.new_event_loop()
    clock = ManualClock()
    initial = load_access(options["tokens_file"]) if "tokens_file" in options else access()
    server = OpenApiServer(ledger.store, initial, clock=clock, **options)
    loop.run_until_complete(server.start("127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield Api(server.port, ledger, clock)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(deadline_seconds)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(deadline_seconds)
        loop.close()


@pytest.fixture
def api(ledger: Ledger) -> Iterator[Api]:
    with serve(ledger) as served:
        yield served


def exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, return everything the server says before it closes."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=deadline_seconds) as connection:
        connection.sendall(request)
        while chunk := connection.recv(65536):
            received += chunk
    return received


def head(path: str, *lines: str, token: str = "aba") -> bytes:
    return "\r\n".join([f"POST {path} HTTP/1.1", f"Authorization: Bearer {tokens[token]}", *lines, "", ""]).encode()


def pay_qr(ledger: Ledger, number: int, text: str, payer: str = "dara@acleda", credit: str = "shop@aba",
           amount: int | None = None, **fields: Any) -> bytes:
    """Sign and apply the transfer `tonle pay` would make for `text`; returns the signed entry."""
    payment = qr_payment(text, time.time_ns() // 1_000_000, amount)
    body = Transfer(tid(number), payer, credit, payment.amount_minor, payment.currency, reference=payment.reference, **fields)
    entry = ledger.network.sign(body, payer.rpartition("@")[2])
    ledger.apply(entry)
    return entry


# Lookups ---------------------------------------------------------------------------------------------------


def test_a_paid_dynamic_qr_is_found_by_its_md5_in_bakongs_response_shape(api: Api) -> None:
    text = khqr("shop@aba", 15_000)
    entry = pay_qr(api.ledger, 100, text)
    document = api.check("/v1/check_transaction_by_md5", {"md5": md5_hex(text)})
    assert document == {
        "responseCode": 0,
        "responseMessage": "Getting transaction successfully.",
        "errorCode": None,
        "data": {
            "hash": hashlib.sha256(entry).hexdigest(),
            "fromAccountId": "dara@acleda",
            "toAccountId": "shop@aba",
            "currency": "KHR",
            "amount": 15_000,
            "description": f"md5:{md5_hex(text)} bill:INV-1",
            "createdDateMs": start_ms,
            "acknowledgedDateMs": start_ms,
            "externalRef": tid(100).hex(),
        },
    }


def test_an_md5_in_upper_case_finds_the_same_payment(api: Api) -> None:
    text = khqr("shop@aba", 15_000)
    pay_qr(api.ledger, 100, text)
    assert api.check("/v1/check_transaction_by_md5", {"md5": md5_hex(text).upper()})["responseCode"] == 0


def test_a_usd_amount_is_written_as_an_exact_decimal_number(api: Api) -> None:
    text = khqr("shop.usd@aba", 1_050, currency="USD")
    pay_qr(api.ledger, 100, text, payer="dara.usd@acleda", credit="shop.usd@aba")
    _status, _headers, document, raw = api.call("/v1/check_transaction_by_md5", {"md5": md5_hex(text)})
    assert b'"amount":10.50' in raw
    assert document["data"]["currency"] == "USD"


def test_an_unpaid_md5_is_not_found_with_error_1(api: Api) -> None:
    assert api.check("/v1/check_transaction_by_md5", {"md5": md5_hex(khqr("shop@aba", 15_000))}) == {
        "responseCode": 1,
        "responseMessage": "Transaction could not be found. Please check and try again.",
        "errorCode": 1,
        "data": None,
    }


def test_a_payment_the_ledger_refused_answers_transaction_failed_error_3(api: Api) -> None:
    text = khqr("shop@aba", 50_000_000)  # more than the payer holds
    pay_qr(api.ledger, 100, text)
    assert api.check("/v1/check_transaction_by_md5", {"md5": md5_hex(text)}) == {
        "responseCode": 1, "responseMessage": "Transaction failed.", "errorCode": 3, "data": None,
    }


def test_a_failed_attempt_never_hides_a_later_successful_payment_of_the_same_code(api: Api) -> None:
    text = khqr("shop@aba", 15_000)
    attempt = Transfer(tid(100), "dara@acleda", "shop@aba", 10**12, "KHR", reference=f"md5:{md5_hex(text)}")
    assert api.ledger.results(api.ledger.network.sign(attempt, "acleda")) == ["exceeds_credits"]
    pay_qr(api.ledger, 101, text)
    document = api.check("/v1/check_transaction_by_md5", {"md5": md5_hex(text)})
    assert document["responseCode"] == 0 and document["data"]["externalRef"] == tid(101).hex()


def test_a_static_qr_md5_answers_static_qr_not_supported_error_2(api: Api) -> None:
    text = khqr("shop@aba", None)
    pay_qr(api.ledger, 100, text, amount=2_000)
    assert api.check("/v1/check_transaction_by_md5", {"md5": md5_hex(text)}) == {
        "responseCode": 1,
        "responseMessage": "Sorry, the system does not support static QR code.",
        "errorCode": 2,
        "data": None,
    }


def test_a_payment_is_found_by_its_full_hash_and_by_short_hash_with_amount_and_currency(api: Api) -> None:
    entry = pay_qr(api.ledger, 100, khqr("shop@aba", 15_000))
    digest = hashlib.sha256(entry).hexdigest()
    by_hash = api.check("/v1/check_transaction_by_hash", {"hash": digest})
    assert by_hash["responseCode"] == 0 and by_hash["data"]["hash"] == digest
    short = {"hash": digest[:8], "amount": 15000, "currency": "KHR"}
    assert api.check("/v1/check_transaction_by_short_hash", short)["data"]["hash"] == digest
    # Bakong sends the amount as a JSON number in major units: 15000.0 is the same amount.
    _status, _headers, document, _raw = api.call(
        "/v1/check_transaction_by_short_hash", raw=b'{"hash": "%s", "amount": 15000.0, "currency": "KHR"}' % digest[:8].encode()
    )
    assert document["responseCode"] == 0


def test_a_lookup_by_hash_while_the_node_rebuilds_its_index_is_refused_with_retry_after(api: Api) -> None:
    entry = pay_qr(api.ledger, 100, khqr("shop@aba", 15_000))
    # More logged transfers past the (absent) index than a lookup scans, written directly.
    with api.ledger.store.write() as transaction:
        applied = transaction.applied_index()
        for number in range(lookup_scan_entries_max // 4096 + 1):
            put_log(transaction, applied + 1 + number, bytes(range(48)) * 4096)
        transaction.set_applied_index(applied + lookup_scan_entries_max // 4096 + 1)
    status, headers, document, _raw = api.call("/v1/check_transaction_by_hash", {"hash": hashlib.sha256(entry).hexdigest()})
    assert (status, headers["retry-after"], document["responseCode"]) == (503, "1", 1)
    assert "being rebuilt" in document["responseMessage"]


def test_a_short_hash_with_another_amount_or_currency_is_not_found(api: Api) -> None:
    entry = pay_qr(api.ledger, 100, khqr("shop@aba", 15_000))
    prefix = hashlib.sha256(entry).hexdigest()[:8]
    for amount, currency in ((15_001, "KHR"), (15_000, "USD"), (15_000.5, "KHR"), (15_000, "XXX")):
        document = api.check("/v1/check_transaction_by_short_hash", {"hash": prefix, "amount": amount, "currency": currency})
        assert document["errorCode"] == 1, (amount, currency)


def test_a_usd_short_hash_matches_cents_exactly(api: Api) -> None:
    entry = pay_qr(api.ledger, 100, khqr("shop.usd@aba", 1_010, currency="USD"), payer="dara.usd@acleda", credit="shop.usd@aba")
    prefix = hashlib.sha256(entry).hexdigest()[:8]
    found = {"hash": prefix, "amount": Decimal("10.10"), "currency": "USD"}
    raw = encode_json(found).encode()
    assert api.call("/v1/check_transaction_by_short_hash", raw=raw)[2]["responseCode"] == 0
    # 10.1 as a binary float is not 10.10 exactly; the API reads the decimal text, so it still matches.
    assert api.check("/v1/check_transaction_by_short_hash", {"hash": prefix, "amount": 10.1, "currency": "USD"})["responseCode"] == 0
    assert api.check("/v1/check_transaction_by_short_hash", {"hash": prefix, "amount": 10.101, "currency": "USD"})["errorCode"] == 1


def test_an_amount_beyond_the_digit_or_exponent_limit_is_not_found(api: Api) -> None:
    entry = pay_qr(api.ledger, 100, khqr("shop@aba", 15_000))
    prefix = hashlib.sha256(entry).hexdigest()[:8]
    too_many_digits = "15000." + "0" * open_api.amount_digits_max  # exactly 15000, but too long to trust
    huge_exponent = f"1.5E{open_api.amount_exponent_max + 2}"
    for amount in (too_many_digits, huge_exponent, "-15000"):
        raw = f'{{"hash": "{prefix}", "amount": {amount}, "currency": "KHR"}}'.encode()
        assert api.call("/v1/check_transaction_by_short_hash", raw=raw)[2]["errorCode"] == 1, amount


def test_a_payment_is_found_by_external_ref_as_its_transfer_id_or_a_reference_token(api: Api) -> None:
    pay_qr(api.ledger, 100, khqr("shop@aba", 15_000, bill="INV-77"))
    by_id = api.check("/v1/check_transaction_by_external_ref", {"externalRef": tid(100).hex()})
    by_bill = api.check("/v1/check_transaction_by_external_ref", {"externalRef": "bill:INV-77"})
    assert by_id["data"]["externalRef"] == by_bill["data"]["externalRef"] == tid(100).hex()
    assert api.check("/v1/check_transaction_by_external_ref", {"externalRef": "bill:INV-78"})["errorCode"] == 1
    assert api.check("/v1/check_transaction_by_external_ref", {"externalRef": "bill:INV-77 extra"})["errorCode"] == 1


def test_a_pending_payment_is_found_only_once_posted_and_a_voided_one_failed(api: Api) -> None:
    ledger, sign = api.ledger, api.ledger.network.sign
    posted_text, voided_text = khqr("shop@aba", 15_000, bill="P-1"), khqr("shop@aba", 16_000, bill="V-1")
    pay_qr(ledger, 100, posted_text, flags=int(TransferFlags.PENDING))
    pay_qr(ledger, 101, voided_text, flags=int(TransferFlags.PENDING))
    assert api.check("/v1/check_transaction_by_md5", {"md5": md5_hex(posted_text)})["errorCode"] == 1
    ledger.apply(sign(Transfer(tid(102), "", "", 0, "", flags=int(TransferFlags.POST_PENDING), pending_id=tid(100)), "acleda"),
                 time_ms=start_ms + 5_000)
    ledger.apply(sign(Transfer(tid(103), "", "", 0, "", flags=int(TransferFlags.VOID_PENDING), pending_id=tid(101)), "acleda"))
    posted = api.check("/v1/check_transaction_by_md5", {"md5": md5_hex(posted_text)})
    assert posted["data"]["amount"] == 15_000
    assert (posted["data"]["createdDateMs"], posted["data"]["acknowledgedDateMs"]) == (start_ms, start_ms + 5_000)
    assert api.check("/v1/check_transaction_by_md5", {"md5": md5_hex(voided_text)})["errorCode"] == 3


def test_only_the_parties_and_the_central_bank_see_a_payment(api: Api) -> None:
    text = khqr("shop@aba", 15_000)
    pay_qr(api.ledger, 100, text)
    body = {"md5": md5_hex(text)}
    assert api.check("/v1/check_transaction_by_md5", body, token="aba")["responseCode"] == 0  # merchant's bank
    assert api.check("/v1/check_transaction_by_md5", body, token="acleda")["responseCode"] == 0  # payer's bank
    assert api.check("/v1/check_transaction_by_md5", body, token="nbc")["responseCode"] == 0
    # Another member is answered exactly as if the payment did not exist.
    assert api.check("/v1/check_transaction_by_md5", body, token="wing")["errorCode"] == 1


def test_lookups_stop_after_the_candidate_limit(api: Api) -> None:
    text = khqr("shop@aba", 15_000)
    token = f"md5:{md5_hex(text)}"
    failing = [
        api.ledger.network.sign(Transfer(tid(1000 + n), "dara@acleda", "shop@aba", 10**12, "KHR", reference=token), "acleda")
        for n in range(open_api.lookup_candidates_max)
    ]
    api.ledger.apply(*failing)
    pay_qr(api.ledger, 5000, text)
    assert api.check("/v1/check_transaction_by_md5", {"md5": md5_hex(text)})["errorCode"] == 3


def test_the_md5_list_reports_every_md5_in_either_sdks_body(api: Api) -> None:
    paid, failed, static, unknown = (khqr("shop@aba", 15_000, bill="A"), khqr("shop@aba", 10**9, bill="B"),
                                     khqr("shop@aba", None), khqr("shop@aba", 1, bill="D"))
    pay_qr(api.ledger, 100, paid)
    pay_qr(api.ledger, 101, failed)
    pay_qr(api.ledger, 102, static, amount=1)
    md5s = [md5_hex(text) for text in (paid, failed, static, unknown)]
    for body in ({"md5List": md5s}, md5s):  # khqr-sdk sends an object, bakong-khqr a bare array
        document = api.check("/v1/check_transaction_by_md5_list", body)
        assert document["responseCode"] == 0 and document["errorCode"] is None
        assert [item["md5"] for item in document["data"]] == md5s
        assert [item["status"] for item in document["data"]] == ["SUCCESS", "FAILED", "STATIC_QR", "NOT_FOUND"]
        assert document["data"][0]["transaction"]["externalRef"] == tid(100).hex()
        assert [item["transaction"] for item in document["data"][1:]] == [None, None, None]


def test_an_md5_list_over_the_limit_is_refused_with_error_5(api: Api) -> None:
    md5s = [md5_hex(str(n)) for n in range(open_api.md5_list_entries_max + 1)]
    status, _headers, document, _raw = api.call("/v1/check_transaction_by_md5_list", {"md5List": md5s})
    assert (status, document["errorCode"]) == (400, 5)
    assert api.check("/v1/check_transaction_by_md5_list", {"md5List": md5s[:-1]})["responseCode"] == 0
    assert api.call("/v1/check_transaction_by_md5_list", {"md5List": []})[0] == 400


def test_check_bakong_account_answers_exists_not_found_and_invalid(api: Api) -> None:
    assert api.check("/v1/check_bakong_account", {"accountId": "shop@aba"}) == {
        "responseCode": 0, "responseMessage": "Account ID exists", "errorCode": None, "data": None,
    }
    missing = {"responseCode": 1, "responseMessage": "Account ID not found", "errorCode": 11, "data": None}
    assert api.check("/v1/check_bakong_account", {"accountId": "nobody@aba"}) == missing
    assert api.check("/v1/check_bakong_account", {"accountId": "gone@aba"}) == missing  # closed
    assert api.check("/v1/check_bakong_account", {"accountId": "not an account"}) == {
        "responseCode": 1, "responseMessage": "Account ID is invalid", "errorCode": 12, "data": None,
    }


# Requests the API refuses ----------------------------------------------------------------------------------


def test_a_request_without_a_valid_token_gets_401_error_6(api: Api) -> None:
    unauthorized = {"responseCode": 1, "responseMessage": "Unauthorized.", "errorCode": 6, "data": None}
    for token in (None, "not-a-token", "ghost"):  # ghost: a token for an institution the ledger does not know
        status, headers, document, _raw = api.call("/v1/check_bakong_account", {"accountId": "shop@aba"}, token=token)
        assert (status, document) == (401, unauthorized), token
        assert headers["www-authenticate"] == "Bearer"
    status, _headers, _document, _raw = api.call(
        "/v1/check_bakong_account", {"accountId": "shop@aba"}, token=None, headers={"Authorization": f"Basic {tokens['aba']}"}
    )
    assert status == 401


def test_a_suspended_institutions_token_stops_working(api: Api) -> None:
    assert api.call("/v1/check_bakong_account", {"accountId": "shop@aba"}, token="acleda")[0] == 200
    api.ledger.apply(api.ledger.network.sign(SuspendInstitution("acleda"), "nbc"))
    assert api.call("/v1/check_bakong_account", {"accountId": "shop@aba"}, token="acleda")[0] == 401


def test_an_authorization_header_over_the_length_limit_is_refused_even_with_a_known_token(api: Api) -> None:
    assert api.call("/v1/check_bakong_account", {"accountId": "shop@aba"}, token="longest")[0] == 200
    status, _headers, document, _raw = api.call("/v1/check_bakong_account", {"accountId": "shop@aba"}, token="too-long")
    assert (status, document["errorCode"]) == (401, 6)


def test_a_flood_beyond_the_rate_limit_gets_429_with_retry_after(api: Api) -> None:
    body = {"accountId": "shop@aba"}
    # wing may make 2 requests at once, then 1 a second; its two tokens share one bucket.
    assert api.call("/v1/check_bakong_account", body, token="wing")[0] == 200
    assert api.call("/v1/check_bakong_account", body, token="flood")[0] == 200
    status, headers, document, _raw = api.call("/v1/check_bakong_account", body, token="wing")
    assert (status, headers["retry-after"], document["responseCode"], document["errorCode"]) == (429, "1", 1, None)
    assert api.call("/v1/check_bakong_account", body, token="aba")[0] == 200  # other institutions are unaffected
    api.clock.now += 1.0
    assert api.call("/v1/check_bakong_account", body, token="wing")[0] == 200
    assert api.call("/v1/check_bakong_account", body, token="wing")[0] == 429


def test_missing_or_malformed_fields_get_400_error_5(api: Api) -> None:
    cases: list[bytes] = [
        b"{}",
        b'{"md5": 5}',
        b'{"md5": ""}',
        b"not json",
        b'{"md5": "a", "md5": "b"}',  # a duplicate key is ambiguous
        b'{"md5": NaN}',
        b"\xff\xfe",
        b"[" * 10_000,
    ]
    for raw in cases:
        status, _headers, document, _raw = api.call("/v1/check_transaction_by_md5", raw=raw)
        assert (status, document["errorCode"], document["responseMessage"]) == (400, 5, "Missing required fields."), raw
    for body in ({"hash": "abcd1234", "currency": "KHR"}, {"hash": "abcd1234", "amount": True, "currency": "KHR"}):
        assert api.call("/v1/check_transaction_by_short_hash", body)[0] == 400


def test_unknown_paths_and_methods_are_refused(api: Api) -> None:
    assert api.call("/v1/renew_token", {"email": "a@b"})[0] == 404
    status, headers, _document, _raw = api.call("/v1/check_bakong_account", method="GET", raw=b"")
    assert (status, headers["allow"]) == (405, "POST")


def test_a_request_head_over_the_limit_gets_431(api: Api) -> None:
    padding = "X-Pad: " + "x" * open_api.request_head_bytes_max
    assert exchange(api.port, head("/v1/check_bakong_account", padding)).startswith(b"HTTP/1.1 431 ")
    fits = "X-Pad: " + "x" * (open_api.request_head_bytes_max - 200)
    body = b'{"accountId": "shop@aba"}'
    answer = exchange(api.port, head("/v1/check_bakong_account", fits, f"Content-Length: {len(body)}") + body)
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_a_body_over_the_limit_gets_413_before_it_is_read(api: Api) -> None:
    too_long = f"Content-Length: {open_api.request_body_bytes_max + 1}"
    assert exchange(api.port, head("/v1/check_bakong_account", too_long)).startswith(b"HTTP/1.1 413 ")
    body = json.dumps({"accountId": "shop@aba", "pad": ""}).encode()
    body = body.replace(b'""', b'"' + b"x" * (open_api.request_body_bytes_max - len(body)) + b'"')
    assert len(body) == open_api.request_body_bytes_max
    assert api.call("/v1/check_bakong_account", raw=body)[0] == 200


def test_chunked_bodies_and_repeated_lengths_or_credentials_are_refused(api: Api) -> None:
    chunked = head("/v1/check_bakong_account", "Transfer-Encoding: chunked") + b"0\r\n\r\n"
    assert exchange(api.port, chunked).startswith(b"HTTP/1.1 400 ")
    twice = head("/v1/check_bakong_account", "Content-Length: 2", "Content-Length: 2") + b"{}"
    assert exchange(api.port, twice).startswith(b"HTTP/1.1 400 ")
    two_tokens = head("/v1/check_bakong_account", f"Authorization: Bearer {tokens['wing']}", "Content-Length: 2") + b"{}"
    assert exchange(api.port, two_tokens).startswith(b"HTTP/1.1 400 ")


def status_within_deadline(port: int, request: bytes, wanted: int) -> int:
    """Send `request` until the answer has status `wanted` (a refused connection may be reset mid-way)."""
    deadline = time.monotonic() + deadline_seconds
    status = 0
    while time.monotonic() < deadline and status != wanted:
        try:
            status = int(exchange(port, request).split(b" ")[1])
        except (ConnectionError, IndexError):
            status = 0
    return status


def test_connections_beyond_the_limit_get_503(ledger: Ledger) -> None:
    body = b'{"accountId": "shop@aba"}'
    request = head("/v1/check_bakong_account", f"Content-Length: {len(body)}") + body
    with serve(ledger, connections_max=1) as api:
        with socket.create_connection(("127.0.0.1", api.port), timeout=deadline_seconds) as idle:
            idle.sendall(b"POST")  # holds the one slot, waiting for the rest of its head
            # Asking nothing: the answer comes unprompted, so no request is left unread when it closes.
            assert status_within_deadline(api.port, b"", 503) == 503
        assert status_within_deadline(api.port, request, 200) == 200


def test_a_client_slower_than_the_read_timeout_is_disconnected_unanswered(ledger: Ledger) -> None:
    with serve(ledger, read_timeout_seconds=0.2) as api:
        with socket.create_connection(("127.0.0.1", api.port), timeout=deadline_seconds) as slow:
            slow.sendall(b"POST /v1/check_bakong_account HTTP/1.1\r\n")
            assert slow.recv(1024) == b""  # closed, nothing said


# Tokens and limits ----------------------------------------------------------------------------------------


def test_rate_limiter_refills_at_the_configured_rate_up_to_the_burst() -> None:
    clock = ManualClock()
    limiter = RateLimiter(OpenApiAccess((), {"aba": RateLimit(requests_per_second=2, burst=3)}), clock)
    assert [limiter.admit("aba") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.admit("aba") == pytest.approx(0.5)
    clock.now += 10.0  # a long pause refills only up to the burst
    assert [limiter.admit("aba") == 0.0 for _ in range(4)] == [True, True, True, False]
    default = RateLimiter(OpenApiAccess(()), clock)
    assert sum(default.admit("acleda") == 0.0 for _ in range(open_api.burst_default + 1)) == open_api.burst_default


def test_a_token_file_is_read_and_each_token_maps_to_its_institution(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(
        f'[[tokens]]\ninstitution = "aba"\nsha256 = "{token_digest("one").hex()}"\n'
        f'[[tokens]]\ninstitution = "acleda"\nsha256 = "{token_digest("two").hex()}"\n'
        '[[rate_limits]]\ninstitution = "aba"\nrequests_per_second = 5\nburst = 9\n'
    )
    loaded = load_access(path)
    assert (loaded.institution_for("one"), loaded.institution_for("two"), loaded.institution_for("three")) == ("aba", "acleda", None)
    assert loaded.rate_limit("aba") == RateLimit(5, 9)
    assert loaded.rate_limit("acleda") == RateLimit(open_api.requests_per_second_default, open_api.burst_default)


def test_a_bad_token_file_reports_every_problem_at_once(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    digest = token_digest("one").hex()
    path.write_text(
        f'color = "red"\n'
        f'[[tokens]]\ninstitution = "aba"\nsha256 = "{digest}"\n'
        f'[[tokens]]\ninstitution = "acleda"\nsha256 = "{digest}"\n'
        f'[[tokens]]\ninstitution = "Not An Id"\nsha256 = "{digest.upper()}"\n'
        '[[tokens]]\ninstitution = "wing"\n'
        f'[[rate_limits]]\ninstitution = "aba"\nrequests_per_second = {open_api.requests_per_second_max + 1}\nburst = 1\n'
        f'[[rate_limits]]\ninstitution = "wing"\nrequests_per_second = 1\nburst = {open_api.burst_max + 1}\n'
        '[[rate_limits]]\ninstitution = "acleda"\nrequests_per_second = true\nburst = 1\n'
    )
    with pytest.raises(OpenApiConfigError) as raised:
        load_access(path)
    problems = "\n".join(raised.value.problems)
    assert len(raised.value.problems) == 8, problems
    for expected in ("color: unknown key", "tokens[1].sha256: the same token is listed twice",
                     "tokens[2].institution", "tokens[2].sha256", "tokens[3].sha256: missing required key",
                     "rate_limits[0].requests_per_second", "rate_limits[1].burst", "rate_limits[2].requests_per_second"):
        assert expected in problems


def test_an_unreadable_or_invalid_token_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OpenApiConfigError, match="cannot read"):
        load_access(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[[tokens]\n")
    with pytest.raises(OpenApiConfigError, match="not valid TOML"):
        load_access(tmp_path / "bad.toml")


def test_the_token_command_prints_a_new_token_once_and_stores_only_its_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="tonle")
    add_open_api_commands(parser.add_subparsers(dest="command", required=True))
    path = tmp_path / "tokens.toml"
    printed = []
    for institution in ("aba", "aba", "acleda"):
        arguments = parser.parse_args(["open-api", "token", "--file", str(path), "--institution", institution])
        assert arguments.handler(arguments) == 0
        printed.append(json.loads(capsys.readouterr().out))
    stored = path.read_text()
    loaded = load_access(path)
    for document in printed:
        assert document["token"] not in stored and document["sha256"] in stored
        assert len(document["token"]) >= open_api.token_random_bytes  # 256 bits, base64url
        assert loaded.institution_for(document["token"]) == document["institution"]
    arguments = parser.parse_args(["open-api", "token", "--file", str(path), "--institution", "Bad Id"])
    assert arguments.handler(arguments) == 1


def test_a_token_added_or_removed_while_the_node_runs_takes_effect_without_a_restart(ledger: Ledger, tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(f'[[tokens]]\ninstitution = "aba"\nsha256 = "{token_digest(tokens["aba"]).hex()}"\n')
    with serve(ledger, tokens_file=path) as api:
        body = {"accountId": "shop@aba"}
        assert api.call("/v1/check_bakong_account", body, token="acleda")[0] == 401
        path.write_text(path.read_text() + f'[[tokens]]\ninstitution = "acleda"\nsha256 = "{token_digest(tokens["acleda"]).hex()}"\n')
        # Checked at most once per tokens_file_check_seconds: not yet...
        assert api.call("/v1/check_bakong_account", body, token="acleda")[0] == 401
        api.clock.now += open_api.tokens_file_check_seconds
        assert api.call("/v1/check_bakong_account", body, token="acleda")[0] == 200
        # A file broken by a bad edit is not loaded: the tokens in force stay in force.
        path.write_text("[[tokens]\n")
        api.clock.now += open_api.tokens_file_check_seconds
        assert api.call("/v1/check_bakong_account", body, token="acleda")[0] == 200
        # Revoking a token is removing its line.
        path.write_text(f'[[tokens]]\ninstitution = "acleda"\nsha256 = "{token_digest(tokens["acleda"]).hex()}"\n')
        api.clock.now += open_api.tokens_file_check_seconds
        assert api.call("/v1/check_bakong_account", body, token="aba")[0] == 401
        assert api.call("/v1/check_bakong_account", body, token="acleda")[0] == 200


def test_amounts_are_encoded_exactly_and_other_values_as_json() -> None:
    document = {"a": Decimal("12345678901234567.89"), "b": [1, None, True, "ស្វាគមន៍"], "c": {"d": False}}
    assert encode_json(document) == '{"a":12345678901234567.89,"b":[1,null,true,"ស្វាគមន៍"],"c":{"d":false}}'
    assert json.loads(encode_json(document), parse_float=Decimal) == document
    with pytest.raises(TypeError):
        encode_json({"a": 1.5})


def test_the_hash_is_the_sha256_of_the_signed_entry_every_node_stores(api: Api) -> None:
    entry = pay_qr(api.ledger, 100, khqr("shop@aba", 15_000))
    stored = api.ledger.transfer(tid(100))["entry"]
    assert stored == entry and decode_entry(stored).signer == "acleda"
    found = api.check("/v1/check_transaction_by_external_ref", {"externalRef": tid(100).hex()})
    assert found["data"]["hash"] == hashlib.sha256(stored).hexdigest()


# The node's configuration ----------------------------------------------------------------------------------


def network_files(tmp_path: Path, open_api_section: str) -> Path:
    """A local network's genesis and node configs on disk (no process started); aba-1 gets `open_api_section`."""
    cluster = LocalCluster.create(tmp_path / "network", validators=1, institutions=1)
    config = cluster.nodes["aba-1"].config
    config.write_text(without_open_api(config.read_text()) + "\n" + open_api_section)
    return config


def without_open_api(config_text: str) -> str:
    """A local network's node.toml with its [open_api] table removed (`cluster up` turns the Open API on)."""
    return re.sub(r"\n\[open_api\]\n(?:[^\[\n][^\n]*\n|\n)*", "\n", config_text)


def test_a_node_config_names_the_open_api_address_and_token_file(tmp_path: Path) -> None:
    config_path = network_files(tmp_path, '[open_api]\nlisten_address = "127.0.0.1:8443"\ntokens_file = "../tokens.toml"\n')
    config, _genesis = load_node_config(config_path, environ={})
    assert config.open_api.enabled
    assert (config.open_api.listen_address, config.open_api.tokens_file) == ("127.0.0.1:8443", (tmp_path / "network" / "tokens.toml").resolve())
    other = LocalCluster.load(tmp_path / "network").nodes["v1"].config
    assert "[open_api]" in other.read_text()
    other.write_text(without_open_api(other.read_text()))
    unset, _genesis = load_node_config(other, environ={})
    assert not unset.open_api.enabled and unset.open_api.tokens_file is None


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ('[open_api]\nlisten_address = "127.0.0.1:8443"\n', "open_api.tokens_file: required"),
        ('[open_api]\nlisten_address = "nowhere"\ntokens_file = "t.toml"\n', "open_api.listen_address"),
    ],
    ids=["no-tokens-file", "bad-address"],
)
def test_an_open_api_without_tokens_or_with_a_bad_address_is_refused(tmp_path: Path, section: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_node_config(network_files(tmp_path, section), environ={})


def test_start_open_api_serves_a_nodes_state_with_its_configured_tokens(tmp_path: Path) -> None:
    tokens_file = tmp_path / "network" / "tokens.toml"
    config_path = network_files(tmp_path, '[open_api]\nlisten_address = "127.0.0.1:8443"\ntokens_file = "../tokens.toml"\n')
    tokens_file.write_text(f'[[tokens]]\ninstitution = "aba"\nsha256 = "{token_digest(tokens["aba"]).hex()}"\n')
    node = LedgerNode(*load_node_config(config_path, environ={}))

    async def ask() -> tuple[int, bytes]:
        server = await start_open_api(node, "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            body = b'{"accountId": "settlement.khr@aba"}'
            writer.write(head("/v1/check_bakong_account", f"Content-Length: {len(body)}") + body)
            answer = await asyncio.wait_for(reader.read(), deadline_seconds)
            writer.close()
            return int(answer.split(b" ")[1]), answer.partition(b"\r\n\r\n")[2]
        finally:
            await server.close()

    try:
        status, body = asyncio.run(ask())
    finally:
        node.close()
    assert status == 200 and json.loads(body)["responseMessage"] == "Account ID exists"
