"""`tonle pay`: a KHQR verified first, then the transfer to the merchant's account or alias, found by MD5 and bill."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from config.schema import Role
from consensus.entries import CloseAccount, Issue, OpenAccount, RegisterAlias, Transfer, decode_entry
from node import pay
from node.khqr import ErrorCode, KhqrError, bill_number_characters_max, crc16, generate, md5_hex
from node.pay import (
    LedgerReader,
    PayError,
    QrPayment,
    add_pay_commands,
    check_payer,
    credit_account,
    payment_reference,
    payment_transfer,
    phone_alias,
    qr_payment,
)
from storage import queries
from tests.ledger_fixtures import Ledger, make_network, tid


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def code(
    account: str = "shop@aba", amount: int | None = 15_000, currency: str = "KHR", bill: str | None = "INV-2024-001",
    mobile: str | None = None, created_ms: int | None = None, lifetime_ms: int = 600_000,
) -> str:
    created = created_ms if created_ms is not None else now_ms()
    dynamic = amount is not None
    return generate(
        bakong_account_id=account, merchant_name="Sokha Shop", merchant_city="Phnom Penh", currency=currency,
        amount_minor=amount, created_ms=created if dynamic else None,
        expires_ms=created + lifetime_ms if dynamic else None, bill_number=bill, mobile_number=mobile,
    )


class StoreReader:
    """The reads `tonle pay` makes through the client, made with the same queries on a real store."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def balance(self, account: str, as_of_index: int | None = None) -> dict[str, Any] | None:
        return self._ledger.balance(account, as_of_index)

    def alias(self, alias: str) -> dict[str, Any] | None:
        with self._ledger.store.read() as transaction:
            return queries.alias(transaction, alias)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    network = make_network((("aba", Role.BANK), ("acleda", Role.BANK)))
    ledger = Ledger(tmp_path / "state", network)
    sign = network.sign
    results = ledger.results(
        sign(OpenAccount("shop@aba", "KHR", tier="full"), "aba"),
        sign(OpenAccount("kiosk@aba", "KHR", tier="full"), "aba"),
        sign(OpenAccount("shop.usd@aba", "USD", tier="full"), "aba"),
        sign(OpenAccount("closed@aba", "KHR"), "aba"),
        sign(OpenAccount("dara@acleda", "KHR", tier="full"), "acleda"),
        sign(OpenAccount("dara.usd@acleda", "USD", tier="full"), "acleda"),
        sign(RegisterAlias("+85512345678", "kiosk@aba"), "aba"),
        sign(CloseAccount("closed@aba"), "aba"),
        sign(Issue(tid(1), "settlement.khr@acleda", 1_000_000, "KHR"), "nbc"),
        sign(Transfer(tid(2), "settlement.khr@acleda", "dara@acleda", 1_000_000, "KHR"), "acleda"),
    )
    assert results == ["ok"] * 10
    yield ledger
    ledger.store.close()


@pytest.fixture
def reader(ledger: Ledger) -> LedgerReader:
    return StoreReader(ledger)


# Reading the code ---------------------------------------------------------------------------------------------


def test_a_dynamic_code_asks_for_its_amount_with_references_for_its_md5_and_bill() -> None:
    text = code(mobile="012345678")
    payment = qr_payment(text, now_ms(), None)
    assert payment == QrPayment(
        md5=md5_hex(text),
        merchant_account="shop@aba",
        merchant_alias="+85512345678",
        amount_minor=15_000,
        currency="KHR",
        bill_number="INV-2024-001",
        reference=f"md5:{md5_hex(text)} bill:INV-2024-001",
    )


def test_a_usd_code_asks_for_cents() -> None:
    payment = qr_payment(code(amount=1_050, currency="USD"), now_ms(), None)
    assert (payment.amount_minor, payment.currency) == (1_050, "USD")


def test_a_static_code_takes_the_payers_amount_and_is_marked_static() -> None:
    text = code(amount=None)
    with pytest.raises(PayError) as raised:
        qr_payment(text, now_ms(), None)
    assert raised.value.code == "amount_required"
    payment = qr_payment(text, now_ms(), 2_500)
    assert payment.amount_minor == 2_500
    assert payment.reference == f"static-md5:{md5_hex(text)} bill:INV-2024-001"


def test_a_dynamic_code_refuses_another_amount() -> None:
    text = code()
    assert qr_payment(text, now_ms(), 15_000).amount_minor == 15_000
    with pytest.raises(PayError) as raised:
        qr_payment(text, now_ms(), 15_001)
    assert raised.value.code == "amount_mismatch"


def test_an_expired_code_is_refused_with_the_sdks_error_46() -> None:
    text = code(created_ms=now_ms() - 1_200_000, lifetime_ms=600_000)
    with pytest.raises(KhqrError) as raised:
        qr_payment(text, now_ms(), None)
    assert (raised.value.code, raised.value.name) == (int(ErrorCode.KHQR_EXPIRED), "KHQR_EXPIRED")


def test_a_code_with_any_character_changed_is_refused_on_its_crc() -> None:
    text = code()
    position = text.index("15000")  # the amount: the change a fraudster would make
    altered = text[:position] + "9" + text[position + 1 :]
    with pytest.raises(KhqrError) as raised:
        qr_payment(altered, now_ms(), None)
    assert raised.value.code == int(ErrorCode.KHQR_INVALID) and "CRC mismatch" in raised.value.message


def test_malformed_tlv_is_refused_even_under_a_valid_crc() -> None:
    body = "000201010212" + "2950abc" + "6304"  # tag 29 claims 50 characters; 11 remain
    with pytest.raises(KhqrError) as raised:
        qr_payment(body + crc16(body), now_ms(), None)
    assert raised.value.code == int(ErrorCode.KHQR_INVALID) and "only 11 remain" in raised.value.message


def test_a_bill_number_that_cannot_be_one_token_is_left_out_of_the_references() -> None:
    assert payment_reference("a" * 32, True, "INV 2024") == "md5:" + "a" * 32
    assert payment_reference("a" * 32, True, "វិក្កយបត្រ") == "md5:" + "a" * 32
    longest = "B" * bill_number_characters_max
    assert payment_reference("a" * 32, True, longest) == f"md5:{'a' * 32} bill:{longest}"
    assert payment_reference("a" * 32, True, longest + "B") == "md5:" + "a" * 32
    assert payment_reference("a" * 32, False, None) == "static-md5:" + "a" * 32


def test_the_longest_references_fit_a_transfer() -> None:
    text = code(bill="B" * 25)
    payment = qr_payment(text, now_ms(), None)
    body = payment_transfer(payment, "dara@acleda", "shop@aba", tid(9))
    assert body.reference.split() == [f"md5:{md5_hex(text)}", "bill:" + "B" * 25]


@pytest.mark.parametrize(
    ("mobile", "alias"),
    [
        ("012345678", "+85512345678"),
        ("85512345678", "+85512345678"),
        ("+85512345678", "+85512345678"),
        ("+855 12-345-678", "+85512345678"),
        ("+66812345678", "+66812345678"),
        ("12345678", None),
        ("0", None),
        ("+0123", None),
        (None, None),
    ],
)
def test_a_khqr_mobile_number_becomes_an_e164_alias(mobile: str | None, alias: str | None) -> None:
    assert phone_alias(mobile) == alias


def test_a_code_with_neither_a_ledger_account_nor_a_phone_is_refused() -> None:
    text = code(account="Sokha.Shop@Bank")
    with pytest.raises(PayError) as raised:
        qr_payment(text, now_ms(), None)
    assert raised.value.code == "invalid_merchant_account"
    assert qr_payment(code(account="Sokha.Shop@Bank", mobile="012345678"), now_ms(), None).merchant_account is None


# Choosing the accounts ----------------------------------------------------------------------------------------


def test_the_merchants_account_id_is_paid_when_the_ledger_has_it(reader: LedgerReader) -> None:
    payment = qr_payment(code(mobile="012345678"), now_ms(), None)
    assert credit_account(payment, reader) == "shop@aba"


def test_the_phone_alias_is_paid_when_the_account_id_is_not_on_the_ledger(reader: LedgerReader) -> None:
    for account in ("elsewhere@devb", "closed@aba", "Sokha.Shop@Bank"):
        payment = qr_payment(code(account=account, mobile="012345678"), now_ms(), None)
        assert credit_account(payment, reader) == "+85512345678", account


def test_an_unknown_merchant_is_refused_before_anything_is_signed(reader: LedgerReader) -> None:
    for text in (code(account="nobody@aba"), code(account="nobody@aba", mobile="0987654321")):
        with pytest.raises(PayError) as raised:
            credit_account(qr_payment(text, now_ms(), None), reader)
        assert raised.value.code == "merchant_account_not_found"


def test_a_merchant_account_in_another_currency_is_refused(reader: LedgerReader) -> None:
    payment = qr_payment(code(account="shop.usd@aba"), now_ms(), None)
    with pytest.raises(PayError) as raised:
        credit_account(payment, reader)
    assert raised.value.code == "merchant_currency_mismatch"


@pytest.mark.parametrize(
    ("payer", "expected"),
    [
        ("nobody@acleda", "payer_account_not_found"),
        ("closed@aba", "payer_account_not_found"),
        ("dara.usd@acleda", "payer_currency_mismatch"),
        ("+85512345678", "invalid_payer_account"),
    ],
)
def test_a_payer_without_an_open_account_in_the_codes_currency_is_refused(reader: LedgerReader, payer: str, expected: str) -> None:
    payment = qr_payment(code(), now_ms(), None)
    with pytest.raises(PayError) as raised:
        check_payer(payer, payment, reader)
    assert raised.value.code == expected


# The transfer on the ledger -----------------------------------------------------------------------------------


def test_the_signed_payment_credits_the_merchant_and_is_found_by_md5_and_bill(ledger: Ledger, reader: LedgerReader) -> None:
    text = code()
    payment = qr_payment(text, now_ms(), None)
    check_payer("dara@acleda", payment, reader)
    body = payment_transfer(payment, "dara@acleda", credit_account(payment, reader), tid(50))
    entry = ledger.network.sign(body, "acleda")
    assert decode_entry(entry).body() == body
    assert ledger.results(entry) == ["ok"]
    assert ledger.net("shop@aba") == 15_000
    with ledger.store.read() as transaction:
        by_md5 = queries.transfers_with_reference(transaction, f"md5:{md5_hex(text)}", 10)
        by_bill = queries.transfers_with_reference(transaction, "bill:INV-2024-001", 10)
    assert [found["id"] for found in by_md5] == [found["id"] for found in by_bill] == [tid(50)]


def test_a_payment_to_the_phone_alias_credits_the_account_it_names(ledger: Ledger, reader: LedgerReader) -> None:
    payment = qr_payment(code(account="elsewhere@devb", mobile="+85512345678", amount=700), now_ms(), None)
    body = payment_transfer(payment, "dara@acleda", credit_account(payment, reader), tid(51))
    assert body.credit_account == "+85512345678"
    assert ledger.results(ledger.network.sign(body, "acleda")) == ["ok"]
    assert ledger.net("kiosk@aba") == 700


# The command --------------------------------------------------------------------------------------------------


def run_pay(*arguments: str) -> int:
    parser = argparse.ArgumentParser(prog="tonle")
    add_pay_commands(parser.add_subparsers(dest="command", required=True))
    namespace = parser.parse_args(["pay", *arguments])
    assert namespace.handler is pay.command_pay
    result: int = namespace.handler(namespace)
    return result


def altered(text: str) -> str:
    """The code with its last CRC digit changed."""
    return text[:-1] + ("0" if text[-1] != "0" else "1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (code(created_ms=1_700_000_000_000), "46 KHQR_EXPIRED"),
        (altered(code()), "8 KHQR_INVALID"),
        (code(amount=None), "amount_required"),
    ],
    ids=["expired", "altered", "static-without-amount"],
)
def test_the_command_refuses_a_bad_code_before_it_looks_for_the_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    # There is no network in tmp_path at all: reaching it would fail with another error.
    assert run_pay("--dir", str(tmp_path / "no-network"), "--qr", text, "--from", "dara@acleda") == 1
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""
