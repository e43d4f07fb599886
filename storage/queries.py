"""Read-only queries over a state transaction, returning plain values ready for the client API."""

from __future__ import annotations

import hashlib
from typing import Any

from consensus.entries import EntryError, Issue, Redeem, Transfer, decode_entry
from consensus.receipts import HeadSignature, Receipt, TreeHead
from storage import tree
from storage.records import (
    AccountKind,
    Balance,
    account_history,
    balance_at,
    get_account,
    get_alias,
    get_institution,
    get_pending,
    get_transfer,
    heads_from,
    list_accounts,
    list_currencies,
    list_nodes,
    time_of_index,
    transfers_by_reference,
)
from storage.entry_hashes import EntryHashIndex, transfer_ids_with_hash_prefix
from storage.state import StateTransaction, StorageCorrupted

history_limit_max = 1000
reference_limit_max = 1000


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
        "amount_moved": record.amount,
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
            debit_account=body.debit_account, credit_account=body.credit_account, amount=body.amount,
            currency=body.currency, flags=body.flags, pending_id=body.pending_id, timeout_seconds=body.timeout_seconds,
            reference=body.reference, code=body.code,
        )
    elif isinstance(body, Issue):
        details.update(credit_account=body.credit_account, amount=body.amount, currency=body.currency)
    elif isinstance(body, Redeem):
        details.update(debit_account=body.debit_account, amount=body.amount, currency=body.currency)
    pending = get_pending(transaction, transfer_id)
    if pending is not None:
        details["pending"] = {
            "state": str(pending.state), "amount": pending.amount, "expires_at_ms": pending.expires_at_ms,
            "resolved_index": pending.resolved_index, "posted_amount": pending.posted_amount,
        }
    return details


def transfers_with_reference(transaction: StateTransaction, reference: str, limit: int) -> list[dict[str, Any]]:
    ids = transfers_by_reference(transaction, reference, min(limit, reference_limit_max))
    return [found for transfer_id in ids if (found := transfer(transaction, transfer_id)) is not None]


def transfers_with_hash(
    transaction: StateTransaction, index: EntryHashIndex | None, hash_prefix: bytes, limit: int
) -> list[dict[str, Any]]:
    """Transfers whose signed entry's SHA-256 starts with `hash_prefix` (the whole 32 bytes, or a short hash).
    Raises EntryHashIndexBehind while a node rebuilds its index."""
    found = []
    for transfer_id in transfer_ids_with_hash_prefix(transaction, index, hash_prefix, min(limit, reference_limit_max)):
        details = transfer(transaction, transfer_id)
        if details is None:
            continue  # indexed after this transaction's view of the state was taken
        # The index is derived and unsealed: each answer is checked against the sealed record it names.
        if not hashlib.sha256(details["entry"]).digest().startswith(hash_prefix):
            raise StorageCorrupted(
                f"the entry-hash index maps {hash_prefix.hex()} to transfer {transfer_id.hex()}, whose entry hashes "
                "otherwise: the index is damaged; stop the node and delete its entry_hashes directory (it is rebuilt)"
            )
        found.append(details)
    return found


def _balance_fields(balance: Balance) -> dict[str, int]:
    return {
        "debits_posted": balance.debits_posted,
        "credits_posted": balance.credits_posted,
        "debits_pending": balance.debits_pending,
        "credits_pending": balance.credits_pending,
        "balance": balance.net,
    }


def _resolve(transaction: StateTransaction, name: str):
    if name.startswith("+"):
        target = get_alias(transaction, name)
        if target is None:
            return None
        name = target
    return get_account(transaction, name)


def balance(transaction: StateTransaction, account_name: str, as_of_index: int | None = None) -> dict[str, Any] | None:
    """An account's balance now, or as it was after the given applied index (from its history)."""
    account = _resolve(transaction, account_name)
    if account is None:
        return None
    document = {
        "account": account.name,
        "currency": account.currency,
        "institution": account.institution,
        "kind": str(account.kind),
        "tier": account.tier,
        "flags": account.flags,
        "code": account.code,
        "user_data": account.user_data,
        "closed": account.closed,
        "frozen": account.frozen,
        "applied_index": transaction.applied_index(),
    }
    if as_of_index is None or as_of_index >= transaction.applied_index():
        return {**document, **_balance_fields(account.balance)}
    if as_of_index < account.opened_index:
        return None
    cluster_time_ms = time_of_index(transaction, as_of_index)
    past = None if cluster_time_ms is None else balance_at(transaction, account, cluster_time_ms, as_of_index)
    return {**document, "as_of_index": as_of_index, **_balance_fields(past or Balance())}


def history(
    transaction: StateTransaction, account_name: str, *, start_ms: int, end_ms: int, limit: int, cursor: bytes | None
) -> dict[str, Any] | None:
    """An account's balance changes, newest first, each with the balance after it."""
    account = _resolve(transaction, account_name)
    if account is None:
        return None
    events, next_cursor = account_history(
        transaction, account, end_ms=end_ms, start_ms=start_ms, limit=min(limit, history_limit_max), before_key=cursor
    )
    return {
        "account": account.name,
        "events": [
            {
                "cluster_time_ms": event.cluster_time_ms,
                "index": event.index,
                "event": event.event,
                "transfer_id": event.transfer_id,
                "amount": event.amount,
                **_balance_fields(event.balance),
            }
            for event in events
        ],
        "cursor": next_cursor,
    }


def accounts(transaction: StateTransaction) -> list[dict[str, Any]]:
    return [
        {"account": account.name, "currency": account.currency, "institution": account.institution, "kind": str(account.kind)}
        for account in list_accounts(transaction)
    ]


def institution(transaction: StateTransaction, institution_id: str) -> dict[str, Any] | None:
    record = get_institution(transaction, institution_id)
    if record is None:
        return None
    return {
        "id": record.id,
        "name": record.name,
        "role": record.role,
        "status": str(record.status),
        "keys": [
            {"public_key": key.public_key, "added_index": key.added_index, "retired_index": key.retired_index}
            for key in record.keys
        ],
    }


def alias(transaction: StateTransaction, alias_name: str) -> dict[str, Any] | None:
    account = get_alias(transaction, alias_name)
    return None if account is None else {"alias": alias_name, "account": account}


def nodes(transaction: StateTransaction) -> list[dict[str, Any]]:
    return [
        {
            "name": node.name, "role": node.role, "institution": node.institution, "public_key": node.public_key,
            "raft_address": node.raft_address, "client_address": node.client_address,
            "admin_address": node.admin_address, "admitted_index": node.admitted_index,
        }
        for node in list_nodes(transaction)
    ]


def totals(transaction: StateTransaction) -> dict[str, dict[str, int]]:
    """Per currency: money issued (net of redemptions), money held, and the double-entry sum (always zero).

    `held` sums every customer and settlement account, posted balances only; it equals `issued` exactly
    when no money was created or destroyed outside an issue or a redemption.
    """
    result = {currency.code: {"issued": 0, "held": 0, "net": 0} for currency in list_currencies(transaction)}
    for account in list_accounts(transaction):
        net = account.balance.net
        row = result.setdefault(account.currency, {"issued": 0, "held": 0, "net": 0})
        row["net"] += net
        if account.kind == AccountKind.ISSUANCE:
            row["issued"] -= net
        else:
            row["held"] += net
    return result


# Receipts ---------------------------------------------------------------------------------------------

# How many heads after a transfer to look through for one signed by a majority of validators.
receipt_head_search_max = 10_000


def majority(validator_count: int) -> int:
    return validator_count // 2 + 1


def receipt(transaction: StateTransaction, transfer_id: bytes, cluster_id: str, validator_count: int) -> tuple[Receipt | None, str]:
    """The receipt of a transfer: its leaf, the first head after it signed by a majority of validators, and
    the inclusion proof for that head's tree. Returns (None, why) while there is none yet."""
    record = get_transfer(transaction, transfer_id)
    if record is None:
        return None, "not_found"
    needed = majority(validator_count)
    for searched, head in enumerate(heads_from(transaction, record.index)):
        if searched == receipt_head_search_max:
            break
        if head.tree_size <= record.leaf_index or len({name for name, _ in head.signatures}) < needed:
            continue
        tree_head = TreeHead(cluster_id, head.tree_size, head.root_hash, head.state_hash, head.index, head.cluster_time_ms)
        return (
            Receipt(
                entry_raw=record.entry,
                result=record.result,
                raft_index=record.index,
                cluster_time_ms=record.cluster_time_ms,
                leaf_index=record.leaf_index,
                inclusion_path=tuple(tree.inclusion_proof(transaction, record.leaf_index, head.tree_size)),
                head=tree_head,
                signatures=tuple(HeadSignature(name, signature) for name, signature in sorted(head.signatures)),
            ),
            "ok",
        )
    return None, "not_yet_signed"


def receipt_status(transaction: StateTransaction, transfer_id: bytes) -> dict[str, Any] | None:
    """Whether a receipt still stands: a later correcting transfer that references `reverses:<id>` and
    succeeded reverses it (transfers are immutable; corrections are new transfers, as in TigerBeetle)."""
    record = get_transfer(transaction, transfer_id)
    if record is None:
        return None
    reversals = []
    for reversal_id in transfers_by_reference(transaction, f"reverses:{transfer_id.hex()}", reference_limit_max):
        reversal = get_transfer(transaction, reversal_id)
        if reversal is not None and reversal.result == "ok":
            reversals.append(reversal_id)
    return {"id": transfer_id, "result": record.result, "current": not reversals, "reversed_by": reversals}


def signed_head(transaction: StateTransaction, cluster_id: str, validator_count: int, at_or_after: int = 0, latest: bool = False):
    """A head signed by a majority: the first at or after an index, or the latest one."""
    needed = majority(validator_count)
    chosen = None
    for head in heads_from(transaction, at_or_after):
        if len({name for name, _ in head.signatures}) >= needed:
            chosen = head
            if not latest:
                break
    return chosen
