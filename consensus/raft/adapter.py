"""The one place that drives pysyncobj: a hardened SyncObj wired to our journal, transport, snapshots and apply."""

from __future__ import annotations

import errno
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pysyncobj.syncobj
from nacl.signing import SigningKey
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.config import FAIL_REASON, SERIALIZER_STATE
from pysyncobj.monotonic import monotonic as monotonic_time
from pysyncobj.node import TCPNode
from pysyncobj.serializer import Serializer

from config.keys import sync_directory
from config.schema import Genesis, NodeRole, NodeSpec, RaftConfig
from consensus.entries import SignedEntry
from consensus.raft.apply_thread import ApplyThread, follower_grouping, leader_grouping
from consensus.raft.journal import DurableJournal, JournalError, JournalObserver
from consensus.raft.snapshot import (
    SnapshotError,
    SnapshotHeader,
    read_header,
    restore_from_snapshot,
    write_snapshot,
)
from consensus.raft.transport import PeerIdentity, SecureTransport, TransportObserver
from storage.records import get_node
from storage.rules import AppliedBatch, Decoded, apply_batch, apply_no_op
from storage.state import LedgerStore, StateTransaction

logger = logging.getLogger("tonle.raft")

# pysyncobj prefixes every log command with one type byte (syncobj.py `_COMMAND_TYPE`). We only ever
# submit REGULAR commands whose remaining bytes are a batch; the leader's NO_OP marks each new term.
command_type_regular = b"\x00"
command_type_no_op = b"\x01"

# Raft entries stay far below pysyncobj's chunked-transmission threshold (see consensus/batch.py), and this
# threshold is passed explicitly so the relation between the two is visible in one place.
append_entries_batch_bytes = 2**16
tick_period_seconds = 0.01
status_refresh_seconds = 0.05
socket_buffer_bytes = 2**20
raft_commands_queue_max = 1024
# A clean stop applies what is already queued for the apply thread (at most apply_queue_entries_max batches).
apply_stop_seconds_max = 30.0


# With the disk full, pysyncobj logs a traceback for every tick whose journal append fails and for every
# snapshot it is sent and cannot write: hundreds in a few seconds. One line per interval says the same.
disk_full_log_interval_seconds = 10.0


class _DiskFullLogs(logging.Filter):
    """Folds pysyncobj's "No space left on device" tracebacks into one ERROR line per interval, with a count.

    Only what is logged changes: the failed write is handled as before (the journal cuts any partial record,
    nothing is acknowledged, the leader sends again)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._lock = threading.Lock()
        self._folded = 0
        self._last_line: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, OSError) or error.errno != errno.ENOSPC:
            return True
        with self._lock:
            self._folded += 1
            now = self._clock()
            if self._last_line is not None and now - self._last_line < disk_full_log_interval_seconds:
                return False
            folded, self._folded, self._last_line = self._folded, 0, now
        what = "writing a snapshot sent by the leader" if record.name == "pysyncobj.serializer" else "writing the Raft journal"
        record.msg = ("%s failed: %s; what needed the write is not acknowledged, and is tried again as the leader "
                      "sends again; %d such failure(s) since the last line (at most one line every %g s)")
        record.args = (what, error, folded, disk_full_log_interval_seconds)
        record.exc_info = None
        record.exc_text = None
        return True


for _name in ("pysyncobj.syncobj", "pysyncobj.serializer"):
    logging.getLogger(_name).addFilter(_DiskFullLogs())


@dataclass(frozen=True, slots=True)
class RaftStatus:
    """A consistent picture of the Raft state, refreshed by the tick thread, readable from any thread."""

    role: str  # "leader" | "follower" | "candidate" | "replica"
    term: int
    leader: str | None  # genesis node name
    commit_index: int
    last_log_index: int
    raft_applied_index: int
    has_quorum: bool
    connected_peers: tuple[str, ...]
    match_index: tuple[tuple[str, int], ...]
    recovering_until_index: int
    ready: bool
    # Wall time of the last append_entries (heartbeats included) from the leader, or now on the leader:
    # a replica that stops hearing from its leader must stop calling itself ready.
    leader_last_contact_unix_seconds: float | None = None


class RaftEvents:
    """Callbacks from the tick thread. The node overrides what it needs; each must return quickly."""

    def applied(self, batches: list[AppliedBatch], transaction_seconds: float, commit_seconds: float) -> None:
        """After the commit of one apply transaction: the batches it applied (none, if all were replays or
        no-ops), how long the transaction took, commit included, and how long LMDB's commit alone took (its
        page writes and fsyncs: the state's disk)."""

    def role_changed(self, old_role: str, new_role: str) -> None: ...

    def leader_changed(self, old_leader: str | None, new_leader: str | None, term: int) -> None: ...

    def prefetch(self, batch_bytes: bytes) -> None: ...

    def before_apply(self, batch_bytes: bytes) -> None: ...

    def before_commit(self, transaction: StateTransaction, batch: AppliedBatch) -> None:
        """Inside the apply's transaction, just before it commits (failpoints use this)."""

    def after_commit(self) -> None:
        """Just after an apply transaction committed, still holding the apply lock: no snapshot install can
        put another environment in the state's place until it returns, and no other apply can commit."""

    def snapshot_written(self, seconds: float, file_bytes: int) -> None:
        """On the snapshot thread, once a snapshot file is in place: how long writing it took and its size."""

    def snapshot_installed(self, seconds: float) -> None:
        """After a snapshot replaced the state (from a leader, or this node's own file at start): how long the
        install took (copy, checks, new environment, swap)."""

    def fatal(self, message: str) -> None:
        """Called when the node must stop: it must not return control to pysyncobj's apply loop."""
        raise SystemExit(message)


class _JournalRequest:
    """Passed as `journalFile` so our factory (below) can tell our journals from pysyncobj's own."""

    def __init__(self, journal: DurableJournal) -> None:
        self.journal = journal


_original_create_journal = pysyncobj.syncobj.createJournal


def _create_journal(journal_file):
    if isinstance(journal_file, _JournalRequest):
        return journal_file.journal
    return _original_create_journal(journal_file)


# pysyncobj builds its journal through this module-level name during SyncObj.__init__; routing it through a
# factory that only changes behaviour for our request objects keeps any other SyncObj in the process intact.
pysyncobj.syncobj.createJournal = _create_journal


class _BackgroundSnapshots(Serializer):
    """pysyncobj's snapshot writer, with the write on a thread of its own instead of the tick thread.

    pysyncobj calls the serializer on its tick thread and waits for it. Writing a snapshot (a compact copy of
    LMDB, then fsync: 176 MB at 5,000 entries in `tonle bench`) took the tick away for as long; every node
    compacts at the same index, so the leader stepped down and p99 at 75 % of peak reached 10 s. Here
    `serialize` starts the write and returns; `checkSerializing` says SERIALIZING until the file is in place,
    and only then does pysyncobj drop the journal up to it. While a snapshot is written none is sent to a
    follower, and an incoming one waits for the write to end (both land on the same file).
    """

    def __init__(self, write: Callable[[str, tuple], None], file_name: str, transmission_batch_bytes: int,
                 deserializer: Callable, turn_down: Callable[[Path], bool]) -> None:
        super().__init__(file_name, transmission_batch_bytes, False, write, deserializer, None)
        self._write = write
        self._turn_down = turn_down
        self._file_name = file_name
        self._received_path = Path(file_name + ".1.tmp")  # where pysyncobj writes a snapshot it receives
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._written: bool | None = None  # None while the writer runs
        self._serialize_id: int | None = None

    def serialize(self, data, id) -> None:  # noqa: A002 - pysyncobj's name
        with self._lock:
            if self._writer is not None:
                return
            self._serialize_id, self._written = id, None
            self._writer = threading.Thread(
                target=self._run, args=(tuple(data[1:]),), name="tonle-snapshot", daemon=True
            )
            self._writer.start()

    def _run(self, raft_data: tuple) -> None:
        try:
            self._write(self._file_name, raft_data)
            written = True
        except Exception:  # noqa: BLE001 - reported to pysyncobj as FAILED; the journal keeps its entries
            logger.exception("writing a snapshot failed; the journal keeps its entries and compaction retries")
            written = False
        with self._lock:
            self._written = written

    def checkSerializing(self):  # noqa: N802 - pysyncobj's name
        with self._lock:
            if self._writer is None:
                return SERIALIZER_STATE.NOT_SERIALIZING, None
            if self._written is None:
                return SERIALIZER_STATE.SERIALIZING, self._serialize_id
            written, self._writer = self._written, None
        return (SERIALIZER_STATE.SUCCESS if written else SERIALIZER_STATE.FAILED), self._serialize_id

    def getTransmissionData(self, transmissionID):  # noqa: N802, N803 - pysyncobj's names
        with self._lock:
            if self._writer is not None and self._written is None:
                return None  # what pysyncobj's own writer answers while it writes: the leader asks again later
        return super().getTransmissionData(transmissionID)

    def setTransmissionData(self, data):  # noqa: N802 - pysyncobj's name
        self.wait_for_write(None)
        if data is None:
            return super().setTransmissionData(data)
        if not data[2]:
            received = super().setTransmissionData(data)
            if self._Serializer__incomingTransmissionFile is None:
                self._drop_partial_receive()
            return received
        # The last chunk. pysyncobj writes it and renames the received file over our own snapshot in one step;
        # here the complete file is judged first, so one older than ours never replaces it (RaftNode's
        # _turns_down_received_snapshot). Turned down, it is dropped and pysyncobj neither loads nor answers it.
        chunk, is_first, _is_last = data
        super().setTransmissionData((chunk, is_first, False))
        incoming = self._Serializer__incomingTransmissionFile  # pysyncobj's open file; None if writing failed
        if incoming is None:
            self._drop_partial_receive()
            return False
        incoming.flush()
        if self._turn_down(self._received_path):
            incoming.close()
            self._Serializer__incomingTransmissionFile = None
            self._drop_partial_receive()
            return False
        return super().setTransmissionData((b"", False, True))

    def _drop_partial_receive(self) -> None:
        """Delete the received file once no transmission is under way: one turned down, or one pysyncobj
        failed to write (a full disk) and forgot while leaving it on disk, holding space until the next
        snapshot arrives, on a disk that has none."""
        try:
            self._received_path.unlink(missing_ok=True)
        except OSError as error:
            logger.warning("could not remove a partly received snapshot: %s", error)

    def wait_for_write(self, timeout_seconds: float | None) -> bool:
        """Wait for a snapshot being written; False if it is still being written after `timeout_seconds`."""
        with self._lock:
            writer = self._writer
        if writer is not None:
            writer.join(timeout_seconds)
            return not writer.is_alive()
        return True


_original_serializer = pysyncobj.syncobj.Serializer


def _create_serializer(file_name, transmission_batch_bytes, use_fork, serializer, deserializer, serialize_checker):
    owner = getattr(serializer, "__self__", None)
    if isinstance(owner, RaftNode):
        owner._snapshots = _BackgroundSnapshots(
            serializer, file_name, transmission_batch_bytes, deserializer, owner._turns_down_received_snapshot
        )
        return owner._snapshots
    return _original_serializer(
        file_name, transmission_batch_bytes, use_fork, serializer, deserializer, serialize_checker
    )


# Like createJournal: only a RaftNode's SyncObj gets the background writer.
pysyncobj.syncobj.Serializer = _create_serializer

_state_names = {0: "follower", 1: "candidate", 2: "leader"}


@dataclass(frozen=True)
class AppendDecision:
    """What the adapter does with an append_entries message before pysyncobj handles it."""

    message: dict  # what pysyncobj sees
    keep_log_suffix: bool  # every entry of the message is held with its term: nothing may be cut
    cut_from_index: int | None  # our entry at prevLogIdx conflicts with the leader's: cut from there first


def reconcile_append_entries(
    message: dict, term_at: Callable[[int], int | None], commit_index: int, current_term: int
) -> AppendDecision:
    """Raft's receiver rule for an append_entries message, which pysyncobj does not follow.

    1. pysyncobj cuts its log after prevLogIdx on every append (syncobj.py, "truncating already-applied log
       entries"), then writes the message's entries back. A resend after the leader rewinds nextIndex
       (research/pysyncobj.md B6: dozens of times per run) therefore drops entries this node acknowledged,
       possibly committed ones, until the leader sends them again: a vote cast in that window can elect a
       leader without them, and a crash in it makes the loss durable. Raft cuts only at the first entry whose
       term conflicts; entries already held with the same term are dropped from the message, and when none
       is left the log keeps its suffix. The leader's commit index is capped at the last index this message
       proves to match the leader's log (Raft's min(leaderCommit, last new entry)), so a kept suffix from an
       older term is never taken as committed.
    2. When our entry at prevLogIdx has another term than the leader's, pysyncobj answers "retry from
       prevLogIdx", but the leader has already streamed the rest of its log behind that append, and each of
       those appends, past our log's end, answers "retry from our last index + 1", undoing the step back: a
       deposed leader with an uncommitted suffix never finds where its log matches (docs/faults.md finding 2;
       a validator of the scale run stalled 15 minutes on one such entry). Our entry at prevLogIdx differs
       from the current leader's, so it was never committed (the leader holds every committed entry): we cut
       the log there, and every answer to the stream then says "retry from prevLogIdx". Never at or below
       our own commit index, and only for a leader of our term or a later one: a deposed leader's late
       append says nothing about what is committed (pysyncobj ignores it too).
    3. A snapshot chunk (no prevLogIdx) proves nothing about our log, yet pysyncobj raises its commit index to
       min(leaderCommit, our log's end) after every chunk. A deposed leader still holding entries of its own
       term past the commit index took them as committed and applied them while a snapshot arrived, though
       the new leader had committed other entries at those indexes (docs/faults.md finding 6). Such a message
       keeps our commit index; an installed snapshot moves it (_LedgerSyncObj._SyncObj__onMessageReceived).
    """
    previous_index = message.get("prevLogIdx")
    term = message.get("term")
    if previous_index is None and isinstance(message.get("commit_index"), int):
        return AppendDecision(dict(message, commit_index=min(message["commit_index"], commit_index)), False, None)
    if previous_index is None or "transmission" in message or not isinstance(term, int) or term < current_term:
        return AppendDecision(message, False, None)
    held_term = term_at(previous_index)
    if held_term is None:
        return AppendDecision(message, False, None)  # a gap: pysyncobj asks for what follows our log
    if held_term != message.get("prevLogTerm"):
        cut = previous_index if previous_index > commit_index else None
        return AppendDecision(message, False, cut)
    entries = list(message.get("entries", ()))
    for offset, (_command, index, _term) in enumerate(entries):
        if index != previous_index + 1 + offset:
            # Not consecutive: left to pysyncobj, but only prevLogIdx is proven to match the leader's log.
            capped = dict(message)
            if isinstance(message.get("commit_index"), int):
                capped["commit_index"] = min(message["commit_index"], max(previous_index, commit_index))
            return AppendDecision(capped, False, None)
    matching = 0
    while matching < len(entries) and term_at(entries[matching][1]) == entries[matching][2]:
        matching += 1
    reconciled = dict(message)
    if matching:
        reconciled["prevLogIdx"] = entries[matching - 1][1]
        reconciled["prevLogTerm"] = entries[matching - 1][2]
        reconciled["entries"] = entries[matching:]
    last_matching_index = previous_index + len(entries)
    if isinstance(message.get("commit_index"), int):
        reconciled["commit_index"] = min(message["commit_index"], last_matching_index)
    return AppendDecision(reconciled, matching == len(entries), None)


class _LedgerSyncObj(SyncObj):
    """SyncObj with the apply, message intake and tick hooks that make it safe for a ledger.

    The overridden names are pysyncobj 0.3.17 internals (name-mangled `_SyncObj__*` methods);
    tests/unit/test_pysyncobj_pin.py fails if the installed pysyncobj is not the one they were written for.
    """

    def __init__(self, owner: RaftNode, self_address, other_addresses, conf, transport_class) -> None:
        self._owner = owner
        self._keep_log_suffix = False
        self._snapshot_answer_index: int | None = None  # what to answer for a snapshot installed beside our log
        super().__init__(self_address, other_addresses, conf, transportClass=transport_class)

    # Apply: exactly once per index, never raising into pysyncobj (an exception there retries forever and
    # wedges every node alike, research/pysyncobj.md B4). No pickle: our bytes go straight to our decoder.
    # The entry is handed to the apply thread (consensus/raft/apply_thread.py), so this tick goes on sending
    # and acknowledging while it is applied. The index handed over is what pysyncobj passes to the proposer's
    # callback, which RaftNode.propose holds until that index is applied.
    def _SyncObj__doApplyCommand(self, command: bytes):  # noqa: N802 - pysyncobj's name
        index = self.raftLastApplied + 1
        self._owner._apply_thread.hand(index, command)
        return index

    # Membership changes are disabled; this parser would otherwise unpickle log bytes.
    def _SyncObj__parseChangeClusterRequest(self, command: bytes):  # noqa: N802
        return None

    def _SyncObj__onMessageReceived(self, node, message):  # noqa: N802
        message_type = message["type"]
        if message_type == "next_node_idx" and message.get("term") != self.raftCurrentTerm:
            # An answer to an append of another term. pysyncobj's answers carry no term (the transport adds
            # it), so a leader counted an answer sent to it in an earlier term, for entries its log may since
            # have replaced, toward committing entries of its current term; Raft drops replies of other terms.
            return
        if message_type == "request_vote" and self._owner._journal.recovery_floor_index:
            # A node that lost acknowledged log entries must not help elect a leader that lacks them.
            return
        if message_type == "append_entries":
            self._owner._leader_contact = time.time()
            for command, _index, _term in message.get("entries", ()):
                if command[:1] == command_type_regular:
                    self._owner._events.prefetch(command[1:])
            decision = reconcile_append_entries(
                message, self._owner._journal.term_at, self.raftCommitIndex, self.raftCurrentTerm
            )
            if decision.cut_from_index is not None:
                logger.warning("raft: our entries from index %d conflict with leader %s's log; cutting them",
                               decision.cut_from_index, node)
                SyncObj._SyncObj__deleteEntriesFrom(self, decision.cut_from_index)
            message, self._keep_log_suffix = decision.message, decision.keep_log_suffix
        applied_before = self.raftLastApplied
        try:
            SyncObj._SyncObj__onMessageReceived(self, node, message)
        finally:
            self._keep_log_suffix = False
            self._snapshot_answer_index = None
        if message_type == "append_entries" and self.raftLastApplied > applied_before and (
            self.raftCommitIndex < self.raftLastApplied
        ):
            # A snapshot was installed: the leader took it from committed entries, so the log it leaves (the
            # snapshot's last two entries) is committed. The chunk kept our old commit index (see rule 3 of
            # reconcile_append_entries); without this it would stay below the applied index until the next append.
            self._SyncObj__raftCommitIndex = self.raftLastApplied
            self._SyncObj__raftLog.setRaftCommitIndex(self.raftLastApplied)

    # Raft's InstallSnapshot rule, which pysyncobj does not follow: when our log holds the snapshot's last entry
    # with its term, the entries after it are kept. pysyncobj cleared the whole log, so a follower already
    # past the snapshot (sent one because a stale answer rewound the leader's next index below its log's
    # start) dropped entries it had acknowledged, maybe counted toward a commit, until the leader sent them
    # again: a crash or a vote in that window could lose committed entries (finding 5's class).
    def _SyncObj__loadDumpFile(self, clearJournal):  # noqa: N802, N803 - pysyncobj's names
        if clearJournal:
            kept_after = self._owner._keep_log_after_received_snapshot()
            if kept_after is not None:
                clearJournal = False
                # Answer "next index after the snapshot", not after our log: the suffix is only known to match
                # the leader's up to the snapshot, and the leader counts what the answer claims.
                self._snapshot_answer_index = kept_after + 1
        SyncObj._SyncObj__loadDumpFile(self, clearJournal)

    def _SyncObj__sendNextNodeIdx(self, node, reset=False, nextNodeIdx=None, success=False):  # noqa: N802, N803
        if nextNodeIdx is None and self._snapshot_answer_index is not None:
            nextNodeIdx, self._snapshot_answer_index = self._snapshot_answer_index, None
        SyncObj._SyncObj__sendNextNodeIdx(self, node, reset, nextNodeIdx, success)

    def _SyncObj__deleteEntriesFrom(self, fromIDx):  # noqa: N802, N803 - pysyncobj's names
        if self._keep_log_suffix:
            return  # every entry of this append is already held with its term: nothing conflicts
        SyncObj._SyncObj__deleteEntriesFrom(self, fromIDx)

    def _onTick(self, timeToWait=0.0):  # noqa: N802, N803 - pysyncobj's names
        owner = self._owner
        # The leader counts its own log toward commit at the start of a tick: make it durable first.
        owner._sync_journal()
        floor = owner._journal.recovery_floor_index
        if floor:
            if owner._journal.last_index >= floor and self.raftCommitIndex >= floor:
                owner._journal.clear_recovery_floor()
                logger.warning("journal refilled up to index %d; this node votes again", floor)
            else:
                # Do not campaign either: a shortened log could win votes from equally short logs.
                self._SyncObj__raftElectionDeadline = monotonic_time() + owner._raft_config.election_timeout_max_ms / 1000
        super()._onTick(timeToWait)


class RaftNode:
    """A validator (voting) or institution (read-only replica) node's Raft engine."""

    def __init__(
        self,
        *,
        genesis: Genesis,
        node: NodeSpec,
        node_key: SigningKey,
        data_dir: Path,
        raft_config: RaftConfig,
        store: LedgerStore,
        verify: Callable[[SignedEntry], bool],
        decoded: Decoded | None = None,
        events: RaftEvents,
        transport_observer: TransportObserver | None = None,
        journal_observer: JournalObserver | None = None,
    ) -> None:
        self._genesis = genesis
        self._node = node
        self._raft_config = raft_config
        self._store = store
        self._verify = verify
        self._decoded = decoded
        self._events = events
        raft_directory = data_dir / "raft"
        raft_directory.mkdir(parents=True, exist_ok=True)
        self._snapshot_path = raft_directory / "snapshot.bin"
        # The last snapshot file verified, by identity, with read_header's answer: at start-up the local
        # snapshot is checked, then pysyncobj loads that same file, and it is as large as the state.
        self._verified_snapshot: tuple[tuple[int, int, int, int], tuple[SnapshotHeader, int, int]] | None = None
        self._journal = DurableJournal(raft_directory / "journal", fsync_enabled=True, observer=journal_observer)
        self._apply_lock = threading.Lock()
        # Started before pysyncobj, whose tick thread hands it committed entries from its first tick.
        self._apply_thread = ApplyThread(self._apply, name=f"tonle-apply-{node.name}")
        self._snapshots: _BackgroundSnapshots | None = None  # set when pysyncobj builds its serializer
        self._repair_damaged_snapshot()
        self._name_by_address = {str(v.raft_address): v.name for v in genesis.validators}
        self._status = RaftStatus("follower", 0, None, 0, 0, 0, False, (), (), 0, False)
        self._leader_contact: float | None = None
        self._status_refreshed = 0.0

        peers = {
            spec.name: PeerIdentity(spec.name, str(spec.role), spec.public_key, str(spec.raft_address))
            for spec in genesis.nodes
        }
        # A node admitted after genesis knows itself from its configuration.
        peers.setdefault(node.name, PeerIdentity(node.name, str(node.role), node.public_key, str(node.raft_address)))
        transport_class = functools.partial(
            SecureTransport,
            cluster_id=genesis.cluster_id,
            self_name=node.name,
            signing_key=node_key,
            peers=peers,
            before_send=self._sync_journal_before_sending,
            observer=transport_observer,
            admitted_peer=self._admitted_peer,
        )
        validator_addresses = [str(v.raft_address) for v in genesis.validators]
        is_validator = node.role is NodeRole.VALIDATOR
        self_address = str(node.raft_address) if is_validator else None
        others = [address for address in validator_addresses if address != self_address]
        config = raft_config
        conf = SyncObjConf(
            password=None,  # the transport authenticates and encrypts every connection itself
            autoTick=True,
            autoTickPeriod=tick_period_seconds,
            commandsQueueSize=raft_commands_queue_max,
            raftMinTimeout=config.election_timeout_min_ms / 1000,
            raftMaxTimeout=config.election_timeout_max_ms / 1000,
            appendEntriesPeriod=config.heartbeat_interval_ms / 1000,
            connectionTimeout=config.connection_timeout_ms / 1000,
            connectionRetryTime=config.connection_retry_ms / 1000,
            leaderFallbackTimeout=config.leader_fallback_timeout_ms / 1000,
            # Send each batch as soon as it is proposed instead of once per heartbeat period: pysyncobj's
            # batch mode adds ~100 ms to every commit. Entries are already batches of transfers.
            appendEntriesUseBatch=False,
            appendEntriesBatchSizeBytes=append_entries_batch_bytes,
            bindAddress=self_address,
            preferredAddrType="ipv4",
            sendBufferSize=socket_buffer_bytes,
            recvBufferSize=socket_buffer_bytes,
            dnsCacheTime=600.0,
            dnsFailCacheTime=30.0,
            logCompactionMinEntries=config.log_compaction_entries,
            logCompactionMinTime=config.log_compaction_interval_seconds,
            logCompactionSplit=False,
            logCompactionBatchSize=append_entries_batch_bytes,
            commandsWaitLeader=False,
            fullDumpFile=str(self._snapshot_path),
            journalFile=_JournalRequest(self._journal),
            bindRetryTime=1.0,
            maxBindRetries=5,
            onReady=None,
            onStateChanged=self._on_state_changed,
            dynamicMembershipChange=False,
            pollerType="auto",
            useFork=False,
            serializer=self._serialize,
            serializeChecker=None,
            deserializer=self._deserialize,
            onCodeVersionChanged=None,
            tcp_keepalive=(16, 3, 5),
        )
        self._syncobj = _LedgerSyncObj(self, self_address, others, conf, transport_class)
        # Tick callbacks run after the tick's proposals are appended and sent, just before it waits for answers.
        self._syncobj.addOnTickCallback(self._sync_journal)
        self._syncobj.addOnTickCallback(self._refresh_status)

    def _admitted_peer(self, name: str) -> PeerIdentity | None:
        """An institution node admitted by a replicated AdmitNode entry, as this node's state knows it."""
        with self._store.read() as transaction:
            record = get_node(transaction, name)
        if record is None or record.role != "institution":
            return None
        return PeerIdentity(record.name, "institution", record.public_key, record.raft_address)

    def _sync_journal(self) -> None:
        """fsync before anything counts the log: a failed fsync stops the node (never retried: the kernel
        may already have dropped the pages it failed to write)."""
        try:
            self._journal.sync()
        except JournalError as error:
            self._events.fatal(f"journal fsync failed: {error}")
            raise

    def _sync_journal_before_sending(self, message_type: str) -> None:
        """A follower's acknowledgement, a vote and anything else that speaks for our log leaves only once the
        log is on disk. A leader's append_entries leaves at once: its own copy is synced before the tick waits
        for the answers (a tick callback) and again before the tick counts it toward commit (`_onTick`), so the
        leader's fsync overlaps the followers' (Raft thesis §10.2.1) instead of preceding it."""
        if message_type != "append_entries":
            self._sync_journal()

    # Proposals ------------------------------------------------------------------------------------------

    def propose(self, batch_bytes: bytes, callback: Callable[[bool, str], None]) -> None:
        """Append a batch to the log (leader only). `callback(committed, reason)` comes once the batch is
        applied here, or when it fails; it may never be called: outcomes are read from applied state,
        callbacks only speed up failure reports and free the proposer's slot.

        Calling back at commit instead of apply would let the proposer cut more, smaller batches while the
        apply is behind: measured, the per-batch cost then outgrew the load at 75 % of peak and latency ran
        away (p50 0.9 s). Held until applied, the batches grow with the load as they did before.
        """

        def done(index, error) -> None:
            if error == FAIL_REASON.SUCCESS and isinstance(index, int):
                self._apply_thread.after_applied(index, functools.partial(callback, True, _fail_reason_name(error)))
                return
            callback(error == FAIL_REASON.SUCCESS, _fail_reason_name(error))

        self._syncobj._applyCommand(command_type_regular + batch_bytes, done, None)

    # Status ---------------------------------------------------------------------------------------------

    @property
    def status(self) -> RaftStatus:
        return self._status

    def is_leader(self) -> bool:
        return self._syncobj._isLeader()

    def leader_name(self) -> str | None:
        leader = self._syncobj._getLeader()
        return None if leader is None else self._name_by_address.get(leader.id)

    def destroy(self) -> None:
        self._syncobj.destroy_synchronous()
        # A snapshot being written may wait for the apply thread: let it finish before that thread stops.
        if self._snapshots is not None and not self._snapshots.wait_for_write(apply_stop_seconds_max):
            logger.error("a snapshot was still being written after %.0f s; it is left unfinished",
                         apply_stop_seconds_max)
        # What is queued is committed and in the journal: applying it now only saves a replay at the next start.
        if not self._apply_thread.stop(apply_stop_seconds_max):
            logger.error("the apply thread did not finish within %.0f s; its entries replay at the next start",
                         apply_stop_seconds_max)
        self._journal._destroy()

    def _refresh_status(self) -> None:
        now = monotonic_time()
        if now - self._status_refreshed < status_refresh_seconds:
            return
        self._status_refreshed = now
        status = self._syncobj.getStatus()
        leader = status["leader"]
        if self._node.role is NodeRole.INSTITUTION:
            role = "replica"
        else:
            role = _state_names.get(status["state"], "follower")
        connected = []
        match = []
        for address, name in self._name_by_address.items():
            if status.get(f"partner_node_status_server_{address}") == 2:
                connected.append(name)
            if f"match_idx_server_{address}" in status:
                match.append((name, status[f"match_idx_server_{address}"]))
        leader_name = None if leader is None else self._name_by_address.get(leader.id)
        if leader_name != self._status.leader:
            self._events.leader_changed(self._status.leader, leader_name, status["raft_term"])
        contact = time.time() if role == "leader" else self._leader_contact
        self._status = RaftStatus(
            leader_last_contact_unix_seconds=None if leader_name is None else contact,
            role=role,
            term=status["raft_term"],
            leader=leader_name,
            commit_index=status["commit_idx"],
            last_log_index=self._journal.last_index,
            raft_applied_index=status["last_applied"],
            has_quorum=status["has_quorum"],
            connected_peers=tuple(sorted(connected)),
            match_index=tuple(sorted(match)),
            recovering_until_index=self._journal.recovery_floor_index,
            ready=self._syncobj.isReady(),
        )

    def _on_state_changed(self, old_state: int, new_state: int) -> None:
        leader = _state_names.get(new_state) == "leader"
        self._apply_thread.grouping = leader_grouping if leader else follower_grouping
        if self._node.role is NodeRole.VALIDATOR:
            self._events.role_changed(_state_names.get(old_state, "?"), _state_names.get(new_state, "?"))

    # Apply ----------------------------------------------------------------------------------------------

    def _apply(self, group: list[tuple[int, bytes]]) -> None:
        """Apply committed entries in one LMDB transaction: all of them are durable, or none (a crash replays
        them from the journal). Their results go out only after the commit."""
        index = group[0][0]
        try:
            # Wait for the batches' signature checks (started as they arrived) before taking LMDB's write lock.
            for index, command in group:
                if command[:1] == command_type_regular:
                    self._events.before_apply(command[1:])
            started = monotonic_time()
            batches: list[AppliedBatch] = []
            with self._apply_lock:
                with self._store.write() as transaction:
                    for index, command in group:
                        if command[:1] != command_type_regular:
                            apply_no_op(transaction, index)
                            continue
                        applied = apply_batch(
                            transaction, index, command[1:], self._verify, self._genesis.cluster_id, decoded=self._decoded
                        )
                        if applied is not None:
                            self._events.before_commit(transaction, applied)
                            batches.append(applied)
                    committing = monotonic_time()
                committed = monotonic_time()
                self._events.after_commit()
            self._events.applied(batches, committed - started, committed - committing)
        except BaseException as error:  # noqa: BLE001 - any failure here must stop the node, not wedge it
            hint = full_disk_hint(self._store.path, error)
            logger.critical("apply of index %d failed; stopping: %r%s", index, error, hint, exc_info=True)
            self._events.fatal(f"apply of raft index {index} failed: {error!r}{hint}")
            raise

    # Snapshots ------------------------------------------------------------------------------------------

    def _serialize(self, file_name: str, raft_data) -> None:
        """Write the snapshot pysyncobj asked for (on the snapshot thread, see _BackgroundSnapshots)."""
        last_entry, previous_entry, _cluster = raft_data
        # pysyncobj drops the journal up to `last_entry` once the file is in place: the state must hold it.
        # The state may be further on by the time it is copied (the apply goes on): applied entries are
        # committed, and whoever loads the snapshot skips the indexes it already holds.
        self._apply_thread.wait_until(lambda: self._store.summary().applied_index >= last_entry[1])
        path = Path(file_name)
        temporary = path.with_name(path.name + ".writing")
        started = monotonic_time()
        with self._store.read() as transaction:
            summary = transaction.summary()
            header = SnapshotHeader(
                cluster_id=self._genesis.cluster_id,
                last_entry=tuple(last_entry),
                previous_entry=tuple(previous_entry),
                voters=tuple(str(v.raft_address) for v in self._genesis.validators),
                applied_index=summary.applied_index,
                state_hash=summary.state_hash,
            )
            write_snapshot(temporary, self._store, header, as_of=transaction)
        os.replace(temporary, path)
        sync_directory(path.parent)  # the rename must survive a crash before pysyncobj drops the journal
        self._events.snapshot_written(monotonic_time() - started, path.stat().st_size)
        logger.info("wrote snapshot at raft index %d (state applied to %d)", last_entry[1], summary.applied_index)

    def _deserialize(self, file_name: str):
        """Called by pysyncobj at start-up and when a leader sends a snapshot. Rolls forward only."""
        self._apply_thread.drain()  # entries handed over before the snapshot arrived apply first, in order
        with self._apply_lock:
            applied_before = self._store.summary().applied_index
            path = Path(file_name)
            started = monotonic_time()
            header, installed = restore_from_snapshot(
                path, self._store, self._genesis.cluster_id, verified=self._read_snapshot_header(path)
            )
            seconds = monotonic_time() - started
        if installed:
            self._events.snapshot_installed(seconds)
            # The state's own applied index before (the log prefix shows pysyncobj's, which can differ).
            logger.warning("installed snapshot: state now at index %d (was at %d), %.1f MiB in %.1f s",
                           header.applied_index, applied_before, self._store.used_bytes() / (1 << 20), seconds)
        else:
            logger.info("ignoring snapshot at index %d: the state is already at or past it", header.applied_index)
        voters = {TCPNode(address) for address in header.voters}
        return (header.last_entry, header.previous_entry, voters)

    def _turns_down_received_snapshot(self, path: Path) -> bool:
        """True for a received snapshot older than our own: our journal starts past its previous entry, so it
        no longer holds the entries the snapshot ends with. pysyncobj would put the older file in place of ours
        and replace the journal with its two entries, dropping entries we acknowledged (maybe counted toward a
        commit) until the leader sent them again. Turned down, the leader's next append finds where our logs
        match (pysyncobj answers "retry from the end of your log" to an append our journal cannot place).
        Our journal's first two entries are our own snapshot's, which the state covers."""
        try:
            header, _offset, _length = self._read_snapshot_header(path)
        except SnapshotError:
            return False  # _deserialize reports it
        journal = self._journal
        if len(journal) < 2 or header.previous_entry[1] >= journal.first_index:
            return False
        logger.warning(
            "a snapshot at index %d was sent to us, older than ours at index %d; kept ours and the journal "
            "(indexes %d to %d)", header.last_entry[1], journal[1][1], journal.first_index, journal.last_index,
        )
        return True

    def _keep_log_after_received_snapshot(self) -> int | None:
        """For a snapshot just received: when the journal holds its last two entries (same index, term and
        bytes) and more after them, drop only what precedes them and return the snapshot's last index, so
        pysyncobj keeps the rest; None when the whole journal is to be replaced."""
        try:
            header, _offset, _length = self._read_snapshot_header(self._snapshot_path)
        except SnapshotError:
            return None  # _deserialize reports it
        previous, last = tuple(header.previous_entry), tuple(header.last_entry)
        journal = self._journal
        previous_position = previous[1] - journal.first_index
        if journal.last_index <= last[1] or previous_position < 0:
            return None
        if tuple(journal[previous_position]) != previous or tuple(journal[previous_position + 1]) != last:
            return None
        kept = journal.last_index - last[1]
        journal.deleteEntriesTo(previous_position)
        logger.warning("snapshot at index %d received; the journal holds it and keeps the %d entries after it",
                       last[1], kept)
        return last[1]

    def _read_snapshot_header(self, path: Path) -> tuple[SnapshotHeader, int, int]:
        """read_header, once per file: the same path, inode, size and modification time is not read again (a
        snapshot written or received replaces the file, so it is a new one)."""
        try:
            status = path.stat()
        except OSError:
            return read_header(path)  # raises SnapshotError naming what is wrong
        identity = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
        if self._verified_snapshot is not None and self._verified_snapshot[0] == identity:
            return self._verified_snapshot[1]
        verified = read_header(path)
        self._verified_snapshot = (identity, verified)
        return verified

    def _repair_damaged_snapshot(self) -> None:
        """A damaged local snapshot file would leave pysyncobj unable to find where its log starts; when the
        state already covers the log's first entries, write a fresh snapshot from the state instead."""
        if not self._snapshot_path.exists():
            return
        try:
            self._read_snapshot_header(self._snapshot_path)
            return
        except SnapshotError as error:
            problem = error
        applied = self._store.summary().applied_index
        if len(self._journal) >= 2 and self._journal[1][1] <= applied:
            logger.error("snapshot file is damaged (%s); rewriting it from the state at index %d", problem, applied)
            self._serialize(str(self._snapshot_path), (self._journal[1], self._journal[0], None))
            return
        self._events.fatal(
            f"snapshot file {self._snapshot_path} is damaged ({problem}) and the state does not cover the log "
            "start; restore this node's data directory from a healthy peer"
        )


# Below this much free space, an I/O error from LMDB is most likely a write cut short by a full disk.
full_disk_free_bytes_max = 1 << 20


def full_disk_hint(path: Path, error: BaseException, remedy: str = "free space, then restart") -> str:
    """For an I/O error on a file system that is (nearly) full, what to tell the operator: LMDB reports a write
    the full disk cut short as EIO, which reads like failing hardware. Empty for any other error."""
    if not ("Input/output error" in str(error) or (isinstance(error, OSError) and error.errno == errno.EIO)):
        return ""
    try:
        status = os.statvfs(path)
    except OSError:
        return ""
    free_bytes = status.f_bavail * status.f_frsize
    if free_bytes >= full_disk_free_bytes_max:
        return ""
    return (f"; the file system holding {path} has {free_bytes} bytes free: most likely a write cut short by a "
            f"full disk (No space left on device), which LMDB reports as an I/O error; {remedy}")


def _fail_reason_name(code) -> str:
    names = {value: name.lower() for name, value in vars(FAIL_REASON).items() if not name.startswith("_")}
    return names.get(code, f"reason_{code}")
