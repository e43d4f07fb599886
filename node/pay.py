"""`tonle pay`: verify a KHQR, then sign and submit the transfer that pays it, findable by the code's MD5."""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol

from consensus.entries import Transfer, account_name_pattern, alias_pattern
from node.cli_support import cluster_of, exit_code_failure, pick_node, positive, print_json, transfer_id_argument
from node.client import new_transfer_id
from node.khqr import KhqrError, KhqrPayload, bill_number_characters_max, md5_hex, verify
from node.open_api import md5_token_prefix, static_md5_token_prefix

# A bill number goes into the transfer's reference as one token, so it must be one: printable ASCII
# without spaces (the ledger's reference is printable ASCII, and its index splits on whitespace).
bill_token_prefix = "bill:"
bill_token_pattern = re.compile(rf"[\x21-\x7e]{{1,{bill_number_characters_max}}}", re.ASCII)
# KHQR carries a merchant's phone (tag 62.02) in national or international form; aliases are E.164.
cambodia_country_code = "855"
_phone_separators = re.compile(r"[ \-().]")
stdin_payload = "-"


class PayError(Exception):
    """A payment refused before anything was submitted: a stable code and what is wrong."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class QrPayment:
    """What a verified KHQR asks for: who to pay, how much, and the references that find the payment."""

    md5: str
    merchant_account: str | None  # the KHQR's Bakong account id, if it is a ledger account name
    merchant_alias: str | None  # the merchant's phone (62.02) as an E.164 alias, if it has one
    amount_minor: int
    currency: str
    bill_number: str | None
    reference: str


class LedgerReader(Protocol):
    """The reads a payment needs before it is signed (node.client.Client has them)."""

    def balance(self, account: str, as_of_index: int | None = None) -> dict[str, Any] | None: ...

    def alias(self, alias: str) -> dict[str, Any] | None: ...


def phone_alias(mobile: str | None) -> str | None:
    """A KHQR mobile number as an E.164 alias: "+85512345678", "85512345678" and "012345678" all give
    +85512345678. None when it cannot be one."""
    if mobile is None:
        return None
    number = _phone_separators.sub("", mobile)
    if number.startswith("+"):
        candidate = number
    elif number.startswith(cambodia_country_code):
        candidate = "+" + number
    elif number.startswith("0"):
        candidate = "+" + cambodia_country_code + number[1:]
    else:
        return None
    return candidate if alias_pattern.fullmatch(candidate) else None


def payment_reference(md5: str, dynamic: bool, bill_number: str | None) -> str:
    """`md5:<hex>` (or `static-md5:<hex>` for a static code), then `bill:<number>` when the bill number can
    be one token. The Open API finds a payment by the first; `check_transaction_by_external_ref` by the second."""
    tokens = [(md5_token_prefix if dynamic else static_md5_token_prefix) + md5]
    if bill_number is not None and bill_token_pattern.fullmatch(bill_number):
        tokens.append(bill_token_prefix + bill_number)
    return " ".join(tokens)


def qr_payment(text: str, now_ms: int, amount_minor: int | None) -> QrPayment:
    """Verify `text` as a KHQR at `now_ms` (KhqrError for an altered, malformed or expired code) and read
    the payment it asks for. A dynamic code carries its amount; a static one takes the payer's."""
    payload: KhqrPayload = verify(text, now_ms=now_ms)
    assert payload.currency is not None, "verify() refuses a code without a supported currency"
    amount = payload.amount_minor
    if amount is None:
        if amount_minor is None:
            raise PayError("amount_required", "a static code carries no amount: give --amount")
        amount = amount_minor
    elif amount_minor is not None and amount_minor != amount:
        raise PayError("amount_mismatch", f"the code asks for {amount}, not {amount_minor}")
    account = payload.bakong_account_id
    merchant_account = account if account is not None and account_name_pattern.fullmatch(account) else None
    merchant_alias = phone_alias(payload.mobile_number)
    if merchant_account is None and merchant_alias is None:
        raise PayError(
            "invalid_merchant_account",
            f"{account!r} is not an account id of this network and the code carries no usable phone number",
        )
    md5 = md5_hex(text)
    return QrPayment(
        md5=md5,
        merchant_account=merchant_account,
        merchant_alias=merchant_alias,
        amount_minor=amount,
        currency=payload.currency,
        bill_number=payload.bill_number,
        reference=payment_reference(md5, payload.is_dynamic, payload.bill_number),
    )


def credit_account(payment: QrPayment, ledger: LedgerReader) -> str:
    """The merchant's account id if the ledger has it open in the code's currency, else its phone alias if
    that is registered to one; what the transfer is signed to."""
    if payment.merchant_account is not None:
        found = ledger.balance(payment.merchant_account)
        if found is not None and not found["closed"]:
            _check_currency(found, payment, "merchant_currency_mismatch")
            return payment.merchant_account
    if payment.merchant_alias is not None:
        registered = ledger.alias(payment.merchant_alias)
        if registered is not None:
            found = ledger.balance(registered["account"])
            if found is not None and not found["closed"]:
                _check_currency(found, payment, "merchant_currency_mismatch")
                return payment.merchant_alias
    named = " or ".join(name for name in (payment.merchant_account, payment.merchant_alias) if name)
    raise PayError("merchant_account_not_found", f"no open account {named} on this network")


def check_payer(payer: str, payment: QrPayment, ledger: LedgerReader) -> None:
    if not account_name_pattern.fullmatch(payer):
        raise PayError("invalid_payer_account", f"{payer!r} is not an account id")
    found = ledger.balance(payer)
    if found is None or found["closed"]:
        raise PayError("payer_account_not_found", f"no open account {payer} on this network")
    _check_currency(found, payment, "payer_currency_mismatch")


def _check_currency(account: dict[str, Any], payment: QrPayment, code: str) -> None:
    if account["currency"] != payment.currency:
        raise PayError(code, f"{account['account']} holds {account['currency']}; the code asks for {payment.currency}")


def payment_transfer(payment: QrPayment, payer: str, credit: str, transfer_id: bytes) -> Transfer:
    return Transfer(transfer_id, payer, credit, payment.amount_minor, payment.currency, reference=payment.reference)


# The command ------------------------------------------------------------------------------------------------


def add_pay_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `pay` on the `tonle` parser's sub-command set."""
    pay = subparsers.add_parser("pay", help="pay a KHQR code from an account (verified before anything is sent)")
    pay.add_argument("--dir", required=True, help="the local network's directory (holds cluster.json and keys)")
    pay.add_argument("--qr", required=True, help="the KHQR payload, or - to read it from standard input")
    pay.add_argument("--from", dest="from_account", required=True, help="the payer's account id")
    pay.add_argument("--amount", type=positive, help="minor units; only for a static code, which carries none")
    pay.add_argument("--id", type=transfer_id_argument, help="128-bit id in hex (default: a new time-ordered id)")
    pay.add_argument("--node", help="node to send to (default: the first running node)")
    pay.set_defaults(handler=command_pay)


def command_pay(arguments: argparse.Namespace) -> int:
    text = sys.stdin.read().strip() if arguments.qr == stdin_payload else arguments.qr
    try:
        # The code is checked before the network is even looked up: nothing leaves for a bad code.
        payment = qr_payment(text, time.time_ns() // 1_000_000, arguments.amount)
    except KhqrError as error:
        print(f"tonle pay: refused: {error.code} {error.name}: {error.message}", file=sys.stderr)
        return exit_code_failure
    except PayError as error:
        print(f"tonle pay: refused: {error.code}: {error.message}", file=sys.stderr)
        return exit_code_failure
    cluster = cluster_of(arguments)
    with cluster.client(pick_node(cluster, arguments.node)) as client:
        try:
            check_payer(arguments.from_account, payment, client)
            credit = credit_account(payment, client)
        except PayError as error:
            print(f"tonle pay: refused: {error.code}: {error.message}", file=sys.stderr)
            return exit_code_failure
        body = payment_transfer(payment, arguments.from_account, credit, arguments.id or new_transfer_id())
        (result,) = client.submit([cluster.sign(body, arguments.from_account.rpartition("@")[2])])
    print_json({
        "kind": "transfer",
        "id": body.id,
        "md5": payment.md5,
        "reference": payment.reference,
        "credit_account": credit,
        "amount": payment.amount_minor,
        "currency": payment.currency,
        **result,
    })
    return 0 if result["status"] == "applied" and result["result"] in ("ok", "exists") else exit_code_failure
