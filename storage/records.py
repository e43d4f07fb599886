"""Typed state records and their byte layouts: currencies, institutions, nodes, accounts, balances, transfers,
pending transfers and their expiry, aliases, history, daily outflow, references and batch times."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import IntFlag, StrEnum

import msgpack

from consensus.batch import BatchError, decode_batch
from consensus.codec import pack, unpack
from storage.state import StateTransaction, StorageCorrupted

# Balances are four unsigned 64-bit counters, as in TigerBeetle (which uses 128 bits); a transfer that
# would carry one past this bound fails with an `overflows_*` result instead of wrapping.
balance_counter_max = 2**64 - 1
cluster_time_max_ms = 2**64 - 1

_u64 = struct.Struct(">Q")
# History is appended in apply order, keyed by (raft index, event number in the batch), so a transfer's two
# events land on the last page of the tree instead of two random pages of a tree ordered by account: at
# 10 k accounts that halves the bytes the apply writes per transfer (README, Performance). Each event links
# to the account's previous one; every `history_checkpoint_events`-th event of an account is also indexed
# by (account, cluster time) so a query for a past time walks at most that many links.
_history_key = struct.Struct(">QI")
_history_checkpoint_key = struct.Struct(">QQQI")  # account number, cluster time, raft index, event number
history_checkpoint_events = 64
history_key_bytes = _history_key.size
_event_number_max = 2**32 - 1
_index_max = 2**64 - 1
_expiry_key = struct.Struct(">Q16s")  # expiry time, transfer id

# KYC tiers: daily outflow limits per currency in minor units, NBC's tiers (research/domain.md §1.4).
# `bank` is bank-to-bank via Bakong with full KYC; `unlimited` is for settlement and issuance accounts.
kyc_daily_outflow_limits: dict[str, dict[str, int]] = {
    "basic": {"KHR": 2_000_000, "USD": 50_000},
    "intermediate": {"KHR": 12_000_000, "USD": 300_000},
    "full": {"KHR": 40_000_000, "USD": 1_000_000},
    "bank": {"KHR": 200_000_000, "USD": 5_000_000},
    "unlimited": {},
}
# Days are counted in Phnom Penh time (UTC+7), on the cluster clock the leader stamps on each batch.
phnom_penh_offset_ms = 7 * 3600 * 1000
day_ms = 86_400_000


def phnom_penh_day(cluster_time_ms: int) -> int:
    return (cluster_time_ms + phnom_penh_offset_ms) // day_ms


class AccountKind(StrEnum):
    CUSTOMER = "customer"
    SETTLEMENT = "settlement"
    ISSUANCE = "issuance"


class AccountStatus(IntFlag):
    OPEN = 0
    CLOSED = 1
    FROZEN = 2


_closed = int(AccountStatus.CLOSED)
_frozen = int(AccountStatus.FROZEN)


class InstitutionStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


class PendingState(StrEnum):
    PENDING = "pending"
    POSTED = "posted"
    VOIDED = "voided"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class CurrencyRecord:
    code: str
    decimals: int


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One signing key of an institution and the log positions between which it could sign."""

    public_key: bytes
    added_index: int
    retired_index: int = 0  # 0 while the key is current

    @property
    def current(self) -> bool:
        return self.retired_index == 0


@dataclass(frozen=True, slots=True)
class InstitutionRecord:
    id: str
    name: str
    role: str
    status: InstitutionStatus
    keys: tuple[KeyRecord, ...]

    def key(self, public_key: bytes) -> KeyRecord | None:
        return next((key for key in self.keys if key.public_key == public_key), None)


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node allowed on the Raft network: from the genesis, or admitted later (institution nodes)."""

    name: str
    role: str
    institution: str
    public_key: bytes
    raft_address: str
    client_address: str
    admin_address: str
    admitted_index: int


@dataclass(frozen=True, slots=True)
class Balance:
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0

    @property
    def net(self) -> int:
        """Credits minus debits posted: what the account holds, from the ledger's point of view."""
        return self.credits_posted - self.debits_posted


@dataclass(frozen=True, slots=True)
class AccountRecord:
    """An account with its balance and today's outflow in one record: a transfer reads and writes each of
    its two accounts once, which is most of what the apply costs per transfer."""

    name: str
    number: int
    currency: str
    institution: str
    kind: str  # an AccountKind value; kept as plain str and int below: the apply reads two per transfer
    flags: int  # AccountFlags bits
    code: int
    user_data: bytes
    tier: str
    status: int  # AccountStatus bits
    opened_index: int
    balance: Balance = Balance()
    outflow_day: int = 0  # the Phnom Penh day `outflow` counts
    outflow: int = 0  # debited on that day (pending reservations included), for the KYC daily limit
    history_events: int = 0  # events in the account's history
    history_head: bytes = b""  # key of its newest event (b"": none yet)

    @property
    def closed(self) -> bool:
        return bool(self.status & _closed)

    @property
    def frozen(self) -> bool:
        return bool(self.status & _frozen)

    def moved(self, balance: Balance, outflow_day: int, outflow: int, history_key: bytes) -> AccountRecord:
        """This account with a new balance and outflow, and the history event `history_key` recording the
        move as its newest (dataclasses.replace is slow on a hot path)."""
        return AccountRecord(
            self.name, self.number, self.currency, self.institution, self.kind, self.flags, self.code,
            self.user_data, self.tier, self.status, self.opened_index, balance, outflow_day, outflow,
            self.history_events + 1, history_key,
        )


@dataclass(frozen=True, slots=True)
class TransferRecord:
    """The pinned outcome of an id: the signed entry as submitted, its result, the amount it moved
    (balancing transfers may move less than they asked) and where it was applied."""

    kind: int
    entry: bytes
    result: str
    index: int
    cluster_time_ms: int
    amount: int
    leaf_index: int  # its leaf in the receipt tree
    position: int  # the entry's place in the batch archived at `index`, where its bytes are kept


@dataclass(frozen=True, slots=True)
class PendingRecord:
    """A reservation made by a pending transfer, until it is posted, voided or expires."""

    state: PendingState
    debit_account: str
    credit_account: str
    amount: int
    currency: str
    expires_at_ms: int  # 0: never
    created_day: int
    resolved_index: int = 0
    posted_amount: int = 0


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    """One change to an account's balance, with the balance after it."""

    cluster_time_ms: int
    index: int
    event: str  # "transfer" | "pending" | "post" | "void" | "expire" | "issue" | "redeem"
    transfer_id: bytes
    amount: int  # positive: credit to this account; negative: debit
    balance: Balance


def settlement_account(institution: str, currency: str) -> str:
    return f"settlement.{currency.lower()}@{institution}"


def issuance_account(central_bank: str, currency: str) -> str:
    return f"issuance.{currency.lower()}@{central_bank}"


reserved_account_prefixes = ("settlement.", "issuance.")


def _corrupt(what: str, key: bytes) -> StorageCorrupted:
    return StorageCorrupted(f"{what} record {key!r} has an unexpected layout")


def _fields(transaction: StateTransaction, database: str, key: bytes, count: int) -> list | None:
    payload = transaction.get(database, key)
    if payload is None:
        return None
    # Records were written by this code and their seal was just checked: no canonical re-encoding needed.
    values = msgpack.unpackb(payload, raw=False, use_list=True)
    if type(values) is not list or len(values) != count:
        raise _corrupt(database, key)
    return values


# Currencies -------------------------------------------------------------------------------------------


def get_currency(transaction: StateTransaction, code: str) -> CurrencyRecord | None:
    values = _fields(transaction, "currencies", code.encode(), 1)
    return None if values is None else CurrencyRecord(code, values[0])


def put_currency(transaction: StateTransaction, currency: CurrencyRecord) -> None:
    transaction.put("currencies", currency.code.encode(), pack([currency.decimals]))


def list_currencies(transaction: StateTransaction) -> list[CurrencyRecord]:
    return [CurrencyRecord(key.decode(), unpack(payload)[0]) for key, payload in transaction.items("currencies")]


# Institutions and nodes ----------------------------------------------------------------------------------


def get_institution(transaction: StateTransaction, institution_id: str) -> InstitutionRecord | None:
    values = _fields(transaction, "institutions", institution_id.encode(), 4)
    if values is None:
        return None
    name, role, status, keys = values
    return InstitutionRecord(institution_id, name, role, InstitutionStatus(status), tuple(KeyRecord(*key) for key in keys))


def put_institution(transaction: StateTransaction, institution: InstitutionRecord) -> None:
    keys = [[key.public_key, key.added_index, key.retired_index] for key in institution.keys]
    transaction.put("institutions", institution.id.encode(), pack([institution.name, institution.role, str(institution.status), keys]))


def list_institutions(transaction: StateTransaction) -> list[InstitutionRecord]:
    return [record for key, _ in transaction.items("institutions") if (record := get_institution(transaction, key.decode()))]


def get_node(transaction: StateTransaction, name: str) -> NodeRecord | None:
    values = _fields(transaction, "nodes", name.encode(), 7)
    return None if values is None else NodeRecord(name, *values)


def put_node(transaction: StateTransaction, node: NodeRecord) -> None:
    transaction.put(
        "nodes",
        node.name.encode(),
        pack([node.role, node.institution, node.public_key, node.raft_address, node.client_address, node.admin_address, node.admitted_index]),
    )


def list_nodes(transaction: StateTransaction) -> list[NodeRecord]:
    return [record for key, _ in transaction.items("nodes") if (record := get_node(transaction, key.decode()))]


# Accounts and balances ---------------------------------------------------------------------------------


def get_account(transaction: StateTransaction, name: str) -> AccountRecord | None:
    values = _fields(transaction, "accounts", name.encode(), 18)
    if values is None:
        return None
    (number, currency, institution, kind, flags, code, user_data, tier, status, opened_index,
     debits_posted, credits_posted, debits_pending, credits_pending, outflow_day, outflow, history_events, history_head) = values
    return AccountRecord(
        name, number, currency, institution, kind, flags, code, user_data, tier, status, opened_index,
        Balance(debits_posted, credits_posted, debits_pending, credits_pending), outflow_day, outflow,
        history_events, history_head,
    )


def put_account(transaction: StateTransaction, account: AccountRecord) -> None:
    balance = account.balance
    transaction.put(
        "accounts",
        account.name.encode(),
        pack(
            [
                account.number, account.currency, account.institution, account.kind, account.flags,
                account.code, account.user_data, account.tier, account.status, account.opened_index,
                balance.debits_posted, balance.credits_posted, balance.debits_pending, balance.credits_pending,
                account.outflow_day, account.outflow, account.history_events, account.history_head,
            ]
        ),
    )


def with_status(account: AccountRecord, status: int) -> AccountRecord:
    return replace(account, status=int(status))


def outflow_on(account: AccountRecord, day: int) -> int:
    return account.outflow if account.outflow_day == day else 0


def list_accounts(transaction: StateTransaction) -> list[AccountRecord]:
    return [record for key, _ in transaction.items("accounts") if (record := get_account(transaction, key.decode()))]


# Transfers, pending transfers and their expiry -------------------------------------------------------


def get_transfer(transaction: StateTransaction, transfer_id: bytes) -> TransferRecord | None:
    """The outcome pinned under an id, with its entry's bytes read from the batch archived at its index."""
    values = _fields(transaction, "transfers", transfer_id, 7)
    if values is None:
        return None
    kind, position, result, index, cluster_time_ms, amount, leaf_index = values
    return TransferRecord(kind, archived_entry(transaction, index, position), result, index, cluster_time_ms, amount, leaf_index, position)


def put_transfer(transaction: StateTransaction, transfer_id: bytes, record: TransferRecord) -> None:
    """Pin an outcome. The entry's bytes are not stored again: the archive holds the batch they came in
    (layout 3 stored them here too, doubling what a transfer costs on disk)."""
    transaction.insert(
        "transfers",
        transfer_id,
        pack([record.kind, record.position, record.result, record.index, record.cluster_time_ms, record.amount, record.leaf_index]),
    )


def get_pending(transaction: StateTransaction, transfer_id: bytes) -> PendingRecord | None:
    values = _fields(transaction, "pending", transfer_id, 9)
    if values is None:
        return None
    return PendingRecord(PendingState(values[0]), *values[1:])


def put_pending(transaction: StateTransaction, transfer_id: bytes, record: PendingRecord) -> None:
    transaction.put(
        "pending",
        transfer_id,
        pack(
            [
                str(record.state), record.debit_account, record.credit_account, record.amount, record.currency,
                record.expires_at_ms, record.created_day, record.resolved_index, record.posted_amount,
            ]
        ),
    )


def expiry_key(expires_at_ms: int, transfer_id: bytes) -> bytes:
    return _expiry_key.pack(expires_at_ms, transfer_id)


def due_expiries(transaction: StateTransaction, cluster_time_ms: int) -> list[tuple[bytes, bytes]]:
    """(expiry key, transfer id) of every pending transfer whose timeout is at or before the given time."""
    due = []
    for key, _payload in transaction.items("expiry"):
        expires_at_ms, transfer_id = _expiry_key.unpack(key)
        if expires_at_ms > cluster_time_ms:
            break
        due.append((key, transfer_id))
    return due


def earliest_expiry_ms(transaction: StateTransaction) -> int | None:
    for key, _payload in transaction.items("expiry"):
        return _expiry_key.unpack(key)[0]
    return None


# Aliases -----------------------------------------------------------------------------------------------


def get_alias(transaction: StateTransaction, alias: str) -> str | None:
    payload = transaction.get("aliases", alias.encode())
    return None if payload is None else payload.decode()


def read_accounts_ahead(transaction: StateTransaction, names: Iterable[str]) -> int:
    """Walk to each named account (an alias through its record) so that its pages are in memory when the
    apply reads it: a page fault taken here, on a thread beside the apply, is one the apply does not wait
    for. Returns how many were found. Nothing read here is used: the apply reads and checks every record."""
    found = 0
    for name in names:
        if name[:1] == "+":
            resolved = get_alias(transaction, name)
            if resolved is None:
                continue
            name = resolved
        found += transaction.contains("accounts", name.encode())
    return found


def put_alias(transaction: StateTransaction, alias: str, account: str) -> None:
    transaction.put("aliases", alias.encode(), account.encode())


def aliases_of(transaction: StateTransaction, account: str) -> list[str]:
    return [key.decode() for key, payload in transaction.items("aliases") if payload.decode() == account]


# History, outflow, references and batch times ---------------------------------------------------------


def history_key(index: int, event_number: int) -> bytes:
    return _history_key.pack(index, event_number)


def put_history(transaction: StateTransaction, key: bytes, account: AccountRecord, event: HistoryEvent) -> None:
    """Append `event` under `key` as the newest event of `account` (the record as it was before the event:
    its head becomes this event's link to the previous one)."""
    balance = event.balance
    transaction.insert(
        "history",
        key,
        pack(
            [
                account.number, event.cluster_time_ms, event.event, event.transfer_id, event.amount,
                balance.debits_posted, balance.credits_posted, balance.debits_pending, balance.credits_pending,
                account.history_head,
            ]
        ),
    )
    if (account.history_events + 1) % history_checkpoint_events == 0:
        index, event_number = _history_key.unpack(key)
        transaction.insert("history_checkpoints", _history_checkpoint_key.pack(account.number, event.cluster_time_ms, index, event_number), b"")


@dataclass(frozen=True, slots=True)
class _StoredEvent:
    account_number: int
    event: HistoryEvent
    event_number: int
    previous: bytes

    def position(self) -> tuple[int, int, int]:
        return self.event.cluster_time_ms, self.event.index, self.event_number


def _stored_event(transaction: StateTransaction, key: bytes, account_number: int) -> _StoredEvent:
    """The event at `key` of the account: linked to, so it must exist, belong to the account and link only
    to an older event (keys grow in apply order), or a query could loop or wander into another account."""
    stored = _find_event(transaction, key)
    if stored is None:
        raise StorageCorrupted(f"history event {key.hex()} is linked to but missing: the data file is damaged")
    if stored.account_number != account_number or (stored.previous and stored.previous >= key):
        raise StorageCorrupted(
            f"history event {key.hex()} of account {account_number} is linked wrongly "
            f"(account {stored.account_number}, previous {stored.previous.hex()}): the state is damaged"
        )
    return stored


def _find_event(transaction: StateTransaction, key: bytes) -> _StoredEvent | None:
    values = _fields(transaction, "history", key, 10)
    if values is None:
        return None
    index, event_number = _history_key.unpack(key)
    (account_number, cluster_time_ms, event, transfer_id, amount,
     debits_posted, credits_posted, debits_pending, credits_pending, previous) = values
    return _StoredEvent(
        account_number,
        HistoryEvent(cluster_time_ms, index, event, transfer_id, amount, Balance(debits_posted, credits_posted, debits_pending, credits_pending)),
        event_number,
        previous,
    )


def _newest_event_at_or_before(transaction: StateTransaction, account: AccountRecord, position: tuple[int, int, int]) -> bytes:
    """Key of the account's newest event whose (cluster time, raft index, event number) is at or before
    `position`, or b"". The walk starts at the first checkpoint after `position` (else at the head), so it
    follows at most `history_checkpoint_events` links."""
    start = account.history_head
    checkpoint_from = _history_checkpoint_key.pack(account.number, *position)
    for key, _payload in transaction.items("history_checkpoints", _u64.pack(account.number), checkpoint_from):
        start = key[_u64.size * 2 :]  # the checkpoint key ends in the event's history key
        break
    key = start
    while key:
        stored = _stored_event(transaction, key, account.number)
        if stored.position() <= position:
            return key
        key = stored.previous
    return b""


def account_history(
    transaction: StateTransaction, account: AccountRecord, *, end_ms: int, start_ms: int, limit: int, before_key: bytes | None
) -> tuple[list[HistoryEvent], bytes | None]:
    """Events of one account, newest first, with cluster time in [start_ms, end_ms]. Returns the events
    and a cursor (the key to continue before) when more remain. A cursor that is not one of this account's
    events gives no events."""
    if before_key is not None:
        stored = _find_event(transaction, before_key) if len(before_key) == history_key_bytes else None
        if stored is None or stored.account_number != account.number:
            return [], None
        key = stored.previous
    else:
        key = _newest_event_at_or_before(transaction, account, (min(end_ms, cluster_time_max_ms), _index_max, _event_number_max))
    events: list[HistoryEvent] = []
    last_key = None
    while key:
        stored = _stored_event(transaction, key, account.number)
        if stored.event.cluster_time_ms < start_ms:
            return events, None
        if len(events) == limit:
            return events, last_key
        events.append(stored.event)
        last_key = key
        key = stored.previous
    return events, None


def balance_at(transaction: StateTransaction, account: AccountRecord, cluster_time_ms: int, index: int) -> Balance | None:
    """The balance after the last event at or before (cluster time, raft index); None if there was none."""
    key = _newest_event_at_or_before(transaction, account, (cluster_time_ms, index, _event_number_max))
    return _stored_event(transaction, key, account.number).event.balance if key else None


def put_reference(transaction: StateTransaction, reference: str, transfer_id: bytes) -> None:
    """Index every whitespace-separated token of a reference, so "md5:<hex> bill:INV-1" is found by either."""
    for token in sorted(set(reference.split())):
        transaction.insert("references", token.encode() + b"\x00" + transfer_id, b"")


def transfers_by_reference(transaction: StateTransaction, reference: str, limit: int) -> list[bytes]:
    prefix = reference.encode() + b"\x00"
    return [key[len(prefix) :] for key, _ in _take(transaction.items("references", prefix), limit)]


# Network parameters set by the genesis (replicated state: every node applies the same rules).
parameter_cross_border_currency = "cross_border_currency"


def put_parameter(transaction: StateTransaction, name: str, value: str) -> None:
    transaction.put("parameters", name.encode(), pack([value]))


def get_parameter(transaction: StateTransaction, name: str) -> str:
    """A parameter's value; "" when it was never set (the rule it names is off)."""
    values = _fields(transaction, "parameters", name.encode(), 1)
    return "" if values is None else values[0]


def _take(iterator, limit: int) -> list:
    taken = []
    for item in iterator:
        if len(taken) == limit:
            break
        taken.append(item)
    return taken


def put_batch_time(transaction: StateTransaction, index: int, cluster_time_ms: int) -> None:
    transaction.put("batch_times", _u64.pack(index), _u64.pack(cluster_time_ms))


def time_of_index(transaction: StateTransaction, index: int) -> int | None:
    """The cluster time of the last batch at or before `index` (time only moves with batches)."""
    for key, payload in transaction.items_reverse("batch_times", b"", _u64.pack(index + 1)):
        return _u64.unpack(payload)[0]
    return None


# Archive and tree heads (outside the state hash) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeadRecord:
    """A tree head the apply computed at an index, with the validator signatures gathered for it."""

    index: int
    tree_size: int
    root_hash: bytes
    state_hash: bytes
    cluster_time_ms: int
    signatures: tuple[tuple[str, bytes], ...]


def put_archived_batch(transaction: StateTransaction, index: int, batch_bytes: bytes) -> None:
    transaction.put_unhashed("archive", _u64.pack(index), batch_bytes)


def archived_entry(transaction: StateTransaction, index: int, position: int) -> bytes:
    """The bytes of the entry at `position` in the batch archived at `index`."""
    key = _u64.pack(index)
    batch_bytes = transaction.get("archive", key)
    if batch_bytes is None:
        raise StorageCorrupted(f"archive record {index} is missing: a transfer record points into it")
    try:
        return decode_batch(batch_bytes).entries[position]
    except (BatchError, IndexError) as error:
        raise _corrupt("archive", key) from error


def archived_batches(transaction: StateTransaction, first_index: int, last_index: int):
    """(index, batch bytes) of every archived batch in [first_index, last_index], in order."""
    for key, payload in transaction.items("archive", start=_u64.pack(first_index)):
        index = _u64.unpack(key)[0]
        if index > last_index:
            return
        yield index, payload


def put_head(transaction: StateTransaction, head: HeadRecord) -> None:
    transaction.put_unhashed(
        "heads",
        _u64.pack(head.index),
        pack([head.tree_size, head.root_hash, head.state_hash, head.cluster_time_ms, [list(item) for item in head.signatures]]),
    )


def _head(key: bytes, payload: bytes) -> HeadRecord:
    values = unpack(payload)
    if type(values) is not list or len(values) != 5:
        raise _corrupt("head", key)
    tree_size, root_hash, state_hash, cluster_time_ms, signatures = values
    return HeadRecord(_u64.unpack(key)[0], tree_size, root_hash, state_hash, cluster_time_ms, tuple((name, signature) for name, signature in signatures))


def get_head(transaction: StateTransaction, index: int) -> HeadRecord | None:
    key = _u64.pack(index)
    payload = transaction.get("heads", key)
    return None if payload is None else _head(key, payload)


def heads_from(transaction: StateTransaction, index: int):
    """Heads at or after `index`, oldest first."""
    for key, payload in transaction.items("heads", start=_u64.pack(index)):
        yield _head(key, payload)
