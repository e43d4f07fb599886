"""The node process: storage, Raft, the proposer, the client API and the admin listener, on one event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lmdb

from config.keys import load_signing_key
from config.schema import Address, Genesis, NodeConfig, NodeRole, NodeSpec, drop_dead_copies_auto
from consensus.batch import Batch, Checkpoint, encode_batch
from consensus.codec import pack
from consensus.entries import Body, EntryError, SignedEntry, Transfer, TransferFlags, decode_entry, entry_key
from consensus.proposer import Proposer, ProposerLimits
from consensus.raft.adapter import RaftEvents, RaftNode
from node.failpoints import enabled_failpoints
from node.heads import HeadSignatures
from node.indexer import EntryHashIndexer
from node.memory_limit import own_memory_limit_bytes
from node.metrics import NodeMetrics
from node.page_aging import DeadCopyDropper, PageAger, PageAgingUnavailable
from node.protocol import (
    ERROR_BUSY,
    ERROR_NO_LEADER,
    STATUS_APPLIED,
    STATUS_REJECTED,
    STATUS_UNKNOWN,
    QueryRequest,
    SubmitRequest,
)
from node.verifier import SignatureVerifier
from consensus.receipts import encode_receipt_binary
from storage import queries, tree
from storage.records import earliest_expiry_ms, read_accounts_ahead
from storage.rules import AppliedBatch, accounts_read_by, head_window_ms, initialize
from storage.entry_hashes import EntryHashIndex
from storage.free_pages import FreePagesUnreadable
from storage.state import StateTransaction, StorageCorrupted, clear_stale_readers, open_store, schema_version

logger = logging.getLogger("tonle.node")

# Bounds on what one node holds in memory on behalf of clients.
proposals_in_flight_max = 32
outcome_waiters_max = 200_000
# A batch carries the state hash at the leader's last applied index, which is at most `proposals_in_flight_max`
# batches (and an election's no-ops) before the batch itself: every replica compares it when it applies the
# batch, so it must still know its own hash at that index. 4,096 entries is far past that, and costs about
# 0.8 MiB; 100,000 (before) held some 19 MiB once a node had applied as many entries.
state_hash_history_entries_max = 4_096
apply_lag_entries_max = 64
# When no batch has carried a checkpoint for this long, the leader proposes an empty batch that does, so
# replicas keep comparing state hashes while the network is idle.
checkpoint_interval_seconds = 5.0
# How often housekeeping asks LMDB for reader slots left by dead processes (a scan of the lock table, one
# kill(pid, 0) per slot): a stale slot costs only file growth, so seconds late is fine.
stale_reader_check_interval_seconds = 10.0
fatal_exit_code = 70
forward_timeout_seconds = 5.0
_linked_flag = int(TransferFlags.LINKED)  # a plain int: enum operations per entry are slow


def partial_batch_may_go(
    proposals_in_flight: int, due_microseconds: int | None, now_microseconds: int, partial_batches_in_flight_max: int
) -> bool:
    """Group commit: whether a batch that is not full is proposed now. Alone it goes at once; otherwise only
    once its gathering delay has passed and while fewer than `partial_batches_in_flight_max` proposals await
    their apply on the leader (`[proposer]` setting; full batches are not held back). Held back, its entries
    keep gathering until one is applied: under load batches grow by themselves, so each node pays its
    per-batch costs (fsyncs, a Raft message, an LMDB commit: about 10 ms of CPU per batch in a local network
    of three, README, Performance) for many transfers instead of a few.

    Measured with the apply on its own thread (p99 at 50 % of peak, `tonle bench`): 2 gave 38-57 ms, 3 gave
    16-51 ms, 4 gave 80 ms on a machine where that load left CPU to spare; on one where it did not (a fixed
    1,000 transfers/s, three alternating rounds), 1 gave 90-135 ms, 2 gave 104-147 and 3 gave 154-335 ms:
    batches in flight together share the CPU, and when it is short each takes that much longer. On that machine,
    1 against 3 side by side (`scripts/compare --rate`, both networks loaded at once, ten rounds at 150, 350 and
    550 transfers/s each): lower p50 in every round, lower p99 in seven (116 against 186 ms on average at 350/s,
    about half of what each network could commit), 6-7 % less CPU per transfer; so 1 is the default."""
    if proposals_in_flight == 0:
        return True
    if proposals_in_flight >= partial_batches_in_flight_max:
        return False
    return due_microseconds is None or now_microseconds >= due_microseconds


def dead_copies_are_dropped(setting: bool | str, memory_limit_bytes: Callable[[], int | None]) -> bool:
    """`[storage] drop_dead_copies`: true or false, or "auto": while the node runs under a memory limit, read
    once at start. Unconfined, the kernel takes page cache back from whatever needs memory, so dropping the
    copies at once only costs CPU: at a fixed 1,000 transfers/s on a 1,000-account network, p99 went from
    213-237 ms with it to 146-170 ms without (README, Performance)."""
    if setting != drop_dead_copies_auto:
        return setting is True
    limit = memory_limit_bytes()
    if limit is None:
        logger.info("dead page copies are left to the kernel: this node runs under no memory limit")
        return False
    logger.info("dead page copies are dropped after each commit: this node runs under a %d-byte memory limit", limit)
    return True


class StartupError(RuntimeError):
    """The node cannot start with this configuration or data directory; the message says why."""


@dataclass(frozen=True, slots=True)
class _Candidate:
    """An entry of a submit request that decoded: where it was, what it is, what its outcome is keyed by."""

    position: int
    entry: SignedEntry
    key: bytes
    linked: bool


class _RequestWaiter:
    """The outcomes one submit request awaits: one future per request, not one per entry (at a few thousand
    entries a second, a future, a callback and a wait set per entry cost the event loop more than the rest
    of intake)."""

    __slots__ = ("results", "remaining", "future")

    def __init__(self, results: list[dict[str, Any] | None], remaining: int, future: asyncio.Future[None]) -> None:
        self.results = results
        self.remaining = remaining
        self.future = future

    def resolve(self, position: int, reply: dict[str, Any]) -> None:
        if self.results[position] is not None:
            return
        self.results[position] = reply
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(None)


@dataclass(slots=True)
class _Proposal:
    entries: list[bytes]
    proposed_at: float


class _Events(RaftEvents):
    """Raft callbacks (tick thread) forwarded to the node; only thread-safe work happens here."""

    def __init__(self, node: LedgerNode) -> None:
        self._node = node

    def applied(self, batches: list[AppliedBatch], transaction_seconds: float, commit_seconds: float) -> None:
        node = self._node
        node.metrics.apply.observe(transaction_seconds)
        node.metrics.state_commit.observe(commit_seconds)
        node.metrics.apply_batches.observe(len(batches))
        for batch in batches:
            node.metrics.batch_entries.observe(len(batch.outcomes))
            for result, count in Counter(outcome.result for outcome in batch.outcomes).items():
                node.metrics.entries_applied.labels(result).inc(count)
        if not batches:
            return
        node.metrics.applied_index.set(batches[-1].index)
        node.indexer.wake()
        for batch in batches:
            try:
                node.loop.call_soon_threadsafe(node.on_applied, batch)
            except RuntimeError:
                # A clean stop closes the event loop while the apply thread may still apply a batch: the batch is
                # durable, only the clients' replies are gone with the loop. Anything else is a real failure.
                if not node.loop.is_closed():
                    raise
                return

    def before_apply(self, batch_bytes: bytes) -> None:
        self._node.verifier.wait_for_batch(batch_bytes)

    def after_commit(self) -> None:
        self._node.drop_dead_copies()

    def before_commit(self, transaction: StateTransaction, batch: AppliedBatch) -> None:
        if batch.head is not None:
            self._node.heads.sign_in_apply(transaction, batch.head)
        if "apply_extra_record" in self._node.failpoints:
            self._node.failpoints = self._node.failpoints - {"apply_extra_record"}
            logger.warning("failpoint apply_extra_record: writing a record no other node has at index %d", batch.index)
            transaction.put("currencies", b"ZZZ", pack([0]))

    def prefetch(self, batch_bytes: bytes) -> None:
        self._node.verifier.prefetch(batch_bytes)

    def snapshot_written(self, seconds: float, file_bytes: int) -> None:
        self._node.metrics.snapshot_write.observe(seconds)
        self._node.metrics.snapshot_file_bytes.set(file_bytes)

    def snapshot_installed(self, seconds: float) -> None:
        self._node.metrics.snapshot_install.observe(seconds)

    def role_changed(self, old_role: str, new_role: str) -> None:
        logger.info("raft role %s -> %s", old_role, new_role, extra={"event": "role_changed"})

    def leader_changed(self, old_leader: str | None, new_leader: str | None, term: int) -> None:
        if new_leader is not None:
            self._node.metrics.leader_changes.inc()
        logger.info("leader %s -> %s", old_leader, new_leader, extra={"event": "leader_changed", "term": term})

    def fatal(self, message: str) -> None:
        _stop_fatally(message)


def _stop_fatally(message: str) -> None:
    logger.critical("stopping the node: %s", message)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(fatal_exit_code)


class StateHashHistory:
    """This replica's state hash after each of its newest applied Raft entries, to compare with the
    checkpoints batches carry; older entries are forgotten (a checkpoint that old is not compared)."""

    def __init__(self, entries_max: int) -> None:
        if entries_max < 1:
            raise ValueError(f"entries_max must be positive, not {entries_max}")
        self.entries_max = entries_max
        self._hashes: OrderedDict[int, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hashes)

    def record(self, index: int, state_hash: bytes) -> None:
        self._hashes[index] = state_hash
        while len(self._hashes) > self.entries_max:
            self._hashes.popitem(last=False)

    def get(self, index: int) -> bytes | None:
        return self._hashes.get(index)


class LedgerNode:
    """One Tonle node. Construct, then `await run(stop)` on the event loop of the main thread."""

    def __init__(self, config: NodeConfig, genesis: Genesis) -> None:
        self.config = config
        self.genesis = genesis
        self.node_key = load_signing_key(config.key_file)
        self.spec = self._own_spec(config, genesis)
        if bytes(self.node_key.verify_key) != self.spec.public_key:
            raise StartupError(
                f"key file {config.key_file} does not hold the key the genesis names for node {self.spec.name}"
            )
        self.failpoints = enabled_failpoints()
        self.metrics = NodeMetrics(self.spec.name, str(self.spec.role))
        self.store = open_store(config.data_dir, map_size_bytes=config.storage.map_size_bytes, sync=config.storage.sync)
        self._initialize_state()
        # Derived from the state's hash log and rebuilt from it when missing, so it lives beside the state.
        self.entry_hashes = EntryHashIndex(
            config.data_dir / "entry_hashes", map_size_bytes=config.storage.map_size_bytes, sync=config.storage.sync
        )
        self.indexer = EntryHashIndexer(
            self.entry_hashes,
            self.store,
            indexed=self._on_indexed,
            failed=self.metrics.entry_hash_index_errors.inc,
            fatal=_stop_fatally,
        )
        self.verifier = SignatureVerifier(
            threads=max(2, os.cpu_count() or 2),
            count_verified=self.metrics.signatures_verified.inc,
            read_ahead=self._read_accounts_ahead if config.storage.read_ahead else None,
            count_dropped_read_ahead=self.metrics.read_aheads_dropped.inc,
        )
        self.proposer = Proposer(
            ProposerLimits(
                batch_bytes_max=config.proposer.batch_bytes_max,
                queue_entries_max=config.proposer.queue_entries_max,
                batch_delay_microseconds=config.proposer.batch_delay_microseconds,
            )
        )
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by run()
        self.raft: RaftNode = None  # type: ignore[assignment]
        # Outcome key -> the requests awaiting it, the entry's position in each, and the entry's bytes: one
        # transfer id sent with two bodies has two outcomes, and each request must get its own.
        self._waiters: dict[bytes, list[tuple[_RequestWaiter, int, bytes]]] = {}
        self._waiter_count = 0
        self.metrics.outcomes_awaited.set_function(lambda: self._waiter_count)  # read when scraped
        self._proposals: dict[int, _Proposal] = {}
        self._proposal_counter = 0
        self._flush_handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self._state_hash_history = StateHashHistory(state_hash_history_entries_max)
        self._last_applied: AppliedBatch | None = None
        self._diverged = False
        self._forwarder: Forwarder | None = None
        self._last_checkpoint_index = 0
        self._last_proposal_time = 0.0
        self._leaves_without_head = False
        # Checked at the first housekeeping: a slot a killed reader left while this node was down counts too.
        self._stale_readers_checked = float("-inf")
        self.heads = HeadSignatures(self)
        self.page_ager: PageAger | None = None
        self.dead_copies: DeadCopyDropper | None = None
        if dead_copies_are_dropped(config.storage.drop_dead_copies, own_memory_limit_bytes):
            try:
                self.dead_copies = DeadCopyDropper(self.store)
            except PageAgingUnavailable as error:
                logger.warning("the state's dead page copies stay in memory: %s", error)

    # Start-up -------------------------------------------------------------------------------------------

    def _own_spec(self, config: NodeConfig, genesis: Genesis) -> NodeSpec:
        """From the genesis, or, for an institution node admitted later, from the [join] section."""
        if not config.join.requested:
            return genesis.node(config.name)
        join = config.join
        return NodeSpec(
            name=config.name,
            role=NodeRole.INSTITUTION,
            institution=join.institution,
            raft_address=Address.parse(join.raft_address),
            client_address=Address.parse(join.client_address),
            admin_address=Address.parse(join.admin_address),
            public_key=bytes(self.node_key.verify_key),
        )

    def _initialize_state(self) -> None:
        with self.store.write() as transaction:
            identity = transaction.identity()
            if identity is None:
                initialize(transaction, self.genesis)
                logger.info("initialised state for network %s", self.genesis.cluster_id)
                return
            cluster_id, digest = identity
            stored_version = transaction.stored_schema_version()
            if stored_version != schema_version:
                raise StartupError(
                    f"data directory {self.config.data_dir} holds a state in layout version {stored_version}; this "
                    f"node reads version {schema_version}: start it with an empty data directory so it catches up from "
                    "its peers (a snapshot and the log)"
                )
            if cluster_id != self.genesis.cluster_id or digest != self.genesis.digest:
                raise StartupError(
                    f"data directory {self.config.data_dir} belongs to network {cluster_id!r} with another "
                    "genesis; refusing to start (use a fresh data directory for this network)"
                )

    def start_raft(self) -> None:
        """Construct the Raft engine. Must run in the thread that lives as long as the node (pysyncobj's
        tick thread stops when its constructing thread ends)."""
        from node.observers import JournalMetrics, TransportMetrics

        self.raft = RaftNode(
            genesis=self.genesis,
            node=self.spec,
            node_key=self.node_key,
            data_dir=self.config.data_dir,
            raft_config=self.config.raft,
            store=self.store,
            verify=self.verifier.is_valid,
            decoded=self.verifier.take_decoded,
            events=_Events(self),
            transport_observer=TransportMetrics(self.metrics),
            journal_observer=JournalMetrics(self.metrics),
        )
        self.indexer.start()
        if self.config.storage.page_aging_interval_ms > 0:
            self.page_ager = PageAger(self.store.path / "data.mdb", self.config.storage.page_aging_interval_ms / 1000)
            self.page_ager.start()

    def close(self) -> None:
        if self.raft is not None:
            self.raft.destroy()
        self.heads.close()
        if self.page_ager is not None:
            self.page_ager.close()
        if self.dead_copies is not None:
            self.dead_copies.close()
        self.verifier.close()
        self.indexer.close()
        self.entry_hashes.close()
        self.store.close()

    def drop_dead_copies(self) -> None:
        """Apply thread, just after a commit: drop the pages it freed from memory (node/page_aging.py)."""
        if self.dead_copies is None:
            return
        try:
            dropped = self.dead_copies.drop_newest()
        except (FreePagesUnreadable, PageAgingUnavailable, OSError) as error:
            # Only memory efficiency is lost: the node goes on, its dead copies left to the page aging.
            logger.warning("stopped dropping the state's dead page copies: %s", error)
            self.dead_copies.close()
            self.dead_copies = None
            return
        self.metrics.dead_pages_dropped.inc(dropped)

    def _read_accounts_ahead(self, bodies: list[Body]) -> None:
        """Read-ahead thread: bring the pages of the accounts these entries name into memory, so that the
        apply, the one thread every transfer passes through, finds them there instead of waiting for the
        disk (a state larger than the memory the node is given; README, "Memory under a limit")."""
        names = [name for body in bodies for name in accounts_read_by(body)]
        if not names:
            return
        try:
            with self.store.read() as transaction:
                read_accounts_ahead(transaction, names)
        except StorageCorrupted:
            pass  # the apply reads the same record, checks it, and stops the node with the cause
        self.metrics.accounts_read_ahead.inc(len(names))

    def _on_indexed(self, pairs: int, indexed_through: int, runs: int, merged: int) -> None:
        """Indexer thread: prometheus-client metrics are thread-safe."""
        self.metrics.entry_hash_index_entries.inc(pairs)
        self.metrics.entry_hash_index_merged.inc(merged)
        self.metrics.entry_hash_index_index.set(indexed_through)
        self.metrics.entry_hash_index_runs.set(runs)

    # Applied outcomes (event loop) ------------------------------------------------------------------------

    def on_applied(self, batch: AppliedBatch) -> None:
        self._last_applied = batch
        if batch.head is not None:
            self.heads.on_applied(batch.head)
            self._leaves_without_head = False
        elif batch.outcomes:
            self._leaves_without_head = True
        self._state_hash_history.record(batch.index, batch.state_hash)
        self._check_checkpoint(batch.checkpoint)
        if self._waiters:
            self._resolve_outcomes(batch)

    def _resolve_outcomes(self, batch: AppliedBatch) -> None:
        for raw, outcome in zip(batch.entries, batch.outcomes, strict=True):
            if outcome.key is None:
                continue
            waiting = self._waiters.get(outcome.key)
            if not waiting:
                continue
            registrations = [registration for registration in waiting if registration[2] == raw]
            kept = [registration for registration in waiting if registration[2] != raw]
            if kept:
                self._waiters[outcome.key] = kept
            else:
                del self._waiters[outcome.key]
            if not registrations:
                continue
            reply = {
                "status": STATUS_APPLIED,
                "result": outcome.result,
                "index": batch.index,
                "original": outcome.original_result,
                "amount": outcome.amount,
            }
            self._waiter_count -= len(registrations)
            for waiter, position, _raw in registrations:
                waiter.resolve(position, reply)

    def _check_checkpoint(self, checkpoint: Checkpoint | None) -> None:
        if checkpoint is None:
            return
        own = self._state_hash_history.get(checkpoint.index)
        if own is None or own == checkpoint.state_hash:
            return
        self.metrics.state_divergence.inc()
        self.metrics.state_diverged.set(1)
        self._diverged = True
        logger.critical(
            "state divergence at index %d: leader has %s, this node has %s",
            checkpoint.index,
            checkpoint.state_hash.hex(),
            own.hex(),
            extra={"event": "state_divergence", "index": checkpoint.index},
        )

    @property
    def diverged(self) -> bool:
        return self._diverged

    # Intake (event loop) -----------------------------------------------------------------------------------

    async def submit(self, request: SubmitRequest) -> list[dict[str, Any]]:
        """Check, verify and route a client's entries; wait for their outcomes (unless forwarded)."""
        results: list[dict[str, Any] | None] = [None] * len(request.entries)
        candidates: list[_Candidate] = []
        bodies: list[Body] = []
        for position, raw in enumerate(request.entries):
            try:
                entry = decode_entry(raw)
                body = entry.body()
            except EntryError as error:
                results[position] = self._rejected(error.code, error.message)
                continue
            if entry.cluster_id != self.genesis.cluster_id:
                results[position] = self._rejected(
                    "wrong_network", f"entry is for network {entry.cluster_id!r}, this is {self.genesis.cluster_id!r}"
                )
                continue
            linked = isinstance(body, Transfer) and bool(body.flags & _linked_flag)
            candidates.append(_Candidate(position, entry, entry_key(entry, body), linked))
            bodies.append(body)
        if candidates:
            self.verifier.read_ahead(bodies)
            started = time.perf_counter()
            entries = [candidate.entry for candidate in candidates]
            validity = self.verifier.verify_now_if_idle(entries)
            if validity is None:
                validity = []
                for future in self.verifier.verify_many(entries):
                    validity.extend(await asyncio.wrap_future(future))
            self.metrics.signature_verification.observe(time.perf_counter() - started)
            decoded = []
            for candidate, body, valid in zip(candidates, bodies, validity, strict=True):
                if valid:
                    decoded.append((candidate.entry, body))
                else:
                    results[candidate.position] = self._rejected(
                        "signature_invalid", "the signature does not verify for this network, kind and body"
                    )
            self.verifier.remember_decoded(decoded)
            units = self._units(request, candidates, results)
            if units:
                await self._route(request, units, results)
        return [result if result is not None else self._unknown("internal") for result in results]

    def _units(
        self, request: SubmitRequest, candidates: list[_Candidate], results: list[dict[str, Any] | None]
    ) -> list[list[_Candidate]]:
        """Group entries into what must travel together: linked chains whole, other entries alone.

        A chain is a run of consecutive entries of the request, each but the last flagged `linked`. If any
        member was refused on intake, or the request ends inside a chain, or the chain cannot fit in one
        batch, the whole chain is refused: logging part of it would change what it means.
        """
        linked_after = {candidate.position: candidate.linked for candidate in candidates}
        units: list[list[_Candidate]] = []
        chain: list[int] = []
        by_position = {candidate.position: candidate for candidate in candidates}
        for position in range(len(request.entries)):
            chain.append(position)
            if linked_after.get(position, False):
                continue
            members, chain = chain, []
            refused = [p for p in members if results[p] is not None or p not in by_position]
            if refused and len(members) > 1:
                for p in members:
                    if results[p] is None:
                        results[p] = self._rejected("linked_event_failed", f"entry {refused[0]} of its chain was refused")
                continue
            if refused:
                continue
            unit = [by_position[p] for p in members]
            if not self.proposer.fits(tuple(candidate.entry.raw for candidate in unit)):
                for candidate in unit:
                    results[candidate.position] = self._rejected("linked_chain_too_large", "a linked chain must fit in one batch")
                continue
            units.append(unit)
        for position in chain:
            if results[position] is None:
                results[position] = self._rejected("linked_event_chain_open", "the request ends inside a linked chain")
        return units

    def _rejected(self, code: str, message: str) -> dict[str, Any]:
        self.metrics.entries_rejected.labels(code).inc()
        return {"status": STATUS_REJECTED, "result": code, "message": message, "index": None, "original": None}

    @staticmethod
    def _unknown(reason: str) -> dict[str, Any]:
        return {"status": STATUS_UNKNOWN, "result": reason, "index": None, "original": None}

    async def _route(self, request: SubmitRequest, units: list[list[_Candidate]], results: list[dict[str, Any] | None]) -> None:
        accepted = [candidate for unit in units for candidate in unit]
        if not request.forwarded and self._waiter_count + len(accepted) > outcome_waiters_max:
            for candidate in accepted:
                results[candidate.position] = self._rejected(ERROR_BUSY, "too many outcomes awaited; retry later")
            return
        if self.raft.is_leader():
            encoded = [tuple(candidate.entry.raw for candidate in unit) for unit in units]
            if not self.proposer.offer(encoded, _now_microseconds()):
                for candidate in accepted:
                    results[candidate.position] = self._rejected(ERROR_BUSY, "the proposer queue is full; retry later")
                return
            self.metrics.proposer_queue.set(len(self.proposer))
            self._schedule_flush()
            if request.forwarded:
                for candidate in accepted:
                    results[candidate.position] = {"status": "accepted", "result": "queued", "index": None, "original": None}
                return
        elif request.forwarded:
            for candidate in accepted:
                results[candidate.position] = self._rejected(ERROR_NO_LEADER, "this node is not the leader")
            return
        waiter = _RequestWaiter(results, len(accepted), self.loop.create_future())
        for candidate in accepted:
            self._waiters.setdefault(candidate.key, []).append((waiter, candidate.position, candidate.entry.raw))
        self._waiter_count += len(accepted)
        try:
            if not self.raft.is_leader():
                refusals = await self._forward([candidate.entry.raw for candidate in accepted])
                for candidate, refusal in zip(accepted, refusals, strict=True):
                    if refusal is not None:
                        waiter.resolve(candidate.position, self._rejected(refusal, f"the leader did not take the entry: {refusal}"))
            if waiter.remaining:
                await asyncio.wait((waiter.future,), timeout=self.config.api.request_timeout_ms / 1000)
        finally:
            self._forget(waiter, accepted)
        for candidate in accepted:
            if results[candidate.position] is None:
                results[candidate.position] = self._outcome_from_state(candidate.key, candidate.entry.raw) or self._unknown("timeout")

    def _forget(self, waiter: _RequestWaiter, accepted: list[_Candidate]) -> None:
        """Drop what is still registered for a request that stops waiting (answered, timed out, cancelled)."""
        for candidate in accepted:
            registrations = self._waiters.get(candidate.key)
            if not registrations:
                continue
            kept = [registration for registration in registrations if registration[0] is not waiter]
            self._waiter_count -= len(registrations) - len(kept)
            if kept:
                self._waiters[candidate.key] = kept
            else:
                del self._waiters[candidate.key]

    def _outcome_from_state(self, key: bytes, raw: bytes) -> dict[str, Any] | None:
        if not key.startswith(b"t"):
            return None
        with self.store.read() as transaction:
            record = queries.transfer(transaction, key[1:])
        if record is None:
            return None
        if record["entry"] != raw:
            # The apply's rule: the same body from the same signer is the same submission, whatever key signed.
            stored, sent = decode_entry(record["entry"]), decode_entry(raw)
            if (stored.body_bytes, stored.signer) != (sent.body_bytes, sent.signer):
                return {"status": STATUS_APPLIED, "result": "exists_with_different_fields", "index": record["index"],
                        "original": record["result"], "amount": None}
        return {"status": STATUS_APPLIED, "result": record["result"], "index": record["index"], "original": None,
                "amount": record["amount_moved"]}

    def _fail_waiters(self, entries: list[bytes], reason: str) -> None:
        for raw in entries:
            try:
                entry = decode_entry(raw)
                key = entry_key(entry, entry.body())
            except EntryError:
                continue
            waiting = self._waiters.get(key)
            if not waiting:
                continue
            registrations = [registration for registration in waiting if registration[2] == raw]
            kept = [registration for registration in waiting if registration[2] != raw]
            if kept:
                self._waiters[key] = kept
            else:
                del self._waiters[key]
            self._waiter_count -= len(registrations)
            for waiter, position, _raw in registrations:
                waiter.resolve(position, self._unknown(reason))

    async def _forward(self, raws: list[bytes]) -> list[str | None]:
        """Pass entries to the leader; per entry, None if it took them or the reason it did not."""
        leader = self.raft.leader_name()
        if leader is None:
            return [ERROR_NO_LEADER] * len(raws)
        if self._forwarder is None or self._forwarder.leader != leader:
            if self._forwarder is not None:
                self._forwarder.close()
            self._forwarder = Forwarder(leader, str(self.genesis.node(leader).client_address), self.config.api.frame_bytes_max)
        return await self._forwarder.forward(raws)

    # Proposer (event loop) -------------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._flush_handle is not None:
            return
        if not self._proposals or self.proposer.has_full_batch():
            self._flush_handle = self.loop.call_soon(self._flush)
            return
        if len(self._proposals) >= self.config.proposer.partial_batches_in_flight_max:
            return  # the next commit (`_proposal_done`) calls again
        due = self.proposer.due_microseconds()
        if due is None:
            return
        delay_seconds = max(0, due - _now_microseconds()) / 1_000_000
        self._flush_handle = self.loop.call_later(delay_seconds, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if not self.raft.is_leader():
            stranded = self.proposer.take_all()
            if stranded:
                self._fail_waiters(stranded, ERROR_NO_LEADER)
            return
        while len(self.proposer) and len(self._proposals) < proposals_in_flight_max:
            due = self.proposer.due_microseconds()
            now = _now_microseconds()
            if not self.proposer.has_full_batch() and not partial_batch_may_go(
                len(self._proposals), due, now, self.config.proposer.partial_batches_in_flight_max
            ):
                break
            started = time.perf_counter()
            oldest = self.proposer.oldest_enqueued_microseconds
            if oldest is not None:
                self.metrics.queue_wait.observe(max(0, now - oldest) / 1_000_000)
            checkpoint = None
            if self._last_applied is not None:
                checkpoint = Checkpoint(self._last_applied.index, self._last_applied.state_hash)
            taken = self.proposer.take_batch(int(time.time() * 1000), checkpoint, now)
            if taken is None:
                break
            if checkpoint is not None:
                self._last_checkpoint_index = checkpoint.index
            batch_bytes, entries = taken
            self.metrics.batch_build.observe(time.perf_counter() - started)
            self._propose(batch_bytes, entries)
        self.metrics.proposer_queue.set(len(self.proposer))
        if len(self.proposer) and len(self._proposals) < proposals_in_flight_max:
            self._schedule_flush()

    def propose_housekeeping(self) -> None:
        """Leader, nothing queued or in flight: propose an empty batch when a pending transfer's timeout has
        passed (expiry happens when a batch carries the cluster time past it), or when the state changed
        since the last checkpoint and none was carried for a while (replicas keep comparing when idle)."""
        last = self._last_applied
        if not self.raft.is_leader() or self._proposals or len(self.proposer):
            return
        with self.store.read() as transaction:
            earliest = earliest_expiry_ms(transaction)
        now_ms = int(time.time() * 1000)
        expiry_due = earliest is not None and earliest <= now_ms
        checkpoint_due = (
            last is not None
            and last.index > self._last_checkpoint_index
            and self._state_hash_history.get(self._last_checkpoint_index) != last.state_hash
            and time.monotonic() - self._last_proposal_time >= checkpoint_interval_seconds
        )
        # Transfers applied after the last head wait for the next one; under load batches bring it within
        # a head window, when idle this empty batch does (its cluster time starts a new window).
        head_due = self._leaves_without_head and time.monotonic() - self._last_proposal_time >= head_window_ms / 1000
        if not expiry_due and not checkpoint_due and not head_due:
            return
        checkpoint = None if last is None else Checkpoint(last.index, last.state_hash)
        if checkpoint is not None:
            self._last_checkpoint_index = checkpoint.index
        self._propose(encode_batch(Batch(now_ms, checkpoint, ())), [])

    def _propose(self, batch_bytes: bytes, entries: list[bytes]) -> None:
        self._last_proposal_time = time.monotonic()
        self._proposal_counter += 1
        number = self._proposal_counter
        self._proposals[number] = _Proposal(entries, time.perf_counter())
        self.metrics.proposals.inc()
        self.metrics.proposals_pending.set(len(self._proposals))
        loop = self.loop

        def done(committed: bool, reason: str) -> None:  # tick thread, or this thread on a full queue
            try:
                loop.call_soon_threadsafe(self._proposal_done, number, committed, reason)
            except RuntimeError:
                if not loop.is_closed():  # after a clean stop nobody waits for the answer
                    raise

        self.raft.propose(batch_bytes, done)
        # Callbacks can be lost (research/pysyncobj.md §2); never hold a slot longer than a request waits.
        self.loop.call_later(self.config.api.request_timeout_ms / 1000, self._proposal_done, number, False, "timeout")

    def _proposal_done(self, number: int, committed: bool, reason: str) -> None:
        proposal = self._proposals.pop(number, None)
        if proposal is None:
            return
        self.metrics.proposals_pending.set(len(self._proposals))
        if committed:
            self.metrics.replication.observe(time.perf_counter() - proposal.proposed_at)
        else:
            self.metrics.proposals_failed.labels(reason).inc()
            # Not committed at its slot: tell the waiting clients at once so they retry with the same ids
            # (an id already applied anyway answers `exists`).
            self._fail_waiters(proposal.entries, f"not_committed:{reason}")
        if len(self.proposer):
            self._schedule_flush()

    # Queries ------------------------------------------------------------------------------------------------

    def handle_query(self, request: QueryRequest) -> dict[str, Any]:
        """Answer a read from this node's applied state (as of its applied index, which is in the reply)."""
        arguments = request.arguments
        operation = request.operation
        if operation == "status":
            return {"status": self.status()}
        if operation == "head_signature":
            return {"result": self.heads.receive(arguments["index"], arguments["validator"], arguments["signature"])}
        with self.store.read() as transaction:
            if operation == "lookup_transfer":
                record = queries.transfer(transaction, arguments["transfer_id"])
                return {"found": record is not None, "transfer": record}
            if operation == "transfers_by_reference":
                found = queries.transfers_with_reference(transaction, arguments["reference"], arguments.get("limit", 100))
                return {"transfers": found}
            if operation == "balance":
                balance = queries.balance(transaction, arguments["account"], arguments.get("as_of_index"))
                return {"found": balance is not None, "balance": balance}
            if operation == "history":
                found = queries.history(
                    transaction,
                    arguments["account"],
                    start_ms=arguments.get("start_ms", 0),
                    end_ms=arguments.get("end_ms", 2**63 - 1),
                    limit=arguments.get("limit", 100),
                    cursor=arguments.get("cursor"),
                )
                return {"found": found is not None, "history": found}
            if operation == "institution":
                record = queries.institution(transaction, arguments["institution"])
                return {"found": record is not None, "institution": record}
            if operation == "alias":
                record = queries.alias(transaction, arguments["alias"])
                return {"found": record is not None, "alias": record}
            if operation == "totals":
                return {"totals": queries.totals(transaction), **self._position(transaction)}
            if operation == "accounts":
                return {"accounts": queries.accounts(transaction)}
            if operation == "nodes":
                return {"nodes": queries.nodes(transaction)}
            validators = len(self.genesis.validators)
            if operation == "receipt":
                receipt, why = queries.receipt(transaction, arguments["transfer_id"], self.genesis.cluster_id, validators)
                return {"found": receipt is not None, "why": why, "receipt": None if receipt is None else encode_receipt_binary(receipt)}
            if operation == "receipt_status":
                status = queries.receipt_status(transaction, arguments["transfer_id"])
                return {"found": status is not None, "receipt_status": status}
            if operation == "tree_head":
                head = queries.signed_head(transaction, self.genesis.cluster_id, validators, arguments.get("index", 0), "index" not in arguments)
                return {"found": head is not None, "head": None if head is None else _head_document(head)}
            if operation == "consistency_proof":
                old_size, new_size = arguments["old_size"], arguments["new_size"]
                if not 0 < old_size <= new_size <= tree.tree_size(transaction):
                    return {"found": False, "proof": []}
                return {"found": True, "proof": tree.consistency_proof(transaction, old_size, new_size)}
        raise ValueError(f"no handler for {operation}")

    def _position(self, transaction) -> dict[str, Any]:
        summary = transaction.summary()
        return {"applied_index": summary.applied_index, "state_hash": summary.state_hash.hex()}

    def status(self) -> dict[str, Any]:
        raft = self.raft.status
        summary = self.store.summary()
        return {
            "name": self.spec.name,
            "node_role": str(self.spec.role),
            "institution": self.spec.institution,
            "cluster_id": self.genesis.cluster_id,
            "role": raft.role,
            "term": raft.term,
            "leader": raft.leader,
            "commit_index": raft.commit_index,
            "last_log_index": raft.last_log_index,
            "applied_index": summary.applied_index,
            "state_hash": summary.state_hash.hex(),
            "cluster_time_ms": summary.cluster_time_ms,
            "connected_peers": list(raft.connected_peers),
            "recovering_until_index": raft.recovering_until_index,
            "proposer_queue_entries": len(self.proposer),
            "proposals_in_flight": len(self._proposals),
            "diverged": self._diverged,
            "ready": self.readiness()[0],
        }

    def readiness(self) -> tuple[bool, dict[str, tuple[bool, str]]]:
        """Named readiness checks, Kubernetes style: all must pass for /readyz to answer 200."""
        raft = self.raft.status
        try:
            applied = self.store.summary().applied_index
            storage = (True, f"open, applied index {applied}")
        except Exception as error:  # noqa: BLE001 - any failure to read the store is the answer
            applied = 0
            storage = (False, f"cannot read the state: {error}")
        leader_ok, leader_detail = raft.leader is not None, f"leader {raft.leader}" if raft.leader else "no leader known"
        contact = raft.leader_last_contact_unix_seconds
        silence = None if contact is None else time.time() - contact
        if leader_ok and raft.role != "leader" and silence is not None and silence > self.config.raft.election_timeout_max_ms / 1000:
            leader_ok, leader_detail = False, f"no contact with leader {raft.leader} for {silence:.1f} s"
        lag = max(0, raft.commit_index - applied)
        checks = {
            "storage": storage,
            "leader": (leader_ok, leader_detail),
            "caught_up": (raft.ready, "caught up with the leader's log" if raft.ready else "still replaying the log"),
            "apply_lag": (lag <= apply_lag_entries_max, f"applied {applied}, commit {raft.commit_index}, lag {lag}"),
            "not_diverged": (not self._diverged, "state hash matches the leader's checkpoints" if not self._diverged else "state diverged"),
        }
        return all(ok for ok, _ in checks.values()), checks

    def metrics_applied_index(self) -> int:
        return self.store.summary().applied_index

    def refresh_gauges(self) -> None:
        raft = self.raft.status
        metrics = self.metrics
        metrics.is_leader.set(1 if raft.role == "leader" else 0)
        metrics.has_leader.set(1 if self.readiness()[1]["leader"][0] else 0)
        contact = raft.leader_last_contact_unix_seconds
        metrics.leader_last_contact.set(contact if contact is not None else float("nan"))
        metrics.term.set(raft.term)
        metrics.commit_index.set(raft.commit_index)
        metrics.last_log_index.set(raft.last_log_index)
        metrics.recovering.set(1 if raft.recovering_until_index else 0)
        metrics.applied_index.set(self.metrics_applied_index())
        for validator in self.genesis.validators:
            if validator.name != self.spec.name:
                metrics.peer_connected.labels(validator.name).set(1 if validator.name in raft.connected_peers else 0)
        metrics.storage_used.set(self.store.used_bytes())
        metrics.storage_map_size.set(self.store.map_size_bytes())
        readers = self.store.readers()
        metrics.storage_readers.set(readers.open)
        metrics.storage_oldest_reader_lag.set(readers.oldest_lag_transactions)

    def clear_stale_readers(self) -> int:
        """Housekeeping: free the reader slots that processes killed inside a read transaction left on the state
        and on the entry-hash index (storage.state.clear_stale_readers), at most once every
        stale_reader_check_interval_seconds."""
        now = time.monotonic()
        if now - self._stale_readers_checked < stale_reader_check_interval_seconds:
            return 0
        self._stale_readers_checked = now
        total = 0
        for what, holder in (("state", self.store), ("entry-hash index", self.entry_hashes)):
            try:
                cleared = clear_stale_readers(holder.environment)
            except lmdb.Error as error:
                # A snapshot install closed the state's environment between the lookup and the call: the next
                # round checks the new one.
                logger.debug("reader check of the %s skipped: %s", what, error)
                continue
            if cleared:
                logger.warning(
                    "freed %d reader slot(s) of the %s held by processes that died inside a read transaction;"
                    " until now LMDB could not reuse the pages freed after their snapshot", cleared, what,
                    extra={"event": "stale_readers_cleared"},
                )
                self.metrics.storage_stale_readers_cleared.inc(cleared)
                total += cleared
        return total


def _head_document(head) -> dict[str, Any]:
    return {
        "index": head.index, "tree_size": head.tree_size, "root_hash": head.root_hash, "state_hash": head.state_hash,
        "cluster_time_ms": head.cluster_time_ms, "signatures": [list(item) for item in head.signatures],
    }


class Forwarder:
    """Passes entries submitted to a follower or replica on to the leader's client API."""

    def __init__(self, leader: str, address: str, frame_bytes_max: int) -> None:
        from node.client import AsyncClient

        self.leader = leader
        self._client = AsyncClient(address, frame_bytes_max=frame_bytes_max)

    async def forward(self, raws: list[bytes]) -> list[str | None]:
        from node.client import ClientError

        try:
            results = await self._client.submit_raw(raws, forwarded=True, timeout_seconds=forward_timeout_seconds)
        except (ClientError, OSError, asyncio.TimeoutError) as error:
            logger.warning("forwarding to leader %s failed: %s", self.leader, error)
            self.close()
            # Whether the leader took them is unknown: the waiters stay and learn it from the log.
            return [None] * len(raws)
        return [None if result["status"] == "accepted" else result["result"] for result in results]

    def close(self) -> None:
        self._client.close()


def _now_microseconds() -> int:
    return time.monotonic_ns() // 1000

