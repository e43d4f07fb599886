"""The deterministic apply: one Raft entry (a batch) against one LMDB transaction, exactly once.

Every entry gets exactly one result: the first rule that fails, in the order the checks below are written
(README "Results" lists them). Nothing here reads a clock, a socket or a random source: time is the
cluster time the leader stamped on the batch, so every node computes the same results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from config.schema import Genesis, Role
from consensus.batch import BatchError, Checkpoint, decode_batch
from consensus.receipts import encode_leaf_data
from consensus.entries import (
    AccountFlags,
    AdmitInstitution,
    AdmitNode,
    Body,
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
    SignedEntry,
    SuspendInstitution,
    Transfer,
    TransferFlags,
    UnfreezeAccount,
    UnregisterAlias,
    alias_pattern,
    decode_entry,
    entry_key,
    transfer_like_kinds,
)
from storage.records import (
    AccountKind,
    AccountRecord,
    AccountStatus,
    Balance,
    CurrencyRecord,
    HeadRecord,
    HistoryEvent,
    InstitutionRecord,
    InstitutionStatus,
    KeyRecord,
    NodeRecord,
    PendingRecord,
    PendingState,
    TransferRecord,
    aliases_of,
    balance_counter_max,
    cluster_time_max_ms,
    due_expiries,
    expiry_key,
    get_account,
    get_alias,
    get_currency,
    get_institution,
    get_node,
    get_parameter,
    get_pending,
    get_transfer,
    history_key,
    issuance_account,
    kyc_daily_outflow_limits,
    list_currencies,
    list_institutions,
    list_nodes,
    outflow_on,
    parameter_cross_border_currency,
    phnom_penh_day,
    put_account,
    put_alias,
    put_archived_batch,
    put_batch_time,
    put_currency,
    put_head,
    put_history,
    put_institution,
    put_node,
    put_parameter,
    put_pending,
    put_reference,
    put_transfer,
    reserved_account_prefixes,
    settlement_account,
    with_status,
)
from storage import tree
from storage.entry_hashes import log_pair, put_log
from storage.state import StateTransaction, StorageCorrupted

OK = "ok"
EXISTS = "exists"
EXISTS_WITH_DIFFERENT_FIELDS = "exists_with_different_fields"
ID_ALREADY_FAILED = "id_already_failed"
LINKED_EVENT_FAILED = "linked_event_failed"
LINKED_EVENT_CHAIN_OPEN = "linked_event_chain_open"

# Validators sign a tree head at the end of the first batch in each window of cluster time. The rule only
# reads the log (batch times), so every node computes heads at the same indexes: all validators sign the
# same heads, and a head gathers a majority of signatures within about a window of the commit.
head_window_ms = 500

# pysyncobj starts every log with a no-op at index 1 that it never applies (raftLastApplied starts at 1),
# so the first index any node applies is 2. Index 1 is "applied" by the genesis itself.
genesis_applied_index = 1

# Flag bits as plain ints: enum operations cost microseconds, and the apply tests them per transfer.
_linked = int(TransferFlags.LINKED)
_pending = int(TransferFlags.PENDING)
_post_pending = int(TransferFlags.POST_PENDING)
_void_pending = int(TransferFlags.VOID_PENDING)
_balancing_debit = int(TransferFlags.BALANCING_DEBIT)
_balancing_credit = int(TransferFlags.BALANCING_CREDIT)
_debits_limited = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
_credits_limited = int(AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS)

# Results of entries that cannot be attributed to their claimed signer: returned, but never recorded
# under the entry's id, so nobody can squat on another institution's ids with a forged entry.
unattributable_results = frozenset(
    {"wrong_network", "signature_invalid", "signer_not_found", "signer_key_not_authorized", "signer_key_retired"}
)


class ApplyGap(RuntimeError):
    """The log handed the apply an index that does not follow the last applied one. Fatal."""


@dataclass(frozen=True, slots=True)
class EntryOutcome:
    """The outcome of one entry of a batch. `key` is None when the entry could not be decoded."""

    key: bytes | None
    result: str
    original_result: str | None = None
    amount: int | None = None  # what a transfer moved (a balancing transfer may move less than asked)


@dataclass(frozen=True, slots=True)
class AppliedBatch:
    """What one Raft entry did to the state."""

    index: int
    cluster_time_ms: int
    outcomes: tuple[EntryOutcome, ...]
    state_hash: bytes
    checkpoint: Checkpoint | None
    batch_error: str | None = None
    expired: tuple[bytes, ...] = ()
    head: HeadRecord | None = None
    # The batch's entries as logged, one per outcome and in the same order: entries that share a key (the
    # same transfer id with different bodies) have different outcomes, and a waiter must get its own.
    entries: tuple[bytes, ...] = ()


Verify = Callable[[SignedEntry], bool]
# The node's decode of an entry's exact bytes, made on intake or as a batch arrived, if it still has one.
# Decoding is a pure function of the bytes, so a remembered result is the result the apply would get.
Decoded = Callable[[bytes], "tuple[SignedEntry, Body] | None"]


# Genesis -------------------------------------------------------------------------------------------------


def initialize(transaction: StateTransaction, genesis: Genesis) -> None:
    """Load the genesis into an empty state: currencies, institutions and their accounts, and nodes."""
    transaction.set_identity(genesis.cluster_id, genesis.digest)
    transaction.set_applied_index(genesis_applied_index)
    for currency in genesis.currencies:
        put_currency(transaction, CurrencyRecord(currency.code, currency.decimals))
    currencies = [currency.code for currency in genesis.currencies]
    if genesis.cross_border_currency:
        put_parameter(transaction, parameter_cross_border_currency, genesis.cross_border_currency)
    for institution in genesis.institutions:
        record = InstitutionRecord(
            institution.id, institution.name, str(institution.role), InstitutionStatus.ACTIVE,
            (KeyRecord(institution.public_key, 0),),
        )
        _admit_institution(transaction, record, currencies, 0)
    central_bank = genesis.central_bank.id
    for code in currencies:
        _open(transaction, issuance_account(central_bank, code), code, central_bank, AccountKind.ISSUANCE,
              AccountFlags.NONE, "unlimited", 0)
    for spec in genesis.nodes:
        put_node(
            transaction,
            NodeRecord(spec.name, str(spec.role), spec.institution or central_bank, spec.public_key,
                       str(spec.raft_address), str(spec.client_address), str(spec.admin_address), 0),
        )


def _admit_institution(transaction: StateTransaction, record: InstitutionRecord, currencies: list[str], index: int) -> None:
    put_institution(transaction, record)
    for code in currencies:
        _open(transaction, settlement_account(record.id, code), code, record.id, AccountKind.SETTLEMENT,
              AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS, "unlimited", index)


def _open(
    transaction: StateTransaction, name: str, currency: str, institution: str, kind: AccountKind,
    flags: AccountFlags, tier: str, opened_index: int, code: int = 0, user_data: bytes = b"",
) -> None:
    number = transaction.take_account_number()
    account = AccountRecord(name, number, currency, institution, str(kind), int(flags), code, user_data, tier, int(AccountStatus.OPEN), opened_index)
    put_account(transaction, account)


# Batches -----------------------------------------------------------------------------------------------


def accounts_read_by(body: Body) -> tuple[str, ...]:
    """The accounts (names or aliases) the apply of this entry reads by the name the entry gives, for a
    read-ahead of their pages. Transfers that resolve a pending one name theirs through it, and an issue's
    debit is its signer's issuance account: the apply finds those itself."""
    if isinstance(body, Transfer):
        return () if body.flags & (_post_pending | _void_pending) else (body.debit_account, body.credit_account)
    if isinstance(body, Issue):
        return (body.credit_account,)
    if isinstance(body, Redeem):
        return (body.debit_account,)
    return ()



def apply_batch(
    transaction: StateTransaction, index: int, batch_bytes: bytes, verify: Verify, cluster_id: str, *, receipts: bool = True,
    decoded: Decoded | None = None,
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
    put_archived_batch(transaction, index, batch_bytes)
    try:
        batch = decode_batch(batch_bytes)
    except BatchError as error:
        transaction.set_applied_index(index)
        return AppliedBatch(index, transaction.cluster_time_ms(), (), transaction.state_hash(), None, str(error))
    # Cluster time only moves forward, whatever the clock of a new leader says.
    previous_time_ms = transaction.cluster_time_ms()
    cluster_time_ms = max(previous_time_ms, batch.proposer_time_ms)
    context = _Context(transaction, index, cluster_time_ms, cluster_id, verify, receipts, decoded)
    expired = context.expire_pending()
    outcomes = context.apply_entries(batch.entries)
    context.finish()
    put_batch_time(transaction, index, cluster_time_ms)
    transaction.set_cluster_time_ms(cluster_time_ms)
    transaction.set_applied_index(index)
    state_hash = transaction.state_hash()
    head = None
    size = tree.tree_size(transaction)
    if size and cluster_time_ms // head_window_ms > previous_time_ms // head_window_ms:
        head = HeadRecord(index, size, tree.root(transaction, size), state_hash, cluster_time_ms, ())
        put_head(transaction, head)
    return AppliedBatch(index, cluster_time_ms, outcomes, state_hash, batch.checkpoint, None, expired, head, batch.entries)


def apply_no_op(transaction: StateTransaction, index: int) -> bool:
    """Record a Raft entry that carries no batch (pysyncobj's leader no-op) so indexes stay contiguous."""
    applied_index = transaction.applied_index()
    if index <= applied_index:
        return False
    if index != applied_index + 1:
        raise ApplyGap(f"asked to apply index {index} after {applied_index}")
    transaction.set_applied_index(index)
    return True


class _Rejected(Exception):
    """A rule failed: the entry's result. Raised before anything is written for that entry."""

    def __init__(self, result: str) -> None:
        super().__init__(result)
        self.result = result


@dataclass(slots=True)
class _Chain:
    """What the later legs of a linked chain need from its first transfer: the account that paid."""

    origin: AccountRecord | None = None


@dataclass(slots=True)
class _Decoded:
    entry: SignedEntry
    body: Body
    key: bytes
    position: int  # in the batch: a transfer record points there for the entry's bytes
    signer: InstitutionRecord | None = None


class _Context:
    """The state one batch is applied against."""

    def __init__(
        self, transaction: StateTransaction, index: int, cluster_time_ms: int, cluster_id: str, verify: Verify, receipts: bool,
        decoded: Decoded | None = None,
    ) -> None:
        self.transaction = transaction
        self.index = index
        self.cluster_time_ms = cluster_time_ms
        self.day = phnom_penh_day(cluster_time_ms)
        self.cluster_id = cluster_id
        self.verify = verify
        self.decoded = decoded
        # Nodes always extend the receipt tree; `tonle bench` applies without it to measure what it costs.
        self.receipts = receipts
        self.event_number = 0
        self.cross_border_currency = get_parameter(transaction, parameter_cross_border_currency)
        self.chain: _Chain | None = None  # set while a linked chain applies
        # Read once per batch and written once at its end (`finish`); a chain that aborts restores it.
        self.tree_size = tree.tree_size(transaction)
        self.tree_size_at_start = self.tree_size
        # (entry hash, id) of each transfer recorded, logged once at the end (`finish`); a chain that aborts
        # drops its own.
        self.entry_hashes: list[bytes] = []
        # Signers repeat within a batch; forgotten whenever an entry might change an institution.
        self.institutions: dict[str, InstitutionRecord | None] = {}

    def finish(self) -> None:
        if self.tree_size != self.tree_size_at_start:
            tree.write_size(self.transaction, self.tree_size)
        if self.entry_hashes:
            put_log(self.transaction, self.index, b"".join(self.entry_hashes))

    # Entries and linked chains ------------------------------------------------------------------------

    def apply_entries(self, raws: tuple[bytes, ...]) -> tuple[EntryOutcome, ...]:
        outcomes: list[EntryOutcome] = []
        chain: list[_Decoded | EntryOutcome] = []
        for position, raw in enumerate(raws):
            decoded = self._decode(raw, position)
            linked = isinstance(decoded, _Decoded) and isinstance(decoded.body, Transfer) and bool(decoded.body.flags & _linked)
            if chain or linked:
                chain.append(decoded)
                if not linked:
                    outcomes.extend(self._apply_chain(chain, closed=True))
                    chain = []
            else:
                outcomes.append(self._apply_single(decoded))
        if chain:
            outcomes.extend(self._apply_chain(chain, closed=False))
        return tuple(outcomes)

    def _decode(self, raw: bytes, position: int) -> _Decoded | EntryOutcome:
        if self.decoded is not None:
            remembered = self.decoded(raw)
            if remembered is not None:
                entry, body = remembered
                return _Decoded(entry, body, entry_key(entry, body), position)
        try:
            entry = decode_entry(raw)
            body = entry.body()
        except EntryError as error:
            return EntryOutcome(None, error.code)
        return _Decoded(entry, body, entry_key(entry, body), position)

    def _authenticate(self, decoded: _Decoded) -> None:
        if decoded.entry.cluster_id != self.cluster_id:
            raise _Rejected("wrong_network")
        if not self.verify(decoded.entry):
            raise _Rejected("signature_invalid")
        signer_id = decoded.entry.signer
        if signer_id in self.institutions:
            signer = self.institutions[signer_id]
        else:
            signer = self.institutions[signer_id] = get_institution(self.transaction, signer_id)
        if signer is None:
            raise _Rejected("signer_not_found")
        key = signer.key(decoded.entry.public_key)
        if key is None:
            raise _Rejected("signer_key_not_authorized")
        if not key.current:
            raise _Rejected("signer_key_retired")
        decoded.signer = signer

    def _apply_single(self, decoded: _Decoded | EntryOutcome, previous_leg: int | None = None) -> EntryOutcome:
        if isinstance(decoded, EntryOutcome):
            return decoded
        try:
            self._authenticate(decoded)
        except _Rejected as rejected:
            return EntryOutcome(decoded.key, rejected.result)
        if decoded.entry.kind in transfer_like_kinds:
            return self._transfer_like(decoded, previous_leg)
        try:
            result = self._control(decoded)
        except _Rejected as rejected:
            result = rejected.result
        self.institutions.clear()  # an admitted, suspended or re-keyed institution must be read afresh
        return EntryOutcome(decoded.key, result)

    def _apply_chain(self, members: list[_Decoded | EntryOutcome], closed: bool) -> list[EntryOutcome]:
        """A linked chain applies all or nothing, in a nested transaction committed only if every member
        succeeds (`exists` counts as success: a retried chain changes nothing). Otherwise the first failure
        keeps its result, every other member reports `linked_event_failed` (or `linked_event_chain_open`
        when the batch ended inside the chain), and each failure is pinned under its id."""
        outcomes: list[EntryOutcome] = []
        failed_at: int | None = None
        if closed:
            event_number, tree_size, hashed = self.event_number, self.tree_size, len(self.entry_hashes)
            outer, nested = self.transaction, self.transaction.nested()
            self.transaction = nested
            self.chain = _Chain()
            try:
                previous_amount: int | None = None
                for position, member in enumerate(members):
                    outcome = self._apply_single(member, previous_amount)
                    outcomes.append(outcome)
                    previous_amount = outcome.amount
                    if outcome.result not in (OK, EXISTS):
                        failed_at = position
                        break
            finally:
                self.transaction = outer
                self.chain = None
            if failed_at is None:
                nested.commit()
                return outcomes
            nested.abort()
            self.event_number, self.tree_size = event_number, tree_size
            del self.entry_hashes[hashed:]
            self.institutions.clear()
        final = []
        for position, member in enumerate(members):
            if position == failed_at:
                outcome = outcomes[position]
            else:
                result = LINKED_EVENT_FAILED if closed else LINKED_EVENT_CHAIN_OPEN
                outcome = EntryOutcome(member.key if isinstance(member, _Decoded) else None, result)
            if isinstance(member, _Decoded):
                self._pin_failure(member, outcome.result)
            final.append(outcome)
        return final

    def _pin_failure(self, member: _Decoded, result: str) -> None:
        """Record a chain member's failure under its id: authenticated transfer-like members only, and never
        over an outcome the id already has."""
        if member.entry.kind not in transfer_like_kinds or result in unattributable_results:
            return
        try:
            self._authenticate(member)
        except _Rejected:
            return
        transfer_id = member.body.id  # type: ignore[union-attr]
        if get_transfer(self.transaction, transfer_id) is None:
            self._record(member, result, 0)

    def _record(self, decoded: _Decoded, result: str, amount: int) -> None:
        """Pin an id's outcome, index its references, and add it to the receipt tree as one leaf."""
        body = decoded.body
        leaf_index = self.tree_size
        if self.receipts:
            tree.append_leaf_at(
                self.transaction, encode_leaf_data(decoded.entry.raw, result, self.index, self.cluster_time_ms), leaf_index
            )
            self.tree_size += 1
        record = TransferRecord(
            int(decoded.entry.kind), decoded.entry.raw, result, self.index, self.cluster_time_ms, amount, leaf_index, decoded.position
        )
        put_transfer(self.transaction, body.id, record)  # type: ignore[union-attr]
        self.entry_hashes.append(log_pair(decoded.entry.raw, body.id))  # type: ignore[union-attr]
        if isinstance(body, Transfer) and body.reference:
            put_reference(self.transaction, body.reference, body.id)

    # Transfers, issues and redemptions ---------------------------------------------------------------------

    def _transfer_like(self, decoded: _Decoded, previous_leg: int | None) -> EntryOutcome:
        body = decoded.body
        existing = get_transfer(self.transaction, body.id)  # type: ignore[union-attr]
        if existing is not None:
            if not _same_submission(existing.entry, decoded.entry):
                return EntryOutcome(decoded.key, EXISTS_WITH_DIFFERENT_FIELDS, existing.result)
            if existing.result == OK:
                return EntryOutcome(decoded.key, EXISTS, OK, existing.amount)
            return EntryOutcome(decoded.key, ID_ALREADY_FAILED, existing.result)
        amount = 0
        try:
            self._require_active(decoded.signer)
            if isinstance(body, Transfer):
                amount = self._transfer(body, decoded.signer, previous_leg)
            elif isinstance(body, Issue):
                amount = self._issue(body, decoded.signer)
            else:
                amount = self._redeem(body, decoded.signer)  # type: ignore[arg-type]
            result = OK
        except _Rejected as rejected:
            result = rejected.result
            amount = 0
        self._record(decoded, result, amount)
        return EntryOutcome(decoded.key, result, None, amount if result == OK else None)

    @staticmethod
    def _require_active(signer: InstitutionRecord | None) -> None:
        if signer is None or signer.status is not InstitutionStatus.ACTIVE:
            raise _Rejected("signer_suspended")

    def _resolve(self, name: str, side: str) -> AccountRecord:
        if name[:1] == "+" and alias_pattern.fullmatch(name):  # aliases are E.164: the cheap test first
            account_name = get_alias(self.transaction, name)
            if account_name is None:
                raise _Rejected(f"{side}_alias_not_found")
            name = account_name
        account = get_account(self.transaction, name)
        if account is None:
            raise _Rejected(f"{side}_account_not_found")
        return account

    def _transfer(self, body: Transfer, signer: InstitutionRecord, previous_leg: int | None) -> int:
        flags = body.flags
        if flags & (_post_pending | _void_pending):
            return self._resolve_pending(body, signer, post=bool(flags & _post_pending))
        debit = self._resolve(body.debit_account, "debit")
        credit = self._resolve(body.credit_account, "credit")
        if debit.name == credit.name:
            raise _Rejected("accounts_must_be_different")
        if debit.institution != signer.id:
            raise _Rejected("signer_must_own_debit_account")
        if debit.currency != credit.currency:
            raise _Rejected("accounts_must_have_the_same_currency")
        if body.currency != debit.currency:
            raise _Rejected("transfer_must_have_the_same_currency_as_accounts")
        if self.chain is not None and self.chain.origin is None:
            self.chain.origin = debit
        self._check_cross_border(self.chain.origin if self.chain is not None else debit, credit)
        self._require_usable(debit, "debit")
        self._require_usable(credit, "credit")
        amount = body.amount
        if body.rate_numerator:
            # A currency exchange is a linked chain through an FX provider's accounts (TigerBeetle's
            # recipe): each leg moves one currency, and a leg that declares a rate must move exactly the
            # previous leg's amount times that rate, rounded down, so the rate is what the signer signed.
            if previous_leg is None:
                raise _Rejected("exchange_rate_requires_previous_leg")
            if amount != previous_leg * body.rate_numerator // body.rate_denominator:
                raise _Rejected("exchange_amount_mismatch")
        debit_balance = debit.balance
        credit_balance = credit.balance
        amount = _balanced(amount, flags, debit, debit_balance, credit, credit_balance)
        pending = bool(flags & _pending)
        expires_at_ms = 0
        if pending and body.timeout_seconds:
            expires_at_ms = self.cluster_time_ms + body.timeout_seconds * 1000
            if expires_at_ms > cluster_time_max_ms:
                raise _Rejected("overflows_timeout")
        _check_overflows(debit_balance, credit_balance, amount, pending)
        _check_limits(debit, debit_balance, credit, credit_balance, amount)
        self._check_daily_limit(debit, amount)
        if pending:
            new_debit = Balance(debit_balance.debits_posted, debit_balance.credits_posted,
                                debit_balance.debits_pending + amount, debit_balance.credits_pending)
            new_credit = Balance(credit_balance.debits_posted, credit_balance.credits_posted,
                                 credit_balance.debits_pending, credit_balance.credits_pending + amount)
            put_pending(
                self.transaction,
                body.id,
                PendingRecord(PendingState.PENDING, debit.name, credit.name, amount, body.currency, expires_at_ms, self.day),
            )
            if expires_at_ms:
                self.transaction.put("expiry", expiry_key(expires_at_ms, body.id), b"")
            event = "pending"
        else:
            new_debit = Balance(debit_balance.debits_posted + amount, debit_balance.credits_posted,
                                debit_balance.debits_pending, debit_balance.credits_pending)
            new_credit = Balance(credit_balance.debits_posted, credit_balance.credits_posted + amount,
                                 credit_balance.debits_pending, credit_balance.credits_pending)
            event = "transfer"
        self._move(debit, new_debit, credit, new_credit, body.id, amount, event, outflow=self._outflow_after(debit, amount))
        return amount

    def _check_cross_border(self, origin: AccountRecord, credit: AccountRecord) -> None:
        """Bakong's riel policy as a network rule: money reaches a foreign switch only from a customer
        account in the genesis `cross_border_currency`. `origin` is the debit account of the chain's first
        leg, so the sponsor bank's FX leg into the switch (in another currency) is judged by who paid."""
        if not self.cross_border_currency or credit.kind != AccountKind.SETTLEMENT:
            return
        if origin.kind != AccountKind.CUSTOMER or origin.currency == self.cross_border_currency:
            return
        owner = get_institution(self.transaction, credit.institution)
        if owner is not None and owner.role == str(Role.FOREIGN_SWITCH):
            raise _Rejected("cross_border_currency_not_allowed")

    def _require_usable(self, account: AccountRecord, side: str) -> None:
        if account.closed:
            raise _Rejected(f"{side}_account_closed")
        if account.frozen:
            raise _Rejected(f"{side}_account_frozen")

    def _check_daily_limit(self, debit: AccountRecord, amount: int) -> None:
        limit = kyc_daily_outflow_limits.get(debit.tier, {}).get(debit.currency)
        if limit is not None and outflow_on(debit, self.day) + amount > limit:
            raise _Rejected("exceeds_daily_limit")

    def _outflow_after(self, debit: AccountRecord, amount: int, day: int | None = None, release: bool = False) -> tuple[int, int]:
        """The debit account's (day, outflow) after debiting (or releasing) `amount` counted on `day`."""
        unchanged = (debit.outflow_day, debit.outflow)
        if debit.currency not in kyc_daily_outflow_limits.get(debit.tier, {}) or amount == 0:
            return unchanged
        day = self.day if day is None else day
        if release:
            # A reservation made on an earlier day no longer counts against today: nothing to give back.
            if day != self.day or debit.outflow_day != day:
                return unchanged
            return day, max(0, debit.outflow - amount)
        return day, outflow_on(debit, day) + amount

    def _move(
        self, debit: AccountRecord, new_debit: Balance, credit: AccountRecord, new_credit: Balance,
        transfer_id: bytes, amount: int, event: str, outflow: tuple[int, int] | None = None,
    ) -> None:
        outflow_day, outflow_amount = outflow if outflow is not None else (debit.outflow_day, debit.outflow)
        debit_key = self._next_history_key()
        credit_key = self._next_history_key()
        put_account(self.transaction, debit.moved(new_debit, outflow_day, outflow_amount, debit_key))
        put_account(self.transaction, credit.moved(new_credit, credit.outflow_day, credit.outflow, credit_key))
        put_history(self.transaction, debit_key, debit, HistoryEvent(self.cluster_time_ms, self.index, event, transfer_id, -amount, new_debit))
        put_history(self.transaction, credit_key, credit, HistoryEvent(self.cluster_time_ms, self.index, event, transfer_id, amount, new_credit))

    def _next_history_key(self) -> bytes:
        self.event_number += 1
        return history_key(self.index, self.event_number)

    def _resolve_pending(self, body: Transfer, signer: InstitutionRecord, *, post: bool) -> int:
        pending = get_pending(self.transaction, body.pending_id)
        if pending is None:
            original = get_transfer(self.transaction, body.pending_id)
            raise _Rejected("pending_transfer_not_pending" if original is not None else "pending_transfer_not_found")
        if pending.state is PendingState.POSTED:
            raise _Rejected("pending_transfer_already_posted")
        if pending.state is PendingState.VOIDED:
            raise _Rejected("pending_transfer_already_voided")
        if pending.state is PendingState.EXPIRED or (pending.expires_at_ms and pending.expires_at_ms <= self.cluster_time_ms):
            raise _Rejected("pending_transfer_expired")
        debit = self._stored_account(pending.debit_account)
        credit = self._stored_account(pending.credit_account)
        if body.debit_account and self._resolve(body.debit_account, "debit").name != debit.name:
            raise _Rejected("pending_transfer_has_different_debit_account")
        if body.credit_account and self._resolve(body.credit_account, "credit").name != credit.name:
            raise _Rejected("pending_transfer_has_different_credit_account")
        if body.currency and body.currency != pending.currency:
            raise _Rejected("pending_transfer_has_different_currency")
        if debit.institution != signer.id:
            raise _Rejected("signer_must_own_debit_account")
        amount = pending.amount if body.amount == 0 else body.amount
        if amount > pending.amount:
            raise _Rejected("exceeds_pending_transfer_amount")
        if not post and amount != pending.amount:
            raise _Rejected("pending_transfer_has_different_amount")
        if post:
            self._require_usable(debit, "debit")
            self._require_usable(credit, "credit")
        debit_balance = debit.balance
        credit_balance = credit.balance
        posted = amount if post else 0
        if debit_balance.debits_posted + posted > balance_counter_max:
            raise _Rejected("overflows_debits_posted")
        if credit_balance.credits_posted + posted > balance_counter_max:
            raise _Rejected("overflows_credits_posted")
        new_debit = Balance(
            debit_balance.debits_posted + posted, debit_balance.credits_posted,
            debit_balance.debits_pending - pending.amount, debit_balance.credits_pending,
        )
        new_credit = Balance(
            credit_balance.debits_posted, credit_balance.credits_posted + posted,
            credit_balance.debits_pending, credit_balance.credits_pending - pending.amount,
        )
        self._finish_pending(body.pending_id, pending, PendingState.POSTED if post else PendingState.VOIDED, posted)
        released = self._outflow_after(debit, pending.amount - posted, pending.created_day, release=True)
        self._move(debit, new_debit, credit, new_credit, body.pending_id, posted, "post" if post else "void", outflow=released)
        return posted

    def _finish_pending(self, transfer_id: bytes, pending: PendingRecord, state: PendingState, posted: int) -> None:
        put_pending(self.transaction, transfer_id, replace(pending, state=state, resolved_index=self.index, posted_amount=posted))
        if pending.expires_at_ms:
            self.transaction.delete("expiry", expiry_key(pending.expires_at_ms, transfer_id))

    def _stored_account(self, name: str) -> AccountRecord:
        account = get_account(self.transaction, name)
        if account is None:
            raise StorageCorrupted(f"pending transfer names account {name!r}, which does not exist")
        return account

    def expire_pending(self) -> tuple[bytes, ...]:
        """Release every pending transfer whose timeout has passed, before any entry of the batch, so expiry
        happens at the same log position on every node."""
        expired = []
        for key, transfer_id in due_expiries(self.transaction, self.cluster_time_ms):
            pending = get_pending(self.transaction, transfer_id)
            self.transaction.delete("expiry", key)
            if pending is None or pending.state is not PendingState.PENDING:
                continue
            debit = self._stored_account(pending.debit_account)
            credit = self._stored_account(pending.credit_account)
            debit_balance = debit.balance
            credit_balance = credit.balance
            new_debit = replace(debit_balance, debits_pending=debit_balance.debits_pending - pending.amount)
            new_credit = replace(credit_balance, credits_pending=credit_balance.credits_pending - pending.amount)
            put_pending(self.transaction, transfer_id, replace(pending, state=PendingState.EXPIRED, resolved_index=self.index))
            released = self._outflow_after(debit, pending.amount, pending.created_day, release=True)
            self._move(debit, new_debit, credit, new_credit, transfer_id, 0, "expire", outflow=released)
            expired.append(transfer_id)
        return tuple(expired)

    def _issue(self, body: Issue, signer: InstitutionRecord) -> int:
        if signer.role != str(Role.CENTRAL_BANK):
            raise _Rejected("signer_must_be_central_bank")
        credit = self._resolve(body.credit_account, "credit")
        if credit.kind != AccountKind.SETTLEMENT:
            raise _Rejected("credit_account_must_be_settlement")
        if body.currency != credit.currency:
            raise _Rejected("transfer_must_have_the_same_currency_as_accounts")
        debit = get_account(self.transaction, issuance_account(signer.id, body.currency))
        if debit is None:
            raise _Rejected("currency_not_found")
        self._require_usable(credit, "credit")
        return self._post_plain(debit, credit, body.id, body.amount, "issue")

    def _redeem(self, body: Redeem, signer: InstitutionRecord) -> int:
        if signer.role != str(Role.CENTRAL_BANK):
            raise _Rejected("signer_must_be_central_bank")
        debit = self._resolve(body.debit_account, "debit")
        if debit.kind != AccountKind.SETTLEMENT:
            raise _Rejected("debit_account_must_be_settlement")
        if body.currency != debit.currency:
            raise _Rejected("transfer_must_have_the_same_currency_as_accounts")
        credit = get_account(self.transaction, issuance_account(signer.id, body.currency))
        if credit is None:
            raise _Rejected("currency_not_found")
        self._require_usable(debit, "debit")
        return self._post_plain(debit, credit, body.id, body.amount, "redeem")

    def _post_plain(self, debit: AccountRecord, credit: AccountRecord, transfer_id: bytes, amount: int, event: str) -> int:
        debit_balance = debit.balance
        credit_balance = credit.balance
        _check_overflows(debit_balance, credit_balance, amount, pending=False)
        _check_limits(debit, debit_balance, credit, credit_balance, amount)
        new_debit = replace(debit_balance, debits_posted=debit_balance.debits_posted + amount)
        new_credit = replace(credit_balance, credits_posted=credit_balance.credits_posted + amount)
        self._move(debit, new_debit, credit, new_credit, transfer_id, amount, event)
        return amount

    # Accounts, institutions, aliases, tiers and nodes -------------------------------------------------------

    def _control(self, decoded: _Decoded) -> str:
        body = decoded.body
        signer = decoded.signer
        assert signer is not None  # set by _authenticate, which every caller runs first
        if isinstance(body, OpenAccount):
            return self._open_account(body, signer)
        self._require_active(signer)
        central_bank = signer.role == str(Role.CENTRAL_BANK)
        if isinstance(body, CloseAccount):
            account = self._owned(body.account, signer)
            if account.closed:
                return "account_already_closed"
            balance = account.balance
            if balance.net != 0 or balance.debits_pending or balance.credits_pending:
                return "account_balance_not_zero"
            if aliases_of(self.transaction, account.name):
                return "account_has_aliases"
            put_account(self.transaction, with_status(account, account.status | AccountStatus.CLOSED))
            return OK
        if isinstance(body, FreezeAccount | UnfreezeAccount):
            if not central_bank:
                return "signer_must_be_central_bank"
            account = get_account(self.transaction, body.account)
            if account is None:
                return "account_not_found"
            if isinstance(body, FreezeAccount):
                if account.frozen:
                    return "account_already_frozen"
                put_account(self.transaction, with_status(account, account.status | AccountStatus.FROZEN))
            else:
                if not account.frozen:
                    return "account_not_frozen"
                put_account(self.transaction, with_status(account, account.status & ~AccountStatus.FROZEN))
            return OK
        if isinstance(body, AdmitInstitution):
            return self._admit(body, central_bank)
        if isinstance(body, SuspendInstitution | ReinstateInstitution):
            if not central_bank:
                return "signer_must_be_central_bank"
            institution = get_institution(self.transaction, body.institution)
            if institution is None:
                return "institution_not_found"
            if institution.role == str(Role.CENTRAL_BANK):
                return "institution_is_central_bank"
            suspend = isinstance(body, SuspendInstitution)
            if suspend and institution.status is InstitutionStatus.SUSPENDED:
                return "institution_already_suspended"
            if not suspend and institution.status is InstitutionStatus.ACTIVE:
                return "institution_not_suspended"
            status = InstitutionStatus.SUSPENDED if suspend else InstitutionStatus.ACTIVE
            put_institution(self.transaction, replace(institution, status=status))
            return OK
        if isinstance(body, RotateKey):
            if signer.id != body.institution and not central_bank:
                return "signer_must_be_institution_or_central_bank"
            institution = get_institution(self.transaction, body.institution)
            if institution is None:
                return "institution_not_found"
            if self._key_in_use(body.public_key):
                return "public_key_in_use"
            keys = tuple(key if not key.current else replace(key, retired_index=self.index) for key in institution.keys)
            put_institution(self.transaction, replace(institution, keys=(*keys, KeyRecord(body.public_key, self.index))))
            return OK
        if isinstance(body, RegisterAlias):
            account = self._owned(body.account, signer)
            if account.closed:
                return "account_closed"
            current = get_alias(self.transaction, body.alias)
            if current is not None:
                return EXISTS if current == account.name else "alias_taken"
            put_alias(self.transaction, body.alias, account.name)
            return OK
        if isinstance(body, UnregisterAlias):
            current = get_alias(self.transaction, body.alias)
            if current is None:
                return "alias_not_found"
            self._owned(current, signer)
            self.transaction.delete("aliases", body.alias.encode())
            return OK
        if isinstance(body, SetKycTier):
            account = self._owned(body.account, signer)
            put_account(self.transaction, replace(account, tier=body.tier))
            return OK
        if isinstance(body, AdmitNode):
            return self._admit_node(body, central_bank)
        return "unknown_kind"

    def _owned(self, name: str, signer: InstitutionRecord) -> AccountRecord:
        account = get_account(self.transaction, name)
        if account is None:
            raise _Rejected("account_not_found")
        if account.institution != signer.id:
            raise _Rejected("signer_must_own_account")
        return account

    def _open_account(self, body: OpenAccount, signer: InstitutionRecord) -> str:
        existing = get_account(self.transaction, body.account)
        owner = body.account.rpartition("@")[2]
        if existing is not None:
            same = (
                existing.currency == body.currency and existing.institution == owner and existing.kind == AccountKind.CUSTOMER
                and existing.flags == body.flags and existing.code == body.code and existing.user_data == body.user_data
            )
            return EXISTS if same else EXISTS_WITH_DIFFERENT_FIELDS
        self._require_active(signer)
        if owner != signer.id:
            return "signer_must_own_account"
        if body.account.startswith(reserved_account_prefixes):
            return "account_name_reserved"
        if get_currency(self.transaction, body.currency) is None:
            return "currency_not_found"
        _open(self.transaction, body.account, body.currency, owner, AccountKind.CUSTOMER, AccountFlags(body.flags),
              body.tier, self.index, body.code, body.user_data)
        return OK

    def _key_in_use(self, public_key: bytes) -> bool:
        for institution in list_institutions(self.transaction):
            if institution.key(public_key) is not None:
                return True
        return any(node.public_key == public_key for node in list_nodes(self.transaction))

    def _admit(self, body: AdmitInstitution, central_bank: bool) -> str:
        if not central_bank:
            return "signer_must_be_central_bank"
        existing = get_institution(self.transaction, body.institution)
        if existing is not None:
            same = existing.name == body.name and existing.role == body.role and existing.key(body.public_key) is not None
            return EXISTS if same else EXISTS_WITH_DIFFERENT_FIELDS
        if self._key_in_use(body.public_key):
            return "public_key_in_use"
        record = InstitutionRecord(body.institution, body.name, body.role, InstitutionStatus.ACTIVE, (KeyRecord(body.public_key, self.index),))
        _admit_institution(self.transaction, record, [currency.code for currency in list_currencies(self.transaction)], self.index)
        return OK

    def _admit_node(self, body: AdmitNode, central_bank: bool) -> str:
        if not central_bank:
            return "signer_must_be_central_bank"
        existing = get_node(self.transaction, body.name)
        if existing is not None:
            same = (existing.institution, existing.public_key, existing.raft_address, existing.client_address, existing.admin_address) == (
                body.institution, body.public_key, body.raft_address, body.client_address, body.admin_address
            )
            return EXISTS if same else EXISTS_WITH_DIFFERENT_FIELDS
        if get_institution(self.transaction, body.institution) is None:
            return "institution_not_found"
        if self._key_in_use(body.public_key):
            return "public_key_in_use"
        put_node(self.transaction, NodeRecord(body.name, "institution", body.institution, body.public_key, body.raft_address,
                                              body.client_address, body.admin_address, self.index))
        return OK


def _balanced(amount: int, flags: int, debit: AccountRecord, debit_balance: Balance,
              credit: AccountRecord, credit_balance: Balance) -> int:
    """A balancing transfer moves at most `amount`: as much as the limits of its accounts allow."""
    if flags & _balancing_debit and debit.flags & _debits_limited:
        available = debit_balance.credits_posted - debit_balance.debits_posted - debit_balance.debits_pending
        amount = max(0, min(amount, available))
    if flags & _balancing_credit and credit.flags & _credits_limited:
        available = credit_balance.debits_posted - credit_balance.credits_posted - credit_balance.credits_pending
        amount = max(0, min(amount, available))
    return amount


def _check_overflows(debit_balance: Balance, credit_balance: Balance, amount: int, pending: bool) -> None:
    if pending:
        if debit_balance.debits_pending + amount > balance_counter_max:
            raise _Rejected("overflows_debits_pending")
        if credit_balance.credits_pending + amount > balance_counter_max:
            raise _Rejected("overflows_credits_pending")
    if debit_balance.debits_posted + debit_balance.debits_pending + amount > balance_counter_max:
        raise _Rejected("overflows_debits")
    if credit_balance.credits_posted + credit_balance.credits_pending + amount > balance_counter_max:
        raise _Rejected("overflows_credits")


def _check_limits(debit: AccountRecord, debit_balance: Balance, credit: AccountRecord, credit_balance: Balance, amount: int) -> None:
    if debit.flags & _debits_limited:
        if debit_balance.debits_pending + debit_balance.debits_posted + amount > debit_balance.credits_posted:
            raise _Rejected("exceeds_credits")
    if credit.flags & _credits_limited:
        if credit_balance.credits_pending + credit_balance.credits_posted + amount > credit_balance.debits_posted:
            raise _Rejected("exceeds_debits")


def _same_submission(stored_raw: bytes, entry: SignedEntry) -> bool:
    """The same body from the same signer (a re-signature with another key of the signer is the same)."""
    if stored_raw == entry.raw:
        return True
    stored = decode_entry(stored_raw)
    return stored.body_bytes == entry.body_bytes and stored.signer == entry.signer
