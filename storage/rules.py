"""The deterministic apply: one Raft entry (a batch) against one LMDB transaction, exactly once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from config.schema import Genesis, Role
from consensus.batch import BatchError, Checkpoint, decode_batch
from consensus.entries import (
    EntryError,
    EntryKind,
    Issue,
    OpenAccount,
    SignedEntry,
    Transfer,
    decode_entry,
    entry_key,
)
from storage.records import (
    AccountFlags,
    AccountKind,
    AccountRecord,
    Balance,
    CurrencyRecord,
    InstitutionRecord,
    InstitutionStatus,
    TransferRecord,
    balance_counter_max,
    get_account,
    get_balance,
    get_currency,
    get_institution,
    get_transfer,
    issuance_account,
    put_account,
    put_balance,
    put_currency,
    put_institution,
    put_transfer,
    reserved_account_prefixes,
    settlement_account,
)
from storage.state import StateTransaction

# Results. A client sees exactly one per entry: the first rule that fails, in the order checked below.
OK = "ok"
EXISTS = "exists"
EXISTS_WITH_DIFFERENT_FIELDS = "exists_with_different_fields"
ID_ALREADY_FAILED = "id_already_failed"



class ApplyGap(RuntimeError):
    """The log handed the apply an index that does not follow the last applied one. Fatal."""


@dataclass(frozen=True, slots=True)
class EntryOutcome:
    """The outcome of one entry of a batch. `key` is None when the entry could not be decoded."""

    key: bytes | None
    result: str
    original_result: str | None = None


@dataclass(frozen=True, slots=True)
class AppliedBatch:
    """What one Raft entry did to the state."""

    index: int
    cluster_time_ms: int
    outcomes: tuple[EntryOutcome, ...]
    state_hash: bytes
    checkpoint: Checkpoint | None
    batch_error: str | None = None


Verify = Callable[[SignedEntry], bool]

genesis_applied_index = 1


def initialize(transaction: StateTransaction, genesis: Genesis) -> None:
    """Load the genesis into an empty state: currencies, institutions, settlement and issuance accounts."""
    transaction.set_identity(genesis.cluster_id, genesis.digest)
    # pysyncobj starts every log with a no-op at index 1 that it never applies (raftLastApplied starts at
    # 1), so the first index any node applies is 2. Index 1 is therefore "applied" by the genesis itself.
    transaction.set_applied_index(genesis_applied_index)
    for currency in genesis.currencies:
        put_currency(transaction, CurrencyRecord(currency.code, currency.decimals))
    for institution in genesis.institutions:
        put_institution(
            transaction,
            InstitutionRecord(
                id=institution.id,
                name=institution.name,
                role=str(institution.role),
                status=InstitutionStatus.ACTIVE,
                public_keys=(institution.public_key,),
            ),
        )
        for currency in genesis.currencies:
            _open(
                transaction,
                settlement_account(institution.id, currency.code),
                currency.code,
                institution.id,
                AccountKind.SETTLEMENT,
                AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS,
                opened_index=0,
            )
    central_bank = genesis.central_bank.id
    for currency in genesis.currencies:
        _open(
            transaction,
            issuance_account(central_bank, currency.code),
            currency.code,
            central_bank,
            AccountKind.ISSUANCE,
            AccountFlags.NONE,
            opened_index=0,
        )


def _open(
    transaction: StateTransaction,
    name: str,
    currency: str,
    institution: str,
    kind: AccountKind,
    flags: AccountFlags,
    opened_index: int,
) -> None:
    number = transaction.take_account_number()
    put_account(transaction, AccountRecord(name, number, currency, institution, kind, flags, opened_index))
    put_balance(transaction, number, Balance())


def apply_batch(
    transaction: StateTransaction, index: int, batch_bytes: bytes, verify: Verify, cluster_id: str
) -> AppliedBatch | None:
    """Apply the Raft entry at `index`. Returns None when it was applied before (a replay changes nothing).

    Never raises for anything a leader could put in a batch: a malformed batch or entry gets a result.
    Raises only for a broken node (ApplyGap, StorageCorrupted, LMDB errors), which must stop.
    """
    applied_index = transaction.applied_index()
    if index <= applied_index:
        return None
    if index != applied_index + 1:
        raise ApplyGap(f"asked to apply index {index} after {applied_index}")
    try:
        batch = decode_batch(batch_bytes)
    except BatchError as error:
        transaction.set_applied_index(index)
        return AppliedBatch(index, transaction.cluster_time_ms(), (), transaction.state_hash(), None, str(error))
    # Cluster time only moves forward, whatever the clock of a new leader says.
    cluster_time_ms = max(transaction.cluster_time_ms(), batch.proposer_time_ms)
    context = _Context(transaction, index, cluster_time_ms, cluster_id)
    outcomes = tuple(context.apply_entry(raw, verify) for raw in batch.entries)
    transaction.set_cluster_time_ms(cluster_time_ms)
    transaction.set_applied_index(index)
    return AppliedBatch(index, cluster_time_ms, outcomes, transaction.state_hash(), batch.checkpoint)


def apply_no_op(transaction: StateTransaction, index: int) -> bool:
    """Record a Raft entry that carries no batch (pysyncobj's leader no-op) so indexes stay contiguous."""
    applied_index = transaction.applied_index()
    if index <= applied_index:
        return False
    if index != applied_index + 1:
        raise ApplyGap(f"asked to apply index {index} after {applied_index}")
    transaction.set_applied_index(index)
    return True


class _Context:
    """The state one batch is applied against, with the accounts it touched cached for the batch."""

    def __init__(self, transaction: StateTransaction, index: int, cluster_time_ms: int, cluster_id: str) -> None:
        self.transaction = transaction
        self.index = index
        self.cluster_time_ms = cluster_time_ms
        self.cluster_id = cluster_id

    def apply_entry(self, raw: bytes, verify: Verify) -> EntryOutcome:
        try:
            entry = decode_entry(raw)
            body = entry.body()
        except EntryError as error:
            return EntryOutcome(None, error.code)
        key = entry_key(body)
        # Until the signer is authenticated, the outcome is returned but recorded for nobody: pinning it
        # under the entry's id would let anyone squat on another institution's ids.
        if entry.cluster_id != self.cluster_id:
            return EntryOutcome(key, "wrong_network")
        if not verify(entry):
            return EntryOutcome(key, "signature_invalid")
        institution = get_institution(self.transaction, entry.signer)
        if institution is None:
            return EntryOutcome(key, "signer_not_found")
        if entry.public_key not in institution.public_keys:
            return EntryOutcome(key, "signer_key_not_authorized")
        if isinstance(body, OpenAccount):
            return EntryOutcome(key, self._open_account(body, institution))
        return self._transfer_like(entry, body, key, institution)

    # Accounts ------------------------------------------------------------------------------------------

    def _open_account(self, body: OpenAccount, signer: InstitutionRecord) -> str:
        existing = get_account(self.transaction, body.account)
        owner = body.account.rpartition("@")[2]
        if existing is not None:
            same = existing.currency == body.currency and existing.institution == owner
            same = same and existing.kind is AccountKind.CUSTOMER
            return EXISTS if same else EXISTS_WITH_DIFFERENT_FIELDS
        if owner != signer.id:
            return "signer_must_own_account"
        if body.account.startswith(reserved_account_prefixes):
            return "account_name_reserved"
        if get_currency(self.transaction, body.currency) is None:
            return "currency_not_found"
        _open(
            self.transaction,
            body.account,
            body.currency,
            owner,
            AccountKind.CUSTOMER,
            AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS,
            self.index,
        )
        return OK

    # Transfers and issues ----------------------------------------------------------------------------

    def _transfer_like(
        self, entry: SignedEntry, body: Transfer | Issue, key: bytes, signer: InstitutionRecord
    ) -> EntryOutcome:
        existing = get_transfer(self.transaction, body.id)
        if existing is not None:
            if not _same_submission(existing.entry, entry):
                return EntryOutcome(key, EXISTS_WITH_DIFFERENT_FIELDS, existing.result)
            if existing.result == OK:
                return EntryOutcome(key, EXISTS, OK)
            return EntryOutcome(key, ID_ALREADY_FAILED, existing.result)
        if isinstance(body, Transfer):
            result = self._transfer(body, signer)
        else:
            result = self._issue(body, signer)
        put_transfer(
            self.transaction,
            body.id,
            TransferRecord(int(entry.kind), entry.raw, result, self.index, self.cluster_time_ms),
        )
        return EntryOutcome(key, result)

    def _transfer(self, body: Transfer, signer: InstitutionRecord) -> str:
        if body.debit_account == body.credit_account:
            return "accounts_must_be_different"
        debit = get_account(self.transaction, body.debit_account)
        if debit is None:
            return "debit_account_not_found"
        credit = get_account(self.transaction, body.credit_account)
        if credit is None:
            return "credit_account_not_found"
        if debit.institution != signer.id:
            return "signer_must_own_debit_account"
        return self._post(debit, credit, body.amount, body.currency)

    def _issue(self, body: Issue, signer: InstitutionRecord) -> str:
        if signer.role != str(Role.CENTRAL_BANK):
            return "signer_must_be_central_bank"
        credit = get_account(self.transaction, body.credit_account)
        if credit is None:
            return "credit_account_not_found"
        if credit.kind is not AccountKind.SETTLEMENT:
            return "credit_account_must_be_settlement"
        debit = get_account(self.transaction, issuance_account(signer.id, body.currency))
        if debit is None:
            return "currency_not_found"
        return self._post(debit, credit, body.amount, body.currency)

    def _post(self, debit: AccountRecord, credit: AccountRecord, amount: int, currency: str) -> str:
        if debit.currency != credit.currency:
            return "accounts_must_have_the_same_currency"
        if currency != debit.currency:
            return "transfer_must_have_the_same_currency_as_accounts"
        debit_balance = get_balance(self.transaction, debit.number)
        credit_balance = get_balance(self.transaction, credit.number)
        if debit_balance.debits_posted + amount > balance_counter_max:
            return "overflows_debits_posted"
        if credit_balance.credits_posted + amount > balance_counter_max:
            return "overflows_credits_posted"
        if AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS in debit.flags:
            debits = debit_balance.debits_pending + debit_balance.debits_posted + amount
            if debits > debit_balance.credits_posted:
                return "exceeds_credits"
        if AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS in credit.flags:
            credits = credit_balance.credits_pending + credit_balance.credits_posted + amount
            if credits > credit_balance.debits_posted:
                return "exceeds_debits"
        put_balance(
            self.transaction,
            debit.number,
            Balance(
                debit_balance.debits_posted + amount,
                debit_balance.credits_posted,
                debit_balance.debits_pending,
                debit_balance.credits_pending,
            ),
        )
        put_balance(
            self.transaction,
            credit.number,
            Balance(
                credit_balance.debits_posted,
                credit_balance.credits_posted + amount,
                credit_balance.debits_pending,
                credit_balance.credits_pending,
            ),
        )
        return OK


def _same_submission(stored_raw: bytes, entry: SignedEntry) -> bool:
    """The same body from the same signer (a re-signature with another key of the signer is the same)."""
    if stored_raw == entry.raw:
        return True
    stored = decode_entry(stored_raw)
    return stored.body_bytes == entry.body_bytes and stored.signer == entry.signer
