"""Read-only queries over a state transaction, returning plain values ready for the client API."""

from __future__ import annotations

from typing import Any

from consensus.entries import EntryError, Issue, Transfer, decode_entry
from storage.records import AccountKind, get_account, get_balance, get_transfer, list_accounts, list_currencies
from storage.state import StateTransaction


def transfer(transaction: StateTransaction, transfer_id: bytes) -> dict[str, Any] | None:
    record = get_transfer(transaction, transfer_id)
    if record is None:
        return None
    details: dict[str, Any] = {
        "id": transfer_id,
        "kind": record.kind,
        "result": record.result,
        "index": record.index,
        "cluster_time_ms": record.cluster_time_ms,
        "entry": record.entry,
    }
    try:
        entry = decode_entry(record.entry)
        body = entry.body()
    except EntryError:
        return details
    details["signer"] = entry.signer
    if isinstance(body, Transfer):
        details.update(
            debit_account=body.debit_account, credit_account=body.credit_account, amount=body.amount, currency=body.currency
        )
    elif isinstance(body, Issue):
        details.update(credit_account=body.credit_account, amount=body.amount, currency=body.currency)
    return details


def balance(transaction: StateTransaction, account_name: str) -> dict[str, Any] | None:
    account = get_account(transaction, account_name)
    if account is None:
        return None
    counters = get_balance(transaction, account.number)
    return {
        "account": account.name,
        "currency": account.currency,
        "institution": account.institution,
        "kind": str(account.kind),
        "debits_posted": counters.debits_posted,
        "credits_posted": counters.credits_posted,
        "debits_pending": counters.debits_pending,
        "credits_pending": counters.credits_pending,
        "balance": counters.net,
        "applied_index": transaction.applied_index(),
    }


def accounts(transaction: StateTransaction) -> list[dict[str, Any]]:
    return [
        {"account": account.name, "currency": account.currency, "institution": account.institution, "kind": str(account.kind)}
        for account in list_accounts(transaction)
    ]


def totals(transaction: StateTransaction) -> dict[str, dict[str, int]]:
    """Per currency: money issued, money held, and the double-entry sum (always zero).

    `held` sums every customer and settlement account; it equals `issued` (what the issuance accounts
    have paid out) exactly when no money was created or destroyed outside an issue.
    """
    result = {currency.code: {"issued": 0, "held": 0, "net": 0} for currency in list_currencies(transaction)}
    for account in list_accounts(transaction):
        net = get_balance(transaction, account.number).net
        row = result.setdefault(account.currency, {"issued": 0, "held": 0, "net": 0})
        row["net"] += net
        if account.kind is AccountKind.ISSUANCE:
            row["issued"] -= net
        else:
            row["held"] += net
    return result
