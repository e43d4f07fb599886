"""Cross-border links: a foreign switch as a participant, and an outbound payment as one linked chain."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.loader import load_genesis
from consensus.entries import Transfer, TransferFlags, rate_term_max
from node.cli_support import cluster_of, exit_code_failure, pick_node, positive, print_json
from node.client import Client, new_transfer_id
from node.cluster import LocalCluster
from storage.records import settlement_account

# The institution role of a foreign payment switch (PromptPay, NAPAS, DuitNow, UnionPay...): it holds
# settlement accounts only, and pays the foreign merchant outside this ledger.
foreign_switch_role = "foreign_switch"
# What the apply answers when a customer pays a foreign switch from an account not in the network's
# cross-border currency (the genesis `cross_border_currency`; Bakong's is KHR, research/domain.md §1.3).
cross_border_currency_not_allowed = "cross_border_currency_not_allowed"


class CrossBorderError(Exception):
    """A cross-border payment refused before anything was signed: a stable code and what is wrong."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Link:
    """A cross-border link: the foreign switch, and the sponsor bank that settles with it in one currency."""

    switch: str
    sponsor: str
    settlement_currency: str


@dataclass(frozen=True, slots=True)
class ExchangeRate:
    """Settlement-currency minor units per customer-currency minor unit, as the sponsor bank signs it."""

    numerator: int
    denominator: int


@dataclass(frozen=True, slots=True)
class OutboundPayment:
    customer_account: str
    customer_currency: str
    amount_minor: int
    link: Link
    rate: ExchangeRate | None = None  # required exactly when the currencies differ
    reference: str = ""


@dataclass(frozen=True, slots=True)
class SignedLeg:
    transfer: Transfer
    signer: str


def outbound_chain(payment: OutboundPayment, new_id: Callable[[], bytes] = new_transfer_id) -> list[SignedLeg]:
    """customer -> sponsor bank -> foreign switch settlement, linked so that all legs apply or none.

    The customer's institution signs the first leg (customer to the sponsor's settlement account in the
    customer's currency). The sponsor signs the second, from its settlement account in the link's
    currency to the switch's; when that currency differs, the second leg is the FX leg and carries the
    sponsor's rate, so the ledger checks its amount against the first leg's (TigerBeetle's FX recipe).
    """
    link = payment.link
    same_currency = payment.customer_currency == link.settlement_currency
    if same_currency and payment.rate is not None:
        raise CrossBorderError("rate_not_expected", "the customer pays in the settlement currency: no exchange")
    if not same_currency and payment.rate is None:
        raise CrossBorderError(
            "rate_required", f"{payment.customer_currency} to {link.settlement_currency} needs the sponsor's rate"
        )
    if payment.customer_account.rpartition("@")[2] == link.switch:
        raise CrossBorderError("customer_is_the_switch", "a foreign switch holds no customer accounts")
    first = Transfer(
        new_id(),
        payment.customer_account,
        settlement_account(link.sponsor, payment.customer_currency),
        payment.amount_minor,
        payment.customer_currency,
        flags=int(TransferFlags.LINKED),
        reference=payment.reference,
    )
    settled = payment.amount_minor
    numerator = denominator = 0
    if payment.rate is not None:
        numerator, denominator = payment.rate.numerator, payment.rate.denominator
        if not (1 <= numerator <= rate_term_max and 1 <= denominator <= rate_term_max):
            raise CrossBorderError("invalid_rate", f"both terms of a rate must be 1..{rate_term_max}")
        settled = payment.amount_minor * numerator // denominator
        if settled == 0:
            raise CrossBorderError("converted_amount_is_zero", "the amount is worth nothing in the settlement currency")
    second = Transfer(
        new_id(),
        settlement_account(link.sponsor, link.settlement_currency),
        settlement_account(link.switch, link.settlement_currency),
        settled,
        link.settlement_currency,
        reference=payment.reference,
        rate_numerator=numerator,
        rate_denominator=denominator,
    )
    return [SignedLeg(first, payment.customer_account.rpartition("@")[2]), SignedLeg(second, link.sponsor)]


def check_cross_border_currency(customer_currency: str, cross_border_currency: str) -> None:
    """The network rule, checked on the client so a refused payment is not even sent; the apply checks it
    again (it is the authority: a client that skips this check gets the same answer from every node)."""
    if cross_border_currency and customer_currency != cross_border_currency:
        raise CrossBorderError(
            cross_border_currency_not_allowed,
            f"cross-border payments are paid from {cross_border_currency} accounts; this one holds {customer_currency}",
        )


def check_participants(client: Client, payment: OutboundPayment) -> None:
    """Refuse before signing what the ledger would refuse anyway: an unknown account, a switch that is not one."""
    switch = client.institution(payment.link.switch)
    if switch is None or switch["role"] != foreign_switch_role:
        raise CrossBorderError("not_a_foreign_switch", f"{payment.link.switch} is not a foreign switch of this network")
    sponsor = client.institution(payment.link.sponsor)
    if sponsor is None or sponsor["role"] == foreign_switch_role:
        raise CrossBorderError("invalid_sponsor", f"{payment.link.sponsor} is not a member institution")
    account = client.balance(payment.customer_account)
    if account is None or account["closed"]:
        raise CrossBorderError("customer_account_not_found", f"no open account {payment.customer_account}")
    if account["currency"] != payment.customer_currency:
        raise CrossBorderError(
            "customer_currency_mismatch", f"{payment.customer_account} holds {account['currency']}"
        )


# The command ------------------------------------------------------------------------------------------------


def add_cross_border_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `cross-border` and its sub-commands on the `tonle` parser's sub-command set."""
    cross_border = subparsers.add_parser("cross-border", help="payments to foreign switches through sponsor banks")
    commands = cross_border.add_subparsers(dest="cross_border_command", required=True, metavar="ACTION")
    pay = commands.add_parser("pay", help="pay a foreign switch from a customer account (all legs or none)")
    pay.add_argument("--dir", required=True, help="the local network's directory (holds cluster.json and keys)")
    pay.add_argument("--from", dest="from_account", required=True, help="the customer's account id")
    pay.add_argument("--amount", type=positive, required=True, help="minor units of the customer's currency")
    pay.add_argument("--switch", required=True, help="the foreign switch's institution id")
    pay.add_argument("--sponsor", required=True, help="the sponsor bank that settles with the switch")
    pay.add_argument("--settlement-currency", help="the link's currency (default: the customer's)")
    pay.add_argument("--rate", help="NUMERATOR/DENOMINATOR settlement minor units per customer minor unit")
    pay.add_argument("--reference", default="", help="e.g. the foreign merchant's bill or QR reference")
    pay.add_argument("--node", help="node to send to (default: the first running node)")
    pay.set_defaults(handler=command_cross_border_pay)


def _rate(text: str | None) -> ExchangeRate | None:
    if text is None:
        return None
    numerator, _, denominator = text.partition("/")
    if not numerator.isdigit() or not (denominator or "1").isdigit():
        raise CrossBorderError("invalid_rate", "a rate is NUMERATOR/DENOMINATOR, e.g. 1/4100")
    return ExchangeRate(int(numerator), int(denominator or "1"))


def command_cross_border_pay(arguments: argparse.Namespace) -> int:
    cluster = cluster_of(arguments)
    try:
        with cluster.client(pick_node(cluster, arguments.node)) as client:
            account = client.balance(arguments.from_account)
            currency = account["currency"] if account is not None else ""
            payment = OutboundPayment(
                customer_account=arguments.from_account,
                customer_currency=currency,
                amount_minor=arguments.amount,
                link=Link(arguments.switch, arguments.sponsor, arguments.settlement_currency or currency),
                rate=_rate(arguments.rate),
                reference=arguments.reference,
            )
            check_participants(client, payment)
            check_cross_border_currency(currency, _cross_border_currency(cluster))
            legs = outbound_chain(payment)
            results = client.submit([cluster.sign(leg.transfer, leg.signer) for leg in legs])
    except CrossBorderError as error:
        print(f"tonle cross-border: refused: {error.code}: {error.message}", file=sys.stderr)
        return exit_code_failure
    documents: list[dict[str, Any]] = [
        {"id": leg.transfer.id, "from": leg.transfer.debit_account, "to": leg.transfer.credit_account,
         "amount": leg.transfer.amount, "currency": leg.transfer.currency, **result}
        for leg, result in zip(legs, results, strict=True)
    ]
    print_json(documents)
    applied = all(result["status"] == "applied" and result["result"] in ("ok", "exists") for result in results)
    return 0 if applied else exit_code_failure


def _cross_border_currency(cluster: LocalCluster) -> str:
    return load_genesis(Path(cluster.description["genesis"])).cross_border_currency
