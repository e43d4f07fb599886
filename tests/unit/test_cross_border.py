"""Cross-border links on a real LMDB ledger: the outbound chain applies all legs or none, under the KHR-only rule."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.loader import load_genesis
from config.render import render_genesis
from config.schema import ConfigError, Role
from consensus.entries import AdmitInstitution, Issue, OpenAccount, Transfer, TransferFlags
from nacl.signing import SigningKey
from node.cross_border import (
    CrossBorderError,
    ExchangeRate,
    Link,
    OutboundPayment,
    check_cross_border_currency,
    cross_border_currency_not_allowed,
    foreign_switch_role,
    outbound_chain,
)
from tests.ledger_fixtures import Ledger, Network, make_network, tid

khr_per_usd_cent = 41  # 4,100 riel to the dollar
usd_link = Link(switch="promptpay", sponsor="acleda", settlement_currency="USD")
khr_link = Link(switch="promptpay", sponsor="acleda", settlement_currency="KHR")


def network_with_switch(cross_border_currency: str = "KHR") -> Network:
    network = make_network((("aba", Role.BANK), ("acleda", Role.BANK), ("promptpay", Role(foreign_switch_role))))
    network.genesis = dataclasses.replace(network.genesis, cross_border_currency=cross_border_currency)
    return network


def open_ledger(path: Path, network: Network) -> Ledger:
    ledger = Ledger(path, network)
    sign = network.sign
    results = ledger.results(
        sign(OpenAccount("sokha@aba", "KHR", tier="full"), "aba"),
        sign(OpenAccount("sokha.usd@aba", "USD", tier="full"), "aba"),
        sign(Issue(tid(1), "settlement.khr@aba", 10_000_000, "KHR"), "nbc"),
        sign(Issue(tid(2), "settlement.usd@aba", 100_000, "USD"), "nbc"),
        sign(Issue(tid(3), "settlement.usd@acleda", 50_000, "USD"), "nbc"),
        sign(Transfer(tid(4), "settlement.khr@aba", "sokha@aba", 10_000_000, "KHR"), "aba"),
        sign(Transfer(tid(5), "settlement.usd@aba", "sokha.usd@aba", 100_000, "USD"), "aba"),
    )
    assert results == ["ok"] * 7
    return ledger


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = open_ledger(tmp_path / "state", network_with_switch())
    yield ledger
    ledger.store.close()


def ids(start: int = 100) -> Iterator[bytes]:
    return (tid(number) for number in itertools.count(start))


def apply_chain(ledger: Ledger, payment: OutboundPayment, start: int = 100) -> list[str]:
    counter = ids(start)
    legs = outbound_chain(payment, lambda: next(counter))
    return ledger.results(*(ledger.network.sign(leg.transfer, leg.signer) for leg in legs))


def balances(ledger: Ledger) -> dict[str, int]:
    names = ("sokha@aba", "sokha.usd@aba", "settlement.khr@acleda", "settlement.usd@acleda",
             "settlement.khr@promptpay", "settlement.usd@promptpay")
    return {name: ledger.net(name) for name in names}


# The chain ----------------------------------------------------------------------------------------------------


def test_the_chain_pays_the_sponsor_then_the_switch_signed_by_each_payer() -> None:
    payment = OutboundPayment("sokha@aba", "KHR", 41_000, khr_link, reference="md5:" + "c" * 32)
    counter = ids()
    first, second = outbound_chain(payment, lambda: next(counter))
    assert (first.signer, second.signer) == ("aba", "acleda")
    assert first.transfer == Transfer(tid(100), "sokha@aba", "settlement.khr@acleda", 41_000, "KHR",
                                      flags=int(TransferFlags.LINKED), reference="md5:" + "c" * 32)
    assert second.transfer == Transfer(tid(101), "settlement.khr@acleda", "settlement.khr@promptpay", 41_000, "KHR",
                                       reference="md5:" + "c" * 32)


def test_when_the_link_settles_in_another_currency_the_sponsors_leg_carries_its_rate() -> None:
    payment = OutboundPayment("sokha@aba", "KHR", 41_050, usd_link, ExchangeRate(1, khr_per_usd_cent))
    _first, second = outbound_chain(payment)
    assert (second.transfer.debit_account, second.transfer.credit_account) == ("settlement.usd@acleda", "settlement.usd@promptpay")
    assert (second.transfer.amount, second.transfer.currency) == (1_001, "USD")  # 41,050 / 41, rounded down
    assert (second.transfer.rate_numerator, second.transfer.rate_denominator) == (1, khr_per_usd_cent)


@pytest.mark.parametrize(
    ("payment", "code"),
    [
        (OutboundPayment("sokha@aba", "KHR", 41_000, usd_link), "rate_required"),
        (OutboundPayment("sokha@aba", "KHR", 41_000, khr_link, ExchangeRate(1, 1)), "rate_not_expected"),
        (OutboundPayment("sokha@aba", "KHR", 40, usd_link, ExchangeRate(1, khr_per_usd_cent)), "converted_amount_is_zero"),
        (OutboundPayment("sokha@aba", "KHR", 41_000, usd_link, ExchangeRate(0, 41)), "invalid_rate"),
        (OutboundPayment("sokha@aba", "KHR", 41_000, usd_link, ExchangeRate(1, 2**32)), "invalid_rate"),
        (OutboundPayment("x@promptpay", "KHR", 41_000, khr_link), "customer_is_the_switch"),
    ],
)
def test_a_chain_that_cannot_be_right_is_refused_before_signing(payment: OutboundPayment, code: str) -> None:
    with pytest.raises(CrossBorderError) as raised:
        outbound_chain(payment)
    assert raised.value.code == code


def test_the_client_checks_the_cross_border_currency_before_sending() -> None:
    check_cross_border_currency("KHR", "KHR")
    check_cross_border_currency("USD", "")  # no rule
    with pytest.raises(CrossBorderError) as raised:
        check_cross_border_currency("USD", "KHR")
    assert raised.value.code == cross_border_currency_not_allowed


# On the ledger ------------------------------------------------------------------------------------------------


def test_a_foreign_switch_holds_settlement_accounts_in_every_currency(ledger: Ledger) -> None:
    for currency in ("khr", "usd"):
        account = ledger.balance(f"settlement.{currency}@promptpay")
        assert (account["institution"], account["kind"], account["balance"]) == ("promptpay", "settlement", 0)


def test_a_khr_payment_through_the_sponsor_reaches_the_switch(ledger: Ledger) -> None:
    before = balances(ledger)
    assert apply_chain(ledger, OutboundPayment("sokha@aba", "KHR", 41_000, khr_link)) == ["ok", "ok"]
    after = balances(ledger)
    assert after["sokha@aba"] == before["sokha@aba"] - 41_000
    assert after["settlement.khr@acleda"] == before["settlement.khr@acleda"]  # the sponsor passes it on
    assert after["settlement.khr@promptpay"] == 41_000


def test_a_khr_payment_settled_in_usd_applies_the_fx_leg_at_the_sponsors_rate(ledger: Ledger) -> None:
    before = balances(ledger)
    payment = OutboundPayment("sokha@aba", "KHR", 410_000, usd_link, ExchangeRate(1, khr_per_usd_cent))
    assert apply_chain(ledger, payment) == ["ok", "ok"]
    after = balances(ledger)
    assert after["sokha@aba"] == before["sokha@aba"] - 410_000
    assert after["settlement.khr@acleda"] == before["settlement.khr@acleda"] + 410_000  # the sponsor bought riel
    assert after["settlement.usd@acleda"] == before["settlement.usd@acleda"] - 10_000  # and paid 100.00 USD
    assert after["settlement.usd@promptpay"] == 10_000


def test_when_any_leg_fails_no_leg_applies(ledger: Ledger) -> None:
    before = balances(ledger)
    # The sponsor holds 500.00 USD; 4,100,000 riel is worth 1,000.00.
    payment = OutboundPayment("sokha@aba", "KHR", 4_100_000, usd_link, ExchangeRate(1, khr_per_usd_cent))
    assert apply_chain(ledger, payment) == ["linked_event_failed", "exceeds_credits"]
    assert balances(ledger) == before
    # A leg whose amount does not match the rate it declares fails the chain as well.
    counter = ids(200)
    first, second = outbound_chain(OutboundPayment("sokha@aba", "KHR", 41_000, usd_link, ExchangeRate(1, khr_per_usd_cent)),
                                   lambda: next(counter))
    inflated = dataclasses.replace(second.transfer, amount=second.transfer.amount + 1)
    sign = ledger.network.sign
    assert ledger.results(sign(first.transfer, first.signer), sign(inflated, second.signer)) == [
        "linked_event_failed", "exchange_amount_mismatch",
    ]
    assert balances(ledger) == before


def test_a_customer_paying_a_switch_from_a_usd_account_is_refused_whole(ledger: Ledger) -> None:
    before = balances(ledger)
    usd_settled = Link(switch="promptpay", sponsor="acleda", settlement_currency="USD")
    assert apply_chain(ledger, OutboundPayment("sokha.usd@aba", "USD", 1_000, usd_settled)) == [
        "linked_event_failed", cross_border_currency_not_allowed,
    ]
    direct = Transfer(tid(300), "sokha.usd@aba", "settlement.usd@promptpay", 1_000, "USD")
    assert ledger.results(ledger.network.sign(direct, "aba")) == [cross_border_currency_not_allowed]
    assert balances(ledger) == before


def test_the_rule_judges_who_paid_not_the_currency_the_switch_is_settled_in(ledger: Ledger) -> None:
    direct = Transfer(tid(300), "sokha@aba", "settlement.khr@promptpay", 5_000, "KHR")
    assert ledger.results(ledger.network.sign(direct, "aba")) == ["ok"]
    # The sponsor prefunding the switch from its own settlement account is not a customer payment.
    prefunding = Transfer(tid(301), "settlement.usd@acleda", "settlement.usd@promptpay", 1_000, "USD")
    assert ledger.results(ledger.network.sign(prefunding, "acleda")) == ["ok"]


def test_without_the_rule_a_usd_customer_may_pay_a_switch(tmp_path: Path) -> None:
    ledger = open_ledger(tmp_path / "state", network_with_switch(cross_border_currency=""))
    try:
        usd_settled = Link(switch="promptpay", sponsor="acleda", settlement_currency="USD")
        assert apply_chain(ledger, OutboundPayment("sokha.usd@aba", "USD", 1_000, usd_settled)) == ["ok", "ok"]
    finally:
        ledger.store.close()


def test_a_switch_admitted_after_genesis_is_bound_by_the_rule(ledger: Ledger) -> None:
    key = SigningKey.generate()
    ledger.network.keys["napas"] = key
    admit = AdmitInstitution("napas", "NAPAS", foreign_switch_role, bytes(key.verify_key))
    assert ledger.results(ledger.network.sign(admit, "nbc")) == ["ok"]
    assert ledger.balance("settlement.usd@napas")["kind"] == "settlement"
    vietnam = Link(switch="napas", sponsor="acleda", settlement_currency="USD")
    assert apply_chain(ledger, OutboundPayment("sokha.usd@aba", "USD", 1_000, vietnam)) == [
        "linked_event_failed", cross_border_currency_not_allowed,
    ]
    assert apply_chain(ledger, OutboundPayment("sokha@aba", "KHR", 41_000, vietnam, ExchangeRate(1, khr_per_usd_cent)), 400) == [
        "ok", "ok",
    ]


def test_every_node_computes_the_same_state_for_the_same_chains(tmp_path: Path) -> None:
    network = network_with_switch()
    ledgers = [open_ledger(tmp_path / name, network) for name in ("one", "two")]
    try:
        for ledger in ledgers:
            apply_chain(ledger, OutboundPayment("sokha@aba", "KHR", 41_000, usd_link, ExchangeRate(1, khr_per_usd_cent)))
            apply_chain(ledger, OutboundPayment("sokha.usd@aba", "USD", 1_000, usd_link), 200)
        assert ledgers[0].summary().state_hash == ledgers[1].summary().state_hash
    finally:
        for ledger in ledgers:
            ledger.store.close()


# The genesis parameter ----------------------------------------------------------------------------------------


def test_the_cross_border_currency_is_read_from_the_genesis_and_changes_its_digest(tmp_path: Path) -> None:
    without = make_network().genesis
    with_rule = dataclasses.replace(without, cross_border_currency="KHR")
    path = tmp_path / "genesis.toml"
    path.write_text(render_genesis(with_rule))
    assert load_genesis(path) == with_rule
    path.write_text(render_genesis(without))
    assert load_genesis(path).cross_border_currency == ""
    assert with_rule.digest != without.digest


def test_a_cross_border_currency_the_genesis_does_not_hold_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "genesis.toml"
    path.write_text(render_genesis(dataclasses.replace(make_network().genesis, cross_border_currency="THB")))
    with pytest.raises(ConfigError, match="THB is not one of the genesis currencies"):
        load_genesis(path)
