"""Property tests: random sequences of every entry kind keep the ledger's invariants on real LMDB."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.schema import Role
from consensus.entries import (
    AccountFlags,
    CloseAccount,
    FreezeAccount,
    Issue,
    OpenAccount,
    Redeem,
    RegisterAlias,
    SetKycTier,
    Transfer,
    TransferFlags,
    UnfreezeAccount,
    decode_entry,
    kyc_tiers,
)
from storage import queries
from storage.records import AccountKind, list_accounts
from tests.ledger_fixtures import Ledger, make_network, tid

network = make_network((("aba", Role.BANK), ("acleda", Role.BANK)))
currencies = ("KHR", "USD")
customers = [f"{name}.{currency.lower()}@{bank}" for currency in currencies for bank in ("aba", "acleda") for name in ("a", "b")]
customers += [f"pool.{currency.lower()}@aba" for currency in currencies]  # limited on credits
aliases = ["+85510000001", "+85510000002"]


def _owner(account: str) -> str:
    return account.rpartition("@")[2]


def _currency(account: str) -> str:
    return "KHR" if ".khr@" in account else "USD"


def setup_entries() -> list[bytes]:
    entries = []
    for account in customers:
        flags = AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS if account.startswith("pool.") else AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
        entries.append(network.sign(OpenAccount(account, _currency(account), flags=int(flags), tier="full"), _owner(account)))
    for number, currency in enumerate(currencies):
        for bank in ("aba", "acleda"):
            settlement = f"settlement.{currency.lower()}@{bank}"
            entries.append(network.sign(Issue(tid(900_000 + number * 10 + len(bank)), settlement, funding * 4, currency), "nbc"))
    for number, account in enumerate(customers):
        if not account.startswith("pool."):
            settlement = f"settlement.{_currency(account).lower()}@{_owner(account)}"
            entries.append(network.sign(Transfer(tid(800_000 + number), settlement, account, funding, _currency(account)), _owner(account)))
    return entries


funding = 20_000_000
initial_issued = {currency: 2 * funding * 4 for currency in currencies}


amounts = st.integers(min_value=1, max_value=3_000_000)
accounts_by_currency = {
    currency: [a for a in customers if _currency(a) == currency] + [f"settlement.{currency.lower()}@{b}" for b in ("aba", "acleda")]
    for currency in currencies
}
pending_ids = st.integers(min_value=0, max_value=7).map(lambda k: tid(500_000 + k))


@st.composite
def account_pair(draw):
    """Mostly two accounts of one currency; sometimes a mismatch, to exercise that rule too."""
    currency = draw(st.sampled_from(currencies))
    debit = draw(st.sampled_from(accounts_by_currency[currency]))
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        return debit, draw(st.sampled_from(customers))
    pool = accounts_by_currency[currency] + (aliases if currency == "KHR" else [])
    return debit, draw(st.sampled_from(pool))


@st.composite
def operations(draw, number):
    """One operation: a list of (body, signer) that must travel together (a linked chain), or a time step."""
    kind = draw(st.sampled_from(["transfer"] * 6 + ["pending"] * 3 + ["resolve"] * 3 + ["chain"] * 2 + ["time"] * 2
                                + ["issue", "redeem", "freeze", "unfreeze", "close", "tier", "alias"]))
    if kind == "time":
        return ("time", draw(st.integers(min_value=1, max_value=90_000)) * 1000)
    if kind in ("transfer", "pending"):
        debit, credit = draw(account_pair())
        flags = 0
        timeout = 0
        transfer_id = tid(number)
        if kind == "pending":
            flags = int(TransferFlags.PENDING)
            timeout = draw(st.sampled_from([0, 5, 60]))
            transfer_id = draw(pending_ids)
        elif draw(st.booleans()):
            flags = int(TransferFlags.BALANCING_DEBIT)
        body = Transfer(transfer_id, debit, credit, draw(amounts), _currency(debit), flags=flags, timeout_seconds=timeout)
        return ("entries", [(body, _owner(debit))])
    if kind == "resolve":
        pending = draw(pending_ids)
        flag = draw(st.sampled_from([TransferFlags.POST_PENDING, TransferFlags.VOID_PENDING]))
        amount = 0 if flag is TransferFlags.VOID_PENDING or draw(st.booleans()) else draw(amounts)
        signer = draw(st.sampled_from(["aba", "acleda"]))
        return ("entries", [(Transfer(tid(number), "", "", amount, "", flags=int(flag), pending_id=pending), signer)])
    if kind == "chain":
        size = draw(st.integers(min_value=2, max_value=3))
        members = []
        for position in range(size):
            debit, credit = draw(account_pair())
            flags = int(TransferFlags.LINKED) if position < size - 1 else 0
            members.append((Transfer(tid(number * 10 + position + 100_000), debit, credit, draw(amounts), _currency(debit), flags=flags), _owner(debit)))
        return ("entries", members)
    if kind in ("issue", "redeem"):
        account = f"settlement.{draw(st.sampled_from(currencies)).lower()}@{draw(st.sampled_from(['aba', 'acleda']))}"
        currency = "KHR" if ".khr@" in account else "USD"
        body = Issue(tid(number), account, draw(amounts) * 10, currency) if kind == "issue" else Redeem(tid(number), account, draw(amounts), currency)
        return ("entries", [(body, "nbc")])
    account = draw(st.sampled_from(customers))
    if kind == "freeze":
        return ("entries", [(FreezeAccount(account), "nbc")])
    if kind == "unfreeze":
        return ("entries", [(UnfreezeAccount(account), "nbc")])
    if kind == "close":
        return ("entries", [(CloseAccount(account), _owner(account))])
    if kind == "tier":
        return ("entries", [(SetKycTier(account, draw(st.sampled_from(kyc_tiers))), _owner(account))])
    return ("entries", [(RegisterAlias(draw(st.sampled_from(aliases)), account), _owner(account))])


@st.composite
def histories(draw):
    steps = []
    for number in range(2, draw(st.integers(min_value=5, max_value=40)) + 2):
        steps.append(draw(operations(number)))
    return steps


def _batches(steps):
    """Group operations into batches of a few units; a time step closes the current batch."""
    batch, time_step = [], 0
    for step in steps:
        if step[0] == "time":
            yield batch, step[1]
            batch = []
            continue
        batch.append([network.sign(body, signer) for body, signer in step[1]])
        if len(batch) >= 4:
            yield batch, time_step
            batch = []
    yield batch, time_step


def check_invariants(ledger: Ledger, issued_model: dict[str, int]) -> None:
    with ledger.store.read() as transaction:
        totals = queries.totals(transaction)
        for currency in currencies:
            assert totals[currency]["net"] == 0
            assert totals[currency]["held"] == totals[currency]["issued"] == issued_model[currency]
        for account in list_accounts(transaction):
            balance = account.balance
            if account.flags & AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS:
                assert balance.debits_posted + balance.debits_pending <= balance.credits_posted, account.name
            if account.flags & AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS:
                assert balance.credits_posted + balance.credits_pending <= balance.debits_posted, account.name
            assert account.kind != AccountKind.ISSUANCE or balance.debits_pending == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(histories())
def test_random_histories_keep_every_invariant_and_two_nodes_agree(steps):
    with tempfile.TemporaryDirectory() as directory:
        first = Ledger(Path(directory) / "a", network)
        second = Ledger(Path(directory) / "b", network)
        issued = dict(initial_issued)
        for ledger in (first, second):
            ledger.apply(*setup_entries())
        for units, time_step in _batches(steps):
            entries = [entry for unit in units for entry in unit]
            time_ms = first.time_ms + time_step
            applied = first.apply(*entries, time_ms=time_ms)
            second.apply(*entries, time_ms=time_ms)
            outcomes = iter(applied.outcomes)
            for unit in units:
                results = [next(outcomes) for _ in unit]
                if len(unit) > 1:  # a linked chain: all of it or none of it
                    succeeded = [outcome.result in ("ok", "exists") for outcome in results]
                    assert all(succeeded) or not any(outcome.result == "ok" for outcome in results)
                for raw, outcome in zip(unit, results, strict=True):
                    body = decode_entry(raw).body()
                    if outcome.result == "ok" and isinstance(body, Issue):
                        issued[body.currency] += body.amount
                    if outcome.result == "ok" and isinstance(body, Redeem):
                        issued[body.currency] -= body.amount
            check_invariants(first, issued)
        assert first.summary() == second.summary()
        with first.store.read() as transaction:
            assert transaction.recompute_state_hash() == transaction.state_hash()
        first.store.close()
        second.store.close()
