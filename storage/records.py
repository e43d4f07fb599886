"""Typed state records (currencies, institutions, accounts, balances, transfers) and their byte layouts."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntFlag, StrEnum

from consensus.codec import pack, unpack
from storage.state import StateTransaction, StorageCorrupted

# Balances are four unsigned 64-bit counters, as in TigerBeetle (which uses 128 bits); a transfer that
# would carry one past this bound fails with an `overflows_*` result instead of wrapping.
balance_counter_max = 2**64 - 1

_balance_layout = struct.Struct(">QQQQ")
_account_number_layout = struct.Struct(">Q")


class AccountKind(StrEnum):
    CUSTOMER = "customer"
    SETTLEMENT = "settlement"
    ISSUANCE = "issuance"


class AccountFlags(IntFlag):
    NONE = 0
    DEBITS_MUST_NOT_EXCEED_CREDITS = 1
    CREDITS_MUST_NOT_EXCEED_DEBITS = 2


class InstitutionStatus(StrEnum):
    ACTIVE = "active"


@dataclass(frozen=True, slots=True)
class CurrencyRecord:
    code: str
    decimals: int


@dataclass(frozen=True, slots=True)
class InstitutionRecord:
    id: str
    name: str
    role: str
    status: InstitutionStatus
    public_keys: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class AccountRecord:
    name: str
    number: int
    currency: str
    institution: str
    kind: AccountKind
    flags: AccountFlags
    opened_index: int


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
class TransferRecord:
    """The pinned outcome of an id: the signed entry as submitted, its result and where it was applied."""

    kind: int
    entry: bytes
    result: str
    index: int
    cluster_time_ms: int


def settlement_account(institution: str, currency: str) -> str:
    return f"settlement.{currency.lower()}@{institution}"


def issuance_account(central_bank: str, currency: str) -> str:
    return f"issuance.{currency.lower()}@{central_bank}"


reserved_account_prefixes = ("settlement.", "issuance.")


def _corrupt(what: str, key: bytes) -> StorageCorrupted:
    return StorageCorrupted(f"{what} record {key!r} has an unexpected layout")


def get_currency(transaction: StateTransaction, code: str) -> CurrencyRecord | None:
    payload = transaction.get("currencies", code.encode())
    if payload is None:
        return None
    fields = unpack(payload)
    return CurrencyRecord(code=code, decimals=fields[0])


def put_currency(transaction: StateTransaction, currency: CurrencyRecord) -> None:
    transaction.put("currencies", currency.code.encode(), pack([currency.decimals]))


def list_currencies(transaction: StateTransaction) -> list[CurrencyRecord]:
    return [CurrencyRecord(key.decode(), unpack(payload)[0]) for key, payload in transaction.items("currencies")]


def get_institution(transaction: StateTransaction, institution_id: str) -> InstitutionRecord | None:
    key = institution_id.encode()
    payload = transaction.get("institutions", key)
    if payload is None:
        return None
    fields = unpack(payload)
    if type(fields) is not list or len(fields) != 4:
        raise _corrupt("institution", key)
    name, role, status, keys = fields
    return InstitutionRecord(institution_id, name, role, InstitutionStatus(status), tuple(keys))


def put_institution(transaction: StateTransaction, institution: InstitutionRecord) -> None:
    transaction.put(
        "institutions",
        institution.id.encode(),
        pack([institution.name, institution.role, str(institution.status), list(institution.public_keys)]),
    )


def get_account(transaction: StateTransaction, name: str) -> AccountRecord | None:
    key = name.encode()
    payload = transaction.get("accounts", key)
    if payload is None:
        return None
    fields = unpack(payload)
    if type(fields) is not list or len(fields) != 6:
        raise _corrupt("account", key)
    number, currency, institution, kind, flags, opened_index = fields
    return AccountRecord(name, number, currency, institution, AccountKind(kind), AccountFlags(flags), opened_index)


def put_account(transaction: StateTransaction, account: AccountRecord) -> None:
    transaction.put(
        "accounts",
        account.name.encode(),
        pack(
            [
                account.number,
                account.currency,
                account.institution,
                str(account.kind),
                int(account.flags),
                account.opened_index,
            ]
        ),
    )


def list_accounts(transaction: StateTransaction) -> list[AccountRecord]:
    accounts = []
    for key, _payload in transaction.items("accounts"):
        account = get_account(transaction, key.decode())
        if account is not None:
            accounts.append(account)
    return accounts


def get_balance(transaction: StateTransaction, account_number: int) -> Balance:
    key = _account_number_layout.pack(account_number)
    payload = transaction.get("balances", key)
    if payload is None:
        raise _corrupt("balance", key)
    if len(payload) != _balance_layout.size:
        raise _corrupt("balance", key)
    return Balance(*_balance_layout.unpack(payload))


def put_balance(transaction: StateTransaction, account_number: int, balance: Balance) -> None:
    transaction.put(
        "balances",
        _account_number_layout.pack(account_number),
        _balance_layout.pack(
            balance.debits_posted, balance.credits_posted, balance.debits_pending, balance.credits_pending
        ),
    )


def get_transfer(transaction: StateTransaction, transfer_id: bytes) -> TransferRecord | None:
    payload = transaction.get("transfers", transfer_id)
    if payload is None:
        return None
    fields = unpack(payload)
    if type(fields) is not list or len(fields) != 5:
        raise _corrupt("transfer", transfer_id)
    return TransferRecord(*fields)


def put_transfer(transaction: StateTransaction, transfer_id: bytes, record: TransferRecord) -> None:
    transaction.put(
        "transfers",
        transfer_id,
        pack([record.kind, record.entry, record.result, record.index, record.cluster_time_ms]),
    )
