"""The full payment model against real LMDB: accounts, two-phase and linked transfers, FX, institutions,
aliases, KYC limits and queries, with the precedence of every result."""

from __future__ import annotations

import random

import pytest
from nacl.signing import SigningKey

from config.schema import Role
from consensus.codec import pack, unpack
from consensus.entries import (
    AccountFlags,
    AdmitInstitution,
    AdmitNode,
    CloseAccount,
    EntryError,
    FreezeAccount,
    Issue,
    OpenAccount,
    Redeem,
    RegisterAlias,
    ReinstateInstitution,
    RotateKey,
    SetKycTier,
    SuspendInstitution,
    Transfer,
    TransferFlags,
    UnfreezeAccount,
    UnregisterAlias,
    decode_entry,
    signature_is_valid,
)
from storage import queries
from storage.records import balance_at, day_ms, get_account, history_checkpoint_events, kyc_daily_outflow_limits, phnom_penh_offset_ms
from storage.state import StorageCorrupted
from tests.ledger_fixtures import Ledger, make_network, tid

LINKED = int(TransferFlags.LINKED)
PENDING = int(TransferFlags.PENDING)
POST = int(TransferFlags.POST_PENDING)
VOID = int(TransferFlags.VOID_PENDING)
# A Phnom Penh midnight: 17:00 UTC.
midnight_ms = 1_700_000_000_000 - (1_700_000_000_000 + phnom_penh_offset_ms) % day_ms + day_ms


@pytest.fixture
def network():
    return make_network((("aba", Role.BANK), ("acleda", Role.BANK), ("wing", Role.PSP)))


@pytest.fixture
def ledger(tmp_path, network):
    ledger = Ledger(tmp_path / "state", network, start_ms=midnight_ms + 3600_000)
    sign = network.sign
    results = ledger.results(
        sign(OpenAccount("sokha@aba", "KHR", tier="full"), "aba"),
        sign(OpenAccount("dara@acleda", "KHR", tier="full"), "acleda"),
        sign(OpenAccount("vanna@aba", "USD", tier="full"), "aba"),
        sign(OpenAccount("pool@aba", "KHR", flags=int(AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS)), "aba"),
        sign(Issue(tid(1), "settlement.khr@aba", 100_000_000, "KHR"), "nbc"),
        sign(Issue(tid(2), "settlement.usd@wing", 5_000_000, "USD"), "nbc"),
        sign(Issue(tid(3), "settlement.khr@acleda", 10_000_000, "KHR"), "nbc"),
        sign(Transfer(tid(4), "settlement.khr@aba", "sokha@aba", 10_000_000, "KHR"), "aba"),
    )
    assert results == ["ok"] * 8
    yield ledger
    ledger.store.close()


def pay(network, number, debit, credit, amount, currency="KHR", signer=None, **fields):
    return network.sign(Transfer(tid(number), debit, credit, amount, currency, **fields), signer or debit.rpartition("@")[2])


# Accounts -----------------------------------------------------------------------------------------------


def test_an_account_limited_on_credits_refuses_credits_beyond_its_debits(ledger, network):
    assert ledger.results(pay(network, 10, "sokha@aba", "pool@aba", 1)) == ["exceeds_debits"]


def test_mutually_exclusive_account_flags_are_refused_before_signing(network):
    both = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS | AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS)
    with pytest.raises(EntryError) as error:
        network.sign(OpenAccount("x@aba", "KHR", flags=both), "aba")
    assert error.value.code == "flags_are_mutually_exclusive"


def test_closing_an_account(ledger, network):
    sign = network.sign
    assert ledger.results(sign(CloseAccount("sokha@aba"), "acleda")) == ["signer_must_own_account"]
    assert ledger.results(sign(CloseAccount("sokha@aba"), "aba")) == ["account_balance_not_zero"]
    assert ledger.results(pay(network, 11, "sokha@aba", "settlement.khr@aba", 10_000_000)) == ["ok"]
    assert ledger.results(sign(CloseAccount("sokha@aba"), "aba")) == ["ok"]
    assert ledger.results(sign(CloseAccount("sokha@aba"), "aba")) == ["account_already_closed"]
    assert ledger.results(pay(network, 12, "settlement.khr@aba", "sokha@aba", 1)) == ["credit_account_closed"]
    assert ledger.results(pay(network, 13, "sokha@aba", "dara@acleda", 1)) == ["debit_account_closed"]


def test_only_the_central_bank_freezes_and_a_frozen_account_moves_nothing(ledger, network):
    sign = network.sign
    assert ledger.results(sign(FreezeAccount("sokha@aba"), "aba")) == ["signer_must_be_central_bank"]
    assert ledger.results(sign(FreezeAccount("sokha@aba"), "nbc")) == ["ok"]
    assert ledger.results(sign(FreezeAccount("sokha@aba"), "nbc")) == ["account_already_frozen"]
    assert ledger.results(pay(network, 20, "sokha@aba", "dara@acleda", 1)) == ["debit_account_frozen"]
    assert ledger.results(pay(network, 21, "settlement.khr@aba", "sokha@aba", 1)) == ["credit_account_frozen"]
    assert ledger.results(sign(UnfreezeAccount("sokha@aba"), "nbc")) == ["ok"]
    assert ledger.results(sign(UnfreezeAccount("sokha@aba"), "nbc")) == ["account_not_frozen"]
    assert ledger.results(pay(network, 22, "sokha@aba", "dara@acleda", 1)) == ["ok"]


def test_account_code_and_user_data_are_kept(ledger, network):
    assert ledger.results(network.sign(OpenAccount("coded@aba", "KHR", code=42, user_data=b"branch-7"), "aba")) == ["ok"]
    balance = ledger.balance("coded@aba")
    assert (balance["code"], balance["user_data"]) == (42, b"branch-7")
    with pytest.raises(EntryError):
        network.sign(OpenAccount("big@aba", "KHR", user_data=b"x" * 33), "aba")


# Two-phase transfers ------------------------------------------------------------------------------------


def test_a_pending_transfer_reserves_then_posts_in_full(ledger, network):
    assert ledger.results(pay(network, 30, "sokha@aba", "dara@acleda", 700, flags=PENDING)) == ["ok"]
    reserved = ledger.balance("sokha@aba")
    assert (reserved["debits_pending"], reserved["balance"]) == (700, 10_000_000)
    post = pay(network, 31, "", "", 0, "", signer="aba", flags=POST, pending_id=tid(30))
    outcome = ledger.apply(post).outcomes[0]
    assert (outcome.result, outcome.amount) == ("ok", 700)
    after = ledger.balance("sokha@aba")
    assert (after["debits_pending"], after["balance"]) == (0, 10_000_000 - 700)
    assert ledger.net("dara@acleda") == 700
    again = pay(network, 32, "", "", 0, "", signer="aba", flags=POST, pending_id=tid(30))
    assert ledger.results(again) == ["pending_transfer_already_posted"]
    void = pay(network, 33, "", "", 0, "", signer="aba", flags=VOID, pending_id=tid(30))
    assert ledger.results(void) == ["pending_transfer_already_posted"]


def test_a_partial_post_releases_the_rest(ledger, network):
    ledger.apply(pay(network, 34, "sokha@aba", "dara@acleda", 1000, flags=PENDING))
    assert ledger.results(pay(network, 35, "sokha@aba", "dara@acleda", 400, flags=POST, pending_id=tid(34))) == ["ok"]
    after = ledger.balance("sokha@aba")
    assert (after["debits_pending"], after["debits_posted"]) == (0, 400)
    assert ledger.transfer(tid(34))["pending"]["posted_amount"] == 400


def test_voiding_releases_the_reservation(ledger, network):
    ledger.apply(pay(network, 36, "sokha@aba", "dara@acleda", 500, flags=PENDING))
    assert ledger.results(pay(network, 37, "", "", 0, "", signer="aba", flags=VOID, pending_id=tid(36))) == ["ok"]
    assert ledger.balance("sokha@aba")["debits_pending"] == 0
    assert ledger.results(pay(network, 38, "", "", 0, "", signer="aba", flags=POST, pending_id=tid(36))) == [
        "pending_transfer_already_voided"
    ]


@pytest.mark.parametrize(
    ("fields", "signer", "result"),
    [
        ({"pending_id": tid(999)}, "aba", "pending_transfer_not_found"),
        ({"pending_id": tid(4)}, "aba", "pending_transfer_not_pending"),
        ({"pending_id": tid(40), "debit_account": "dara@acleda"}, "aba", "pending_transfer_has_different_debit_account"),
        ({"pending_id": tid(40), "credit_account": "sokha@aba"}, "aba", "pending_transfer_has_different_credit_account"),
        ({"pending_id": tid(40), "currency": "USD"}, "aba", "pending_transfer_has_different_currency"),
        ({"pending_id": tid(40)}, "acleda", "signer_must_own_debit_account"),
        ({"pending_id": tid(40), "amount": 301}, "aba", "exceeds_pending_transfer_amount"),
    ],
)
def test_posting_a_pending_transfer_checks_what_it_names(ledger, network, fields, signer, result):
    ledger.apply(pay(network, 40, "sokha@aba", "dara@acleda", 300, flags=PENDING))
    body = {"debit_account": "", "credit_account": "", "amount": 0, "currency": "", **fields}
    entry = network.sign(Transfer(tid(41), flags=POST, **body), signer)
    assert ledger.results(entry) == [result]


def test_voiding_needs_the_whole_amount(ledger, network):
    ledger.apply(pay(network, 42, "sokha@aba", "dara@acleda", 300, flags=PENDING))
    assert ledger.results(pay(network, 43, "", "", 100, "", signer="aba", flags=VOID, pending_id=tid(42))) == [
        "pending_transfer_has_different_amount"
    ]


def test_a_pending_transfer_expires_on_cluster_time_and_releases(ledger, network):
    start = ledger.time_ms
    ledger.apply(pay(network, 44, "sokha@aba", "dara@acleda", 900, flags=PENDING, timeout_seconds=10))
    assert ledger.apply(time_ms=start + 9_999).expired == ()
    applied = ledger.apply(time_ms=start + 10_000)
    assert applied.expired == (tid(44),)
    assert ledger.balance("sokha@aba")["debits_pending"] == 0
    assert ledger.transfer(tid(44))["pending"]["state"] == "expired"
    assert ledger.transfer(tid(44))["pending"]["resolved_index"] == applied.index
    assert ledger.results(pay(network, 45, "", "", 0, "", signer="aba", flags=POST, pending_id=tid(44))) == [
        "pending_transfer_expired"
    ]


def test_pending_flags_are_checked_before_signing(network):
    cases = [
        (Transfer(tid(46), "sokha@aba", "dara@acleda", 1, "KHR", flags=PENDING | POST), "flags_are_mutually_exclusive"),
        (Transfer(tid(46), "sokha@aba", "dara@acleda", 1, "KHR", timeout_seconds=5), "timeout_reserved_for_pending_transfer"),
        (Transfer(tid(46), "", "", 0, "", flags=POST), "pending_id_must_not_be_zero"),
        (Transfer(tid(46), "", "", 0, "", flags=POST, pending_id=tid(46)), "pending_id_must_be_different"),
        (Transfer(tid(46), "sokha@aba", "dara@acleda", 1, "KHR", pending_id=tid(9)), "pending_id_must_be_zero"),
    ]
    for body, code in cases:
        with pytest.raises(EntryError) as error:
            network.sign(body, "aba")
        assert error.value.code == code


# Linked chains and exchange ---------------------------------------------------------------------------


def test_a_linked_chain_applies_wholly(ledger, network):
    chain = [
        pay(network, 50, "sokha@aba", "dara@acleda", 10, flags=LINKED),
        pay(network, 51, "sokha@aba", "dara@acleda", 20, flags=LINKED),
        pay(network, 52, "sokha@aba", "dara@acleda", 30),
    ]
    assert ledger.results(*chain) == ["ok", "ok", "ok"]
    assert ledger.net("dara@acleda") == 60


def test_a_linked_chain_with_one_failure_applies_nothing_and_stays_failed(ledger, network):
    before = ledger.summary().state_hash
    chain = [
        pay(network, 53, "sokha@aba", "dara@acleda", 10, flags=LINKED),
        pay(network, 54, "dara@acleda", "sokha@aba", 10_000, flags=LINKED),  # dara has nothing
        pay(network, 55, "sokha@aba", "dara@acleda", 30),
    ]
    assert ledger.results(*chain) == ["linked_event_failed", "exceeds_credits", "linked_event_failed"]
    assert ledger.net("dara@acleda") == 0 and ledger.net("sokha@aba") == 10_000_000
    assert ledger.summary().state_hash != before  # the failures are pinned
    # A retry fails at its first member, whose id is pinned; every member's outcome stays what it was.
    assert ledger.results(*chain) == ["id_already_failed", "linked_event_failed", "linked_event_failed"]
    assert [ledger.transfer(tid(n))["result"] for n in (53, 54, 55)] == ["linked_event_failed", "exceeds_credits", "linked_event_failed"]


def test_a_chain_left_open_at_the_end_of_a_batch_fails(ledger, network):
    assert ledger.results(pay(network, 56, "sokha@aba", "dara@acleda", 10, flags=LINKED)) == ["linked_event_chain_open"]
    assert ledger.net("dara@acleda") == 0


def test_a_currency_exchange_is_a_linked_chain_with_the_rate_signed(ledger, network):
    # 41,000 riel buys 1,000 cents at 1 cent per 41 riel, through wing's settlement accounts.
    leg_riel = pay(network, 60, "sokha@aba", "settlement.khr@wing", 41_000, flags=LINKED)
    leg_dollar = pay(network, 61, "settlement.usd@wing", "vanna@aba", 1_000, "USD", rate_numerator=1, rate_denominator=41)
    assert ledger.results(leg_riel, leg_dollar) == ["ok", "ok"]
    assert ledger.net("vanna@aba") == 1_000 and ledger.net("settlement.khr@wing") == 41_000
    greedy = pay(network, 63, "settlement.usd@wing", "vanna@aba", 1_001, "USD", rate_numerator=1, rate_denominator=41)
    assert ledger.results(pay(network, 62, "sokha@aba", "settlement.khr@wing", 41_000, flags=LINKED), greedy) == [
        "linked_event_failed",
        "exchange_amount_mismatch",
    ]
    alone = pay(network, 64, "settlement.usd@wing", "vanna@aba", 5, "USD", rate_numerator=1, rate_denominator=41)
    assert ledger.results(alone) == ["exchange_rate_requires_previous_leg"]


def test_balancing_transfers_move_what_the_limit_allows(ledger, network):
    ledger.apply(pay(network, 65, "sokha@aba", "dara@acleda", 1_234))
    drain = pay(network, 66, "dara@acleda", "sokha@aba", 10**9, flags=int(TransferFlags.BALANCING_DEBIT))
    outcome = ledger.apply(drain).outcomes[0]
    assert (outcome.result, outcome.amount) == ("ok", 1_234)
    assert ledger.net("dara@acleda") == 0
    assert ledger.transfer(tid(66))["amount_moved"] == 1_234


def test_references_find_their_transfers(ledger, network):
    ledger.apply(pay(network, 67, "sokha@aba", "dara@acleda", 5, reference="INV-2026-001"))
    ledger.apply(pay(network, 68, "sokha@aba", "dara@acleda", 6, reference="INV-2026-001"))
    with ledger.store.read() as transaction:
        found = queries.transfers_with_reference(transaction, "INV-2026-001", 10)
    assert sorted(item["amount"] for item in found) == [5, 6]


# Institutions, keys, nodes ----------------------------------------------------------------------------


def test_admitting_an_institution_opens_its_settlement_accounts_and_lets_it_sign(ledger, network):
    key = SigningKey.generate()
    network.keys["prince"] = key
    admit = AdmitInstitution("prince", "Prince Bank", "bank", bytes(key.verify_key))
    assert ledger.results(network.sign(admit, "aba")) == ["signer_must_be_central_bank"]
    assert ledger.results(network.sign(admit, "nbc")) == ["ok"]
    assert ledger.results(network.sign(admit, "nbc")) == ["exists"]
    assert ledger.results(network.sign(AdmitInstitution("prince", "Other", "bank", bytes(key.verify_key)), "nbc")) == [
        "exists_with_different_fields"
    ]
    reused = AdmitInstitution("copycat", "Copycat", "bank", bytes(network.keys["aba"].verify_key))
    assert ledger.results(network.sign(reused, "nbc")) == ["public_key_in_use"]
    assert ledger.balance("settlement.khr@prince")["balance"] == 0
    assert ledger.results(network.sign(OpenAccount("rith@prince", "KHR"), "prince")) == ["ok"]


def test_a_suspended_institution_signs_nothing_until_reinstated(ledger, network):
    sign = network.sign
    assert ledger.results(sign(SuspendInstitution("aba"), "acleda")) == ["signer_must_be_central_bank"]
    assert ledger.results(sign(SuspendInstitution("nbc"), "nbc")) == ["institution_is_central_bank"]
    assert ledger.results(sign(SuspendInstitution("aba"), "nbc")) == ["ok"]
    assert ledger.results(sign(SuspendInstitution("aba"), "nbc")) == ["institution_already_suspended"]
    assert ledger.results(pay(network, 70, "sokha@aba", "dara@acleda", 1)) == ["signer_suspended"]
    assert ledger.results(sign(OpenAccount("later@aba", "KHR"), "aba")) == ["signer_suspended"]
    assert ledger.results(pay(network, 71, "dara@acleda", "sokha@aba", 1)) == ["exceeds_credits"]  # credits still arrive
    assert ledger.results(sign(ReinstateInstitution("aba"), "nbc")) == ["ok"]
    assert ledger.results(sign(ReinstateInstitution("aba"), "nbc")) == ["institution_not_suspended"]
    assert ledger.results(pay(network, 72, "sokha@aba", "dara@acleda", 1)) == ["ok"]


def test_rotating_a_key_retires_the_old_one_and_keeps_old_signatures_verifiable(ledger, network):
    old_key = network.keys["aba"]
    signed_before = pay(network, 73, "sokha@aba", "dara@acleda", 1)
    assert ledger.results(signed_before) == ["ok"]
    new_key = SigningKey.generate()
    assert ledger.results(network.sign(RotateKey("aba", bytes(new_key.verify_key)), "acleda")) == [
        "signer_must_be_institution_or_central_bank"
    ]
    assert ledger.results(network.sign(RotateKey("aba", bytes(new_key.verify_key)), "aba")) == ["ok"]
    assert ledger.results(pay(network, 74, "sokha@aba", "dara@acleda", 1)) == ["signer_key_retired"]
    network.keys["aba"] = new_key
    assert ledger.results(pay(network, 75, "sokha@aba", "dara@acleda", 1)) == ["ok"]
    stored = decode_entry(ledger.transfer(tid(73))["entry"])
    assert stored.public_key == bytes(old_key.verify_key) and signature_is_valid(stored)
    with ledger.store.read() as transaction:
        keys = queries.institution(transaction, "aba")["keys"]
    assert [key["retired_index"] > 0 for key in keys] == [True, False]


def test_admitting_a_node(ledger, network):
    node_key = bytes(SigningKey.generate().verify_key)
    admit = AdmitNode("aba-2", "aba", node_key, "127.0.0.1:7201", "127.0.0.1:8201", "127.0.0.1:9201")
    assert ledger.results(network.sign(admit, "aba")) == ["signer_must_be_central_bank"]
    assert ledger.results(network.sign(admit, "nbc")) == ["ok"]
    assert ledger.results(network.sign(admit, "nbc")) == ["exists"]
    clash = AdmitNode("v1", "aba", bytes(SigningKey.generate().verify_key), "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
    assert ledger.results(network.sign(clash, "nbc")) == ["exists_with_different_fields"]
    with ledger.store.read() as transaction:
        names = [node["name"] for node in queries.nodes(transaction)]
    assert "aba-2" in names and "v1" in names


# Aliases ------------------------------------------------------------------------------------------------


def test_paying_a_phone_number(ledger, network):
    sign = network.sign
    assert ledger.results(sign(RegisterAlias("+85512345678", "dara@acleda"), "aba")) == ["signer_must_own_account"]
    assert ledger.results(sign(RegisterAlias("+85512345678", "dara@acleda"), "acleda")) == ["ok"]
    assert ledger.results(sign(RegisterAlias("+85512345678", "dara@acleda"), "acleda")) == ["exists"]
    assert ledger.results(sign(RegisterAlias("+85512345678", "sokha@aba"), "aba")) == ["alias_taken"]
    assert ledger.results(pay(network, 80, "sokha@aba", "+85512345678", 250)) == ["ok"]
    assert ledger.net("dara@acleda") == 250
    assert ledger.results(pay(network, 81, "sokha@aba", "+85599999999", 1)) == ["credit_alias_not_found"]
    assert ledger.results(sign(UnregisterAlias("+85512345678"), "aba")) == ["signer_must_own_account"]
    assert ledger.results(sign(UnregisterAlias("+85512345678"), "acleda")) == ["ok"]
    assert ledger.results(sign(UnregisterAlias("+85512345678"), "acleda")) == ["alias_not_found"]
    with pytest.raises(EntryError) as error:
        sign(RegisterAlias("012345678", "dara@acleda"), "acleda")
    assert error.value.code == "invalid_alias"


# KYC tiers and daily limits -----------------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["basic", "intermediate", "full", "bank"])
@pytest.mark.parametrize("currency", ["KHR", "USD"])
def test_each_tier_limits_daily_outflow_per_currency(tmp_path, network, tier, currency):
    limit = kyc_daily_outflow_limits[tier][currency]
    ledger = Ledger(tmp_path / "state", network, start_ms=midnight_ms + 1_000)
    sign = network.sign
    code = currency.lower()
    ledger.apply(
        sign(OpenAccount(f"payer.{code}@aba", currency, tier=tier), "aba"),
        sign(OpenAccount(f"payee.{code}@acleda", currency, tier="unlimited"), "acleda"),
        sign(Issue(tid(1), f"settlement.{code}@aba", 10 * limit, currency), "nbc"),
        pay(network, 2, f"settlement.{code}@aba", f"payer.{code}@aba", 10 * limit, currency),
    )
    assert ledger.results(pay(network, 3, f"payer.{code}@aba", f"payee.{code}@acleda", limit - 1, currency)) == ["ok"]
    assert ledger.results(pay(network, 4, f"payer.{code}@aba", f"payee.{code}@acleda", 1, currency)) == ["ok"]
    assert ledger.results(pay(network, 5, f"payer.{code}@aba", f"payee.{code}@acleda", 1, currency)) == ["exceeds_daily_limit"]
    # The next Phnom Penh day starts at 17:00 UTC.
    assert ledger.results(pay(network, 6, f"payer.{code}@aba", f"payee.{code}@acleda", 1, currency), time_ms=midnight_ms + day_ms - 1) == [
        "exceeds_daily_limit"
    ]
    assert ledger.results(pay(network, 7, f"payer.{code}@aba", f"payee.{code}@acleda", 1, currency), time_ms=midnight_ms + day_ms) == ["ok"]
    ledger.store.close()


def test_pending_transfers_count_toward_the_limit_until_voided(tmp_path, network):
    ledger = Ledger(tmp_path / "state", network, start_ms=midnight_ms + 1_000)
    limit = kyc_daily_outflow_limits["basic"]["KHR"]
    sign = network.sign
    ledger.apply(
        sign(OpenAccount("payer@aba", "KHR"), "aba"),
        sign(OpenAccount("payee@acleda", "KHR"), "acleda"),
        sign(Issue(tid(1), "settlement.khr@aba", 10 * limit, "KHR"), "nbc"),
        pay(network, 2, "settlement.khr@aba", "payer@aba", 10 * limit),
    )
    assert ledger.results(pay(network, 3, "payer@aba", "payee@acleda", limit, flags=PENDING)) == ["ok"]
    assert ledger.results(pay(network, 4, "payer@aba", "payee@acleda", 1)) == ["exceeds_daily_limit"]
    assert ledger.results(pay(network, 5, "", "", 0, "", signer="aba", flags=VOID, pending_id=tid(3))) == ["ok"]
    assert ledger.results(pay(network, 6, "payer@aba", "payee@acleda", 1)) == ["ok"]
    ledger.store.close()


def test_an_institution_sets_the_tier_of_its_own_accounts_only(ledger, network):
    assert ledger.results(network.sign(SetKycTier("sokha@aba", "basic"), "acleda")) == ["signer_must_own_account"]
    assert ledger.results(network.sign(SetKycTier("sokha@aba", "basic"), "aba")) == ["ok"]
    assert ledger.balance("sokha@aba")["tier"] == "basic"
    limit = kyc_daily_outflow_limits["basic"]["KHR"]
    assert ledger.results(pay(network, 90, "sokha@aba", "dara@acleda", limit + 1)) == ["exceeds_daily_limit"]


# Issue and redeem ---------------------------------------------------------------------------------------


def test_redeeming_takes_money_out_of_circulation(ledger, network):
    with ledger.store.read() as transaction:
        before = queries.totals(transaction)["KHR"]
    assert ledger.results(network.sign(Redeem(tid(95), "settlement.khr@acleda", 4_000_000, "KHR"), "aba")) == [
        "signer_must_be_central_bank"
    ]
    assert ledger.results(network.sign(Redeem(tid(96), "settlement.khr@acleda", 4_000_000, "KHR"), "nbc")) == ["ok"]
    assert ledger.results(network.sign(Redeem(tid(97), "settlement.khr@acleda", 6_000_001, "KHR"), "nbc")) == [
        "exceeds_credits"
    ]
    assert ledger.results(network.sign(Redeem(tid(98), "sokha@aba", 1, "KHR"), "nbc")) == ["debit_account_must_be_settlement"]
    with ledger.store.read() as transaction:
        after = queries.totals(transaction)["KHR"]
    assert after == {"issued": before["issued"] - 4_000_000, "held": before["held"] - 4_000_000, "net": 0}


def test_a_frozen_settlement_account_takes_no_issue_and_gives_no_redemption(ledger, network):
    sign = network.sign
    def money() -> dict:
        balance = ledger.balance("settlement.khr@acleda")
        return {field: balance[field] for field in ("debits_posted", "credits_posted", "balance")}

    before = money()
    assert ledger.results(sign(FreezeAccount("settlement.khr@acleda"), "nbc")) == ["ok"]
    assert ledger.results(sign(Issue(tid(93), "settlement.khr@acleda", 1_000, "KHR"), "nbc")) == ["credit_account_frozen"]
    assert ledger.results(sign(Redeem(tid(94), "settlement.khr@acleda", 1_000, "KHR"), "nbc")) == ["debit_account_frozen"]
    assert money() == before
    assert ledger.results(sign(UnfreezeAccount("settlement.khr@acleda"), "nbc")) == ["ok"]
    assert ledger.results(sign(Redeem(tid(95), "settlement.khr@acleda", 1_000, "KHR"), "nbc")) == ["ok"]


# Queries ------------------------------------------------------------------------------------------------


def test_history_is_newest_first_with_the_balance_after_each_transfer_and_pages_by_cursor(ledger, network):
    for number, amount in enumerate((100, 200, 300, 400), start=100):
        ledger.apply(pay(network, number, "sokha@aba", "dara@acleda", amount), time_ms=ledger.time_ms + 1_000)
    with ledger.store.read() as transaction:
        first = queries.history(transaction, "dara@acleda", start_ms=0, end_ms=2**62, limit=3, cursor=None)
        second = queries.history(transaction, "dara@acleda", start_ms=0, end_ms=2**62, limit=3, cursor=first["cursor"])
    assert [event["amount"] for event in first["events"]] == [400, 300, 200]
    assert [event["balance"] for event in first["events"]] == [1000, 600, 300]
    assert [event["amount"] for event in second["events"]] == [100] and second["cursor"] is None


def test_history_filters_by_cluster_time(ledger, network):
    start = ledger.time_ms
    for number in range(3):
        ledger.apply(pay(network, 110 + number, "sokha@aba", "dara@acleda", 1 + number), time_ms=start + 10_000 * (number + 1))
    with ledger.store.read() as transaction:
        middle = queries.history(transaction, "dara@acleda", start_ms=start + 15_000, end_ms=start + 25_000, limit=10, cursor=None)
    assert [event["amount"] for event in middle["events"]] == [2]


def test_balances_as_of_an_applied_index(ledger, network):
    marks = []
    for number, amount in enumerate((10, 20, 30), start=120):
        marks.append(ledger.apply(pay(network, number, "sokha@aba", "dara@acleda", amount), time_ms=ledger.time_ms + 1).index)
    assert [ledger.balance("dara@acleda", as_of_index=index)["balance"] for index in marks] == [10, 30, 60]
    assert ledger.balance("dara@acleda", as_of_index=marks[0] - 1)["balance"] == 0
    assert ledger.balance("+85500000000") is None


def test_history_and_past_balances_match_a_replay_across_many_checkpoints(ledger, network):
    """Enough events for several per-account checkpoints, some batches sharing a cluster time and some
    holding two events of the same account: every window, page and past balance matches the replay."""
    generator = random.Random(11)
    replay: list[tuple[int, int, int, int]] = []  # dara's (cluster time, index, amount, balance after)
    balance_after_index: dict[int, int] = {}
    balance, number = 0, 1000
    for _batch in range(3 * history_checkpoint_events):
        time_ms = ledger.time_ms + generator.choice((0, 1, 1_000))
        entries, amounts = [], []
        for _entry in range(generator.choice((1, 1, 2))):
            number += 1
            if balance > 10 and generator.random() < 0.3:
                amount = -generator.randint(1, balance // 2)
                entries.append(pay(network, number, "dara@acleda", "sokha@aba", -amount))
            else:
                amount = generator.randint(1, 1_000)
                entries.append(pay(network, number, "sokha@aba", "dara@acleda", amount))
            amounts.append(amount)
        applied = ledger.apply(*entries, time_ms=time_ms)
        assert [outcome.result for outcome in applied.outcomes] == ["ok"] * len(entries)
        for amount in amounts:
            balance += amount
            replay.append((time_ms, applied.index, amount, balance))
        balance_after_index[applied.index] = balance
    assert len(replay) > 2 * history_checkpoint_events

    def pages(start_ms: int, end_ms: int, limit: int) -> list[tuple[int, int, int, int]]:
        found, cursor = [], None
        with ledger.store.read() as transaction:
            while True:
                page = queries.history(transaction, "dara@acleda", start_ms=start_ms, end_ms=end_ms, limit=limit, cursor=cursor)
                assert len(page["events"]) <= limit
                found += [(event["cluster_time_ms"], event["index"], event["amount"], event["balance"]) for event in page["events"]]
                cursor = page["cursor"]
                if cursor is None:
                    return found

    times = sorted({time_ms for time_ms, _index, _amount, _balance in replay})
    for _window in range(40):
        start_ms, end_ms = sorted(generator.sample(times, 2))
        expected = [event for event in reversed(replay) if start_ms <= event[0] <= end_ms]
        assert pages(start_ms, end_ms, generator.choice((1, 7, 1000))) == expected, (start_ms, end_ms)
    assert pages(0, 2**64, 50) == list(reversed(replay))
    first_index = min(balance_after_index)
    for index in range(first_index - 1, ledger.index + 1):
        expected = balance_after_index.get(index, max((b for i, b in balance_after_index.items() if i < index), default=0))
        assert ledger.balance("dara@acleda", as_of_index=index)["balance"] == expected, index
    # The oldest past is reached through a checkpoint, not by walking every link from the newest event.
    with ledger.store.read() as transaction:
        counting = CountingReads(transaction)
        oldest_time_ms, oldest_index, _amount, _balance = replay[0]
        past = balance_at(counting, get_account(transaction, "dara@acleda"), oldest_time_ms, oldest_index)
    assert past is not None and past.credits_posted - past.debits_posted == balance_after_index[oldest_index]
    assert counting.history_reads <= history_checkpoint_events + 1


@pytest.mark.parametrize("link", ["itself", "another_account"])
def test_a_history_event_linked_wrongly_stops_the_query_as_damaged_state(ledger, network, link):
    ledger.apply(pay(network, 133, "sokha@aba", "dara@acleda", 5))
    ledger.apply(pay(network, 134, "sokha@aba", "dara@acleda", 6))
    with ledger.store.write() as transaction:
        dara, sokha = get_account(transaction, "dara@acleda"), get_account(transaction, "sokha@aba")
        values = unpack(transaction.get("history", dara.history_head))
        # Not reachable through the apply: this stands in for a bug that links events wrongly.
        values[-1] = dara.history_head if link == "itself" else sokha.history_head
        transaction.put("history", dara.history_head, pack(values))
    with ledger.store.read() as transaction, pytest.raises(StorageCorrupted, match="linked wrongly"):
        queries.history(transaction, "dara@acleda", start_ms=0, end_ms=2**62, limit=5, cursor=None)


class CountingReads:
    """A transaction that counts the history records read through it."""

    def __init__(self, transaction) -> None:
        self.transaction = transaction
        self.history_reads = 0

    def get(self, database: str, key: bytes):
        self.history_reads += database == "history"
        return self.transaction.get(database, key)

    def __getattr__(self, name: str):
        return getattr(self.transaction, name)


def test_a_transfer_appends_its_history_events_at_the_end_of_the_history(ledger, network):
    applied = ledger.apply(pay(network, 130, "sokha@aba", "dara@acleda", 5))
    with ledger.store.read() as transaction:
        keys = [key for key, _payload in transaction.items("history")]
    assert keys == sorted(keys)
    assert [int.from_bytes(key[:8], "big") for key in keys[-2:]] == [applied.index, applied.index]


def test_a_history_cursor_of_another_account_or_of_no_event_gives_no_events(ledger, network):
    ledger.apply(pay(network, 131, "sokha@aba", "dara@acleda", 5), pay(network, 132, "sokha@aba", "dara@acleda", 6))
    with ledger.store.read() as transaction:
        sokha = queries.history(transaction, "sokha@aba", start_ms=0, end_ms=2**62, limit=1, cursor=None)
        assert sokha["cursor"] is not None
        for cursor in (sokha["cursor"], b"", b"\x00" * 12, b"\xff" * 40):
            assert queries.history(transaction, "dara@acleda", start_ms=0, end_ms=2**62, limit=5, cursor=cursor)["events"] == []


# Precedence: where two rules fail, the one checked first is the answer ----------------------------------


@pytest.mark.parametrize(
    ("entry_of", "result"),
    [
        # id before everything: a pinned id answers the same whatever else is wrong now
        (lambda n: pay(n, 4, "nobody@aba", "dara@acleda", 5), "exists_with_different_fields"),
        # authentication before state: a foreign key is refused before the missing account is noticed
        (lambda n: n.sign(Transfer(tid(150), "nobody@aba", "dara@acleda", 5, "KHR"), "aba", key=SigningKey.generate()), "signer_key_not_authorized"),
        # debit account before credit account
        (lambda n: pay(n, 151, "nobody@aba", "nobody@acleda", 5), "debit_account_not_found"),
        # accounts before ownership
        (lambda n: pay(n, 152, "sokha@aba", "nobody@acleda", 5, signer="acleda"), "credit_account_not_found"),
        # same account before ownership
        (lambda n: pay(n, 153, "sokha@aba", "sokha@aba", 5, signer="acleda"), "accounts_must_be_different"),
        # ownership before currency
        (lambda n: pay(n, 154, "sokha@aba", "vanna@aba", 5, signer="acleda"), "signer_must_own_debit_account"),
        # currency before limits
        (lambda n: pay(n, 155, "sokha@aba", "vanna@aba", 10**12), "accounts_must_have_the_same_currency"),
        # balance limit before the daily limit
        (lambda n: pay(n, 156, "sokha@aba", "dara@acleda", 10**9), "exceeds_credits"),
    ],
)
def test_precedence(ledger, network, entry_of, result):
    assert ledger.results(entry_of(network)) == [result]
