"""Three in-process RaftNodes over real sockets: durability order of acknowledgements and votes."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from config.schema import Address, Currency, Genesis, Institution, NodeRole, NodeSpec, RaftConfig, Role
from consensus.batch import Batch, encode_batch
from consensus.entries import OpenAccount, sign_entry, signature_is_valid
from consensus.raft import journal as journal_module
from consensus.raft import adapter as adapter_module
from consensus.raft import snapshot as snapshot_module
from consensus.raft.adapter import RaftEvents, RaftNode
from consensus.raft.apply_thread import leader_grouping
from consensus.raft.snapshot import read_header
from consensus.raft.transport import SecureTransport
from storage.rules import initialize
from storage.state import LedgerStore
from tests.waiting import wait_until

wait_seconds = 20.0
raft = RaftConfig(
    election_timeout_min_ms=400,
    election_timeout_max_ms=800,
    heartbeat_interval_ms=50,
    connection_timeout_ms=2000,
    connection_retry_ms=100,
    leader_fallback_timeout_ms=1500,
    log_compaction_entries=10_000,
    log_compaction_interval_seconds=3600,
)


class _Events(RaftEvents):
    def __init__(self) -> None:
        self.applied_indexes: list[int] = []
        self.transaction_batches: list[int] = []  # batches per apply transaction
        self.apply_allowed = threading.Event()  # cleared by a test to hold this node's apply
        self.apply_allowed.set()

    def applied(self, batches, transaction_seconds, commit_seconds) -> None:
        self.applied_indexes.extend(batch.index for batch in batches)
        self.transaction_batches.append(len(batches))

    def before_apply(self, batch_bytes: bytes) -> None:
        if not self.apply_allowed.wait(wait_seconds):
            raise AssertionError("the test never released the apply")

    def fatal(self, message: str) -> None:
        raise AssertionError(message)


def _ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for listener in sockets:
        listener.bind(("127.0.0.1", 0))
    ports = [listener.getsockname()[1] for listener in sockets]
    for listener in sockets:
        listener.close()
    return ports


def _wait(condition, what: str) -> None:
    wait_until(condition, wait_seconds, what)


@pytest.fixture
def node_keys() -> list[SigningKey]:
    """The validators' keys, for a test that restarts one of them."""
    return [SigningKey.generate() for _ in range(3)]


@pytest.fixture
def network(tmp_path: Path, monkeypatch, node_keys):
    """Three validators in this process, with every send recorded alongside the journal's state."""
    sends: list[dict] = []
    lock = threading.Lock()
    original_send = SecureTransport.send

    def recording_send(self, node, message):
        journal = self._before_send.__self__._journal  # the RaftNode's journal, via its bound _sync_journal
        entry = {"type": message.get("type") if isinstance(message, dict) else None,
                 "dirty_before": journal.dirty, "message": message}
        result = original_send(self, node, message)
        entry["dirty_after"] = journal.dirty
        if entry["type"] == "response_vote":
            meta_path = journal._directory / journal_module.meta_file_name
            entry["meta_on_disk"] = journal_module.decode_meta(meta_path.read_bytes(), meta_path)
        with lock:
            sends.append(entry)
        return result

    monkeypatch.setattr(SecureTransport, "send", recording_send)
    institution_key = SigningKey.generate()
    ports = _ports(9)
    specs = tuple(
        NodeSpec(f"v{number + 1}", NodeRole.VALIDATOR, None, Address("127.0.0.1", ports[3 * number]),
                 Address("127.0.0.1", ports[3 * number + 1]), Address("127.0.0.1", ports[3 * number + 2]),
                 bytes(node_keys[number].verify_key))
        for number in range(3)
    )
    genesis = Genesis(1, "tonle-adapter-test", (Currency("KHR", 0),),
                      (Institution("nbc", "NBC", Role.CENTRAL_BANK, bytes(institution_key.verify_key)),), specs, ())
    nodes, stores, events = [], [], []
    for number, spec in enumerate(specs):
        store = LedgerStore(tmp_path / spec.name / "state", map_size_bytes=64 << 20)
        with store.write() as transaction:
            initialize(transaction, genesis)
        event_sink = _Events()
        nodes.append(RaftNode(genesis=genesis, node=spec, node_key=node_keys[number], data_dir=tmp_path / spec.name,
                              raft_config=raft, store=store, verify=signature_is_valid, events=event_sink))
        stores.append(store)
        events.append(event_sink)
    yield nodes, stores, events, sends, genesis, institution_key
    for sink in events:
        sink.apply_allowed.set()
    for node in nodes:
        try:
            node.destroy()
        except Exception:  # noqa: BLE001 - a node destroyed by the test already
            pass
    for store in stores:
        store.close()


@pytest.fixture
def handovers(monkeypatch) -> list[tuple[int, bool]]:
    """(index, whether the node's journal held unsynced entries) for every entry a node hands to its apply."""
    recorded: list[tuple[int, bool]] = []
    lock = threading.Lock()
    original = adapter_module._LedgerSyncObj._SyncObj__doApplyCommand

    def recording_hand_over(self, command):
        dirty = self._owner._journal.dirty
        index = original(self, command)
        with lock:
            recorded.append((index, dirty))
        return index

    monkeypatch.setattr(adapter_module._LedgerSyncObj, "_SyncObj__doApplyCommand", recording_hand_over)
    return recorded


def _leader(nodes) -> RaftNode:
    _wait(lambda: sum(node.is_leader() for node in nodes) == 1, "a leader")
    return next(node for node in nodes if node.is_leader())


def test_the_leader_sends_entries_before_its_own_fsync_yet_no_node_applies_an_entry_not_on_its_disk(
    handovers, network
):
    nodes, stores, events, sends, genesis, key = network
    last = _propose_accounts(_leader(nodes), genesis, key, [f"a{number}" for number in range(20)])
    _wait(lambda: all(store.summary().applied_index >= last for store in stores), "every node to apply")
    # The leader's disk and the followers' work at once (Raft thesis 10.2.1)...
    appends = [send for send in sends if send["type"] == "append_entries" and send["message"].get("entries")]
    assert any(send["dirty_after"] for send in appends), "the leader's entries waited for its own fsync"
    # ...but the leader counts its own copy toward commit only once synced, so nothing reaches an apply unsynced.
    assert len(handovers) >= 3 * 20
    assert not [index for index, dirty in handovers if dirty]


def test_followers_acknowledge_entries_only_after_their_journal_is_durable_and_votes_after_the_vote_is(network):
    nodes, stores, events, sends, genesis, key = network
    leader = _leader(nodes)
    last = _propose_accounts(leader, genesis, key, [f"a{number}" for number in range(20)])
    _wait(lambda: all(store.summary().applied_index >= last for store in stores), "every node to apply")
    acknowledgements = [send for send in sends if send["type"] == "next_node_idx" and send["message"]["success"]]
    assert acknowledgements, "no follower acknowledged anything"
    assert all(not send["dirty_after"] for send in acknowledgements)

    # Force an election: every vote granted must already be on disk when the grant is sent.
    leader.destroy()
    survivors = [node for node in nodes if node is not leader]
    _wait(lambda: sum(node.is_leader() for node in survivors) == 1, "a new leader")
    votes = [send for send in sends if send["type"] == "response_vote"]
    assert votes, "no vote was granted"
    for vote in votes:
        assert vote["meta_on_disk"].term == vote["message"]["term"]
        assert vote["meta_on_disk"].voted_for is not None


def test_the_apply_records_every_raft_index_once(network):
    nodes, stores, events, sends, genesis, key = network
    leader = _leader(nodes)
    entry = sign_entry(OpenAccount("once@nbc", "KHR"), cluster_id=genesis.cluster_id, signer="nbc", signing_key=key)
    leader.propose(encode_batch(Batch(1, None, (entry,))), lambda committed, reason: None)
    _wait(lambda: all(sink.applied_indexes for sink in events), "the batch to apply everywhere")
    for sink in events:
        assert len(sink.applied_indexes) == len(set(sink.applied_indexes))
    _wait(lambda: len({store.summary() for store in stores}) == 1, "identical state on every node")


def test_a_resend_after_the_leader_rewinds_next_index_never_cuts_a_followers_log(network, monkeypatch):
    nodes, stores, events, sends, genesis, key = network
    leader = _leader(nodes)

    def propose(names):
        for name in names:
            entry = sign_entry(OpenAccount(f"{name}@nbc", "KHR"), cluster_id=genesis.cluster_id, signer="nbc", signing_key=key)
            leader.propose(encode_batch(Batch(1, None, (entry,))), lambda committed, reason: None)
        target = leader._journal.last_index
        _wait(lambda: all(store.summary().applied_index >= target for store in stores), "every node to apply")

    propose([f"before{number}" for number in range(20)])
    cuts: list[int] = []
    original_truncate = journal_module.DurableJournal._truncate_after

    def recording_truncate(self, position):
        cuts.append(position)
        return original_truncate(self, position)

    monkeypatch.setattr(journal_module.DurableJournal, "_truncate_after", recording_truncate)
    # What pysyncobj's leader sends after it rewinds nextIndex (a reconnect, a failed append): entries the
    # follower already holds, from an older index. Delivered in the follower's tick thread, as the transport does.
    follower = next(node for node in nodes if node is not leader)
    journal = follower._journal
    delivered: list[object] = []

    def deliver_resend() -> None:
        if delivered:
            return
        try:
            syncobj = follower._syncobj
            held = journal.last_index
            first = held - 15
            entries = [tuple(entry) for entry in journal[first - journal.first_index:held - 4 - journal.first_index]]
            syncobj._SyncObj__onMessageReceived(syncobj._SyncObj__raftLeader, {
                "type": "append_entries", "term": journal.term_at(held), "commit_index": held,
                "prevLogIdx": first - 1, "prevLogTerm": journal.term_at(first - 1), "entries": entries,
            })
            delivered.append(journal.last_index == held)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            delivered.append(error)

    follower._syncobj.addOnTickCallback(deliver_resend)
    _wait(lambda: delivered, "the resend to be delivered")
    assert delivered == [True], "the follower's log got shorter"
    propose([f"after{number}" for number in range(5)])
    assert cuts == [], "a follower cut entries it had acknowledged"
    _wait(lambda: len({node._journal.last_index for node in nodes}) == 1, "every journal to end at one index")
    _wait(lambda: len({store.summary() for store in stores}) == 1, "identical state on every node")


def _isolate(monkeypatch, isolated_node: RaftNode) -> list[bool]:
    """Cut `isolated_node` off both ways (what iptables does in tests/faults) until the test sets the returned
    flag to False."""
    isolated = [True]
    address = str(isolated_node._node.raft_address)
    sending = SecureTransport.send

    def partitioned_send(self, node, message):
        sender = self._before_send.__self__
        if isolated[0] and (sender is isolated_node or getattr(node, "address", None) == address):
            return None
        return sending(self, node, message)

    monkeypatch.setattr(SecureTransport, "send", partitioned_send)
    return isolated


def test_a_deposed_leader_with_uncommitted_entries_finds_where_its_log_matches_and_catches_up(network, monkeypatch):
    nodes, stores, events, sends, genesis, key = network
    old = _leader(nodes)
    counter = iter(range(1_000_000))

    def propose_on(leader, batches: int, entries_per_batch: int) -> None:
        for _ in range(batches):
            entries = tuple(
                sign_entry(OpenAccount(f"acct{next(counter)}@nbc", "KHR"), cluster_id=genesis.cluster_id, signer="nbc",
                           signing_key=key)
                for _ in range(entries_per_batch)
            )
            leader.propose(encode_batch(Batch(1, None, entries)), lambda committed, reason: None)

    propose_on(old, 5, 1)
    _wait(lambda: len({store.summary().applied_index for store in stores}) == 1, "every node to apply")
    # A partition around the leader: it keeps appending proposals it can no longer commit, while the others
    # elect a new leader and move on.
    isolated = _isolate(monkeypatch, old)
    propose_on(old, 6, 1)
    others = [node for node in nodes if node is not old]
    _wait(lambda: sum(node.is_leader() for node in others) == 1, "a new leader among the others")
    new = next(node for node in others if node.is_leader())
    # More than one append's worth of log (append_entries_batch_bytes) past the point where the logs part, so
    # the new leader streams several appends to the old one in one tick.
    propose_on(new, 40, 20)
    new_stores = [stores[nodes.index(node)] for node in others]
    target = new._journal.last_index
    _wait(lambda: all(store.summary().applied_index >= target for store in new_stores), "the new majority to apply")
    assert old._journal.last_index > stores[nodes.index(old)].summary().applied_index, "the old leader holds no suffix"
    isolated[0] = False
    _wait(lambda: len({store.summary() for store in stores}) == 1, "the old leader to catch up with the same state")


def test_a_deposed_leader_never_applies_its_own_uncommitted_entries_while_a_snapshot_arrives(network, monkeypatch):
    """pysyncobj raised a follower's commit index to its log's end on every snapshot chunk: a deposed leader
    applied entries of its own term that the new leader never committed (docs/faults.md finding 6)."""
    nodes, stores, events, sends, genesis, key = network
    old = _leader(nodes)
    before = _propose_accounts(old, genesis, key, [f"before{number}" for number in range(5)])
    _wait(lambda: all(store.summary().applied_index >= before for store in stores), "every node to apply")
    old_store = stores[nodes.index(old)]
    isolated = _isolate(monkeypatch, old)
    committed_before = old._syncobj.raftCommitIndex
    assert committed_before >= before
    _propose_accounts(old, genesis, key, [f"lost{number}" for number in range(6)])
    others = [node for node in nodes if node is not old]
    _wait(lambda: sum(node.is_leader() for node in others) == 1, "a new leader among the others")
    new = next(node for node in others if node.is_leader())
    target = _propose_accounts(new, genesis, key, [f"kept{number}" for number in range(20)])
    _wait(lambda: new._syncobj.raftCommitIndex >= target, "the new leader to commit")
    assert old._journal.last_index > committed_before, "the old leader holds no uncommitted suffix"
    # The first chunk of a snapshot from the new leader, delivered in the old leader's tick thread as the
    # transport does; the rest of the snapshot never comes (the partition).
    new_node = next(node for node in old._syncobj._SyncObj__otherNodes if node.address == str(new._node.raft_address))
    ticks: list[object] = []

    def deliver_chunk_then_count_ticks() -> None:
        if not ticks:
            try:
                old._syncobj._SyncObj__onMessageReceived(new_node, {
                    "type": "append_entries", "term": new._syncobj.raftCurrentTerm,
                    "commit_index": new._syncobj.raftCommitIndex, "serialized": (b"first chunk", True, False),
                })
            except Exception as error:  # noqa: BLE001 - reported by the assertion below
                ticks.append(error)
        ticks.append(old._syncobj.raftCommitIndex)

    old._syncobj.addOnTickCallback(deliver_chunk_then_count_ticks)
    _wait(lambda: len(ticks) >= 20, "twenty ticks of the old leader after the chunk")
    assert not any(isinstance(tick, Exception) for tick in ticks), ticks
    assert max(ticks) <= committed_before, "the chunk raised the commit index over the old leader's own entries"
    assert old_store.summary().applied_index <= committed_before, "the old leader applied entries nobody committed"
    isolated[0] = False
    _wait(lambda: len({store.summary() for store in stores}) == 1, "the old leader to catch up with the same state")


def test_a_follower_behind_the_leaders_journal_installs_its_snapshot_and_counts_it_as_committed(network, monkeypatch):
    nodes, stores, events, sends, genesis, key = network
    leader = _leader(nodes)
    behind = next(node for node in nodes if node is not leader)
    behind_address = str(behind._node.raft_address)
    # "isolated", then "snapshot only" (once the leader starts its snapshot, its appends to the follower are
    # held back, so nothing but the snapshot moves the follower's commit index), then "open".
    phase = ["isolated"]
    snapshot_sent = threading.Event()
    sending = SecureTransport.send

    def partitioned_send(self, node, message):
        sender = self._before_send.__self__
        to_behind = getattr(node, "address", None) == behind_address
        if phase[0] == "isolated" and (sender is behind or to_behind):
            return None
        if phase[0] == "snapshot only" and to_behind and isinstance(message, dict):
            if "serialized" in message:
                snapshot_sent.set()
            elif snapshot_sent.is_set() and "prevLogIdx" in message:
                return None
        return sending(self, node, message)

    monkeypatch.setattr(SecureTransport, "send", partitioned_send)
    target = _propose_accounts(leader, genesis, key, [f"while-away{number}" for number in range(30)])
    leader_store = stores[nodes.index(leader)]
    _wait(lambda: leader_store.summary().applied_index >= target, "the leader to apply")
    leader._syncobj.forceLogCompaction()
    _wait(lambda: leader._journal.first_index > behind._journal.last_index + 1, "the leader to drop what the follower lacks")
    seen: list[tuple[int, int]] = []
    behind._syncobj.addOnTickCallback(lambda: seen.append((behind._syncobj.raftCommitIndex, behind._syncobj.raftLastApplied)))
    phase[0] = "snapshot only"
    installed = leader._journal.first_index
    _wait(lambda: sum(applied >= installed for _commit, applied in seen) >= 5, "five ticks of the follower after the install")
    assert all(commit >= applied for commit, applied in seen), f"the commit index lagged the applied one: {sorted(set(seen))}"
    phase[0] = "open"
    behind_store = stores[nodes.index(behind)]
    _wait(lambda: behind_store.summary() == leader_store.summary(), "the follower to catch up with the leader's state")
    assert behind._journal.first_index > 1, "the follower caught up from the journal, not from a snapshot"


def test_a_leader_counts_only_answers_to_appends_of_its_own_term(network):
    """pysyncobj's answers carry no term: one sent to this node as leader of an earlier term, for entries its
    log may since have replaced, would count toward committing entries of its current term."""
    nodes, stores, events, sends, genesis, key = network
    leader = _leader(nodes)
    _propose_accounts(leader, genesis, key, ["first"])
    syncobj = leader._syncobj
    follower = next(node for node in syncobj._SyncObj__otherNodes)
    outcomes: list[object] = []

    def deliver_answers() -> None:
        if outcomes:
            return
        try:
            term, beyond = syncobj.raftCurrentTerm, leader._journal.last_index + 50
            answer = {"type": "next_node_idx", "next_node_idx": beyond + 1, "reset": False, "success": True}
            syncobj._SyncObj__onMessageReceived(follower, dict(answer, term=term - 1))
            outcomes.append(syncobj._SyncObj__raftMatchIndex[follower] < beyond)
            syncobj._SyncObj__onMessageReceived(follower, dict(answer, term=term))
            outcomes.append(syncobj._SyncObj__raftMatchIndex[follower] == beyond)
            # Undo the test's own answer, which claimed entries the leader does not have yet.
            syncobj._SyncObj__raftMatchIndex[follower] = leader._journal.last_index
            syncobj._SyncObj__raftNextIndex[follower] = leader._journal.last_index + 1
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            outcomes.append(error)

    syncobj.addOnTickCallback(deliver_answers)
    _wait(lambda: outcomes, "the answers to be delivered")
    assert outcomes == [True, True], "an answer of an earlier term was counted, or one of this term was not"
    _propose_accounts(leader, genesis, key, ["after"])
    _wait(lambda: len({store.summary() for store in stores}) == 1, "identical state on every node")


def _leader_with_a_snapshot(nodes, stores, genesis, key) -> tuple[RaftNode, int]:
    """Ten entries applied everywhere, then the leader compacts; the leader and its snapshot's last index."""
    leader = _leader(nodes)
    early = _propose_accounts(leader, genesis, key, [f"early{number}" for number in range(10)])
    _wait(lambda: all(store.summary().applied_index >= early for store in stores), "every node to apply")
    leader._syncobj.forceLogCompaction()
    _wait(lambda: leader._journal.first_index > 1, "the leader to compact its journal")
    return leader, read_header(leader._snapshot_path)[0].last_entry[1]


def _rewind_to_the_start_and_record_cuts(monkeypatch, leader: RaftNode, follower: RaftNode) -> tuple[list[int], threading.Event]:
    """Rewind the leader's next index for `follower` to 1, in the leader's tick thread (what a stale "retry
    from" answer does), so the leader sends its snapshot; returns the positions the follower's journal is cut
    at from now on, and an event to set once the snapshot arrived. It rewinds at every tick until then: rewound
    once, an answer to an append already in flight could set the index back before the leader sent anything
    (CI saw both tests below wait 20 s for a snapshot that was never sent)."""
    cuts: list[int] = []
    original_truncate = journal_module.DurableJournal._truncate_after

    def recording_truncate(self, position):
        if self is follower._journal:
            cuts.append(position)
        return original_truncate(self, position)

    monkeypatch.setattr(journal_module.DurableJournal, "_truncate_after", recording_truncate)
    follower_node = next(
        node for node in leader._syncobj._SyncObj__otherNodes if node.address == str(follower._node.raft_address)
    )
    arrived = threading.Event()

    def rewind_until_arrived() -> None:
        if not arrived.is_set():
            leader._syncobj._SyncObj__raftNextIndex[follower_node] = 1

    leader._syncobj.addOnTickCallback(rewind_until_arrived)
    return cuts, arrived


def test_a_follower_past_the_leaders_snapshot_keeps_the_entries_after_it_when_it_is_sent_one(network, monkeypatch):
    """A stale answer can rewind the leader's next index for a follower below the start of its log (research
    B6); the leader then sends its snapshot to a follower already past it. pysyncobj cleared the follower's
    whole log, entries it had acknowledged included; Raft keeps the entries after the snapshot's last one."""
    nodes, stores, events, sends, genesis, key = network
    leader, snapshot_index = _leader_with_a_snapshot(nodes, stores, genesis, key)
    late = _propose_accounts(leader, genesis, key, [f"late{number}" for number in range(10)])
    follower = next(node for node in nodes if node is not leader)
    _wait(lambda: follower._journal.last_index >= late, "the follower to hold the later entries")
    held = follower._journal.last_index
    assert held > snapshot_index + 1
    cuts, arrived = _rewind_to_the_start_and_record_cuts(monkeypatch, leader, follower)
    _wait(lambda: follower._journal.first_index == snapshot_index - 1, "the follower to take the leader's snapshot")
    arrived.set()
    assert cuts == [], "the follower cut its log on a snapshot it already held"
    assert follower._journal.last_index >= held, "the follower dropped entries it had acknowledged"
    last = _propose_accounts(leader, genesis, key, ["after"])
    _wait(lambda: all(store.summary().applied_index >= last for store in stores), "every node to apply")
    _wait(lambda: len({store.summary() for store in stores}) == 1, "identical state on every node")


def test_a_follower_whose_own_snapshot_is_newer_than_the_leaders_keeps_its_snapshot_and_journal(
    network, node_keys, monkeypatch, tmp_path, caplog
):
    """The same rewind, but the follower has compacted past the leader's snapshot: its journal no longer holds
    the snapshot's last entry. pysyncobj installed the older snapshot over the follower's own and replaced its
    journal with the older one's two entries, dropping entries it had acknowledged; the follower turns it down
    and the leader finds where their logs match by the usual appends."""
    nodes, stores, events, sends, genesis, key = network
    caplog.set_level(logging.INFO, logger="tonle.raft")
    leader, leaders_snapshot_index = _leader_with_a_snapshot(nodes, stores, genesis, key)
    middle = _propose_accounts(leader, genesis, key, [f"middle{number}" for number in range(10)])
    follower = next(node for node in nodes if node is not leader)
    number = nodes.index(follower)
    _wait(lambda: stores[number].summary().applied_index >= middle, "the follower to apply")
    follower._syncobj.forceLogCompaction()
    _wait(lambda: follower._journal.first_index > leaders_snapshot_index, "the follower to compact past the leader")
    own_snapshot_index = read_header(follower._snapshot_path)[0].last_entry[1]
    late = _propose_accounts(leader, genesis, key, [f"late{number}" for number in range(10)])
    _wait(lambda: follower._journal.last_index >= late, "the follower to hold the later entries")
    first, held = follower._journal.first_index, follower._journal.last_index
    cuts, arrived = _rewind_to_the_start_and_record_cuts(monkeypatch, leader, follower)
    _wait(lambda: "older than ours" in caplog.text or f"ignoring snapshot at index {leaders_snapshot_index}" in caplog.text,
          "the follower to be sent the leader's snapshot")
    arrived.set()
    assert cuts == [], "the follower cut its log on an older snapshot"
    assert (follower._journal.first_index, follower._journal.last_index) >= (first, held), (
        "the follower dropped entries it had acknowledged"
    )
    assert read_header(follower._snapshot_path)[0].last_entry[1] == own_snapshot_index, (
        "the follower's own snapshot was replaced by an older one"
    )
    last = _propose_accounts(leader, genesis, key, ["after"])
    _wait(lambda: all(store.summary().applied_index >= last for store in stores), "every node to apply")
    _wait(lambda: len({store.summary() for store in stores}) == 1, "identical state on every node")
    # Its snapshot and journal still fit together: restarted, it goes on from them.
    follower.destroy()
    restarted = RaftNode(genesis=genesis, node=follower._node, node_key=node_keys[number],
                         data_dir=tmp_path / follower._node.name, raft_config=raft, store=stores[number],
                         verify=signature_is_valid, events=events[number])
    nodes[number] = restarted  # the fixture destroys it
    assert restarted._journal.first_index == follower._journal.first_index
    last = _propose_accounts(_leader(nodes), genesis, key, ["after-restart"])
    _wait(lambda: all(store.summary().applied_index >= last for store in stores), "every node to apply")
    _wait(lambda: len({store.summary() for store in stores}) == 1, "identical state on every node")


def _propose_accounts(leader: RaftNode, genesis, key, names: list[str]) -> int:
    """Propose one batch per name; returns the leader's log index of the last, once it is in the log."""
    first = leader._journal.last_index + 1
    for name in names:
        entry = sign_entry(OpenAccount(f"{name}@nbc", "KHR"), cluster_id=genesis.cluster_id, signer="nbc", signing_key=key)
        leader.propose(encode_batch(Batch(1, None, (entry,))), lambda committed, reason: None)
    last = first + len(names) - 1
    _wait(lambda: leader._journal.last_index >= last, "the leader to append the proposals")
    return last


def test_the_leader_goes_on_committing_while_its_apply_is_held(network):
    """pysyncobj applies on its tick thread, between counting acknowledgements and sending the next append:
    a slow apply used to stop replication. The apply thread takes it off that path."""
    nodes, stores, events, sends, genesis, key = network
    leader = _leader(nodes)
    leader_store = stores[nodes.index(leader)]
    events[nodes.index(leader)].apply_allowed.clear()
    held_at = leader_store.summary().applied_index
    target = _propose_accounts(leader, genesis, key, [f"held{number}" for number in range(10)])
    _wait(lambda: leader._syncobj.raftCommitIndex >= target, "the leader to commit while its apply is held")
    assert leader_store.summary().applied_index <= held_at + 1, "the held apply went on"
    followers = [store for store in stores if store is not leader_store]
    _wait(lambda: all(store.summary().applied_index >= target for store in followers), "the followers to apply")
    events[nodes.index(leader)].apply_allowed.set()
    _wait(lambda: len({store.summary() for store in stores}) == 1, "identical state on every node")
    # Ten batches behind, the leader groups them, a few at a time (leader_grouping).
    assert 1 < max(events[nodes.index(leader)].transaction_batches) <= leader_grouping.entries_max


def _follower_holding_its_apply(network, names: list[str]):
    """(follower, its store, its events, last index): a follower whose apply is held with `names` handed to it."""
    nodes, stores, events, sends, genesis, key = network
    leader = _leader(nodes)
    follower = next(node for node in nodes if node is not leader)
    follower_store, follower_events = stores[nodes.index(follower)], events[nodes.index(follower)]
    follower_events.apply_allowed.clear()
    target = _propose_accounts(leader, genesis, key, names)
    _wait(lambda: follower._syncobj.raftLastApplied >= target, "the follower to hand the entries to its apply")
    return follower, follower_store, follower_events, target


def test_batches_waiting_for_a_held_apply_are_applied_together_in_one_transaction_each_once(network):
    stores = network[1]
    _follower, follower_store, follower_events, target = _follower_holding_its_apply(
        network, [f"group{number}" for number in range(6)]
    )
    transactions_before = len(follower_events.transaction_batches)
    follower_events.apply_allowed.set()
    _wait(lambda: follower_store.summary().applied_index >= target, "the follower to apply")
    applied = follower_events.applied_indexes
    assert applied == sorted(set(applied)), "a batch was applied twice or out of order"
    # The held transaction keeps the batches it had taken (how many depends on the ticks that handed them
    # over); every batch that waited behind it goes into the one transaction after it.
    grouped = [count for count in follower_events.transaction_batches[transactions_before:] if count]
    assert sum(grouped) == 6 and len(grouped) <= 2, f"batches per transaction after the hold: {grouped}"
    _wait(lambda: len({store.summary() for store in stores}) == 1, "identical state on every node")


def test_a_snapshot_waits_for_the_apply_so_the_journal_never_drops_an_unapplied_entry(network):
    follower, follower_store, follower_events, target = _follower_holding_its_apply(
        network, [f"snap{number}" for number in range(8)]
    )
    assert follower_store.summary().applied_index < target
    follower._syncobj.forceLogCompaction()
    threading.Timer(0.5, follower_events.apply_allowed.set).start()
    _wait(lambda: follower._snapshot_path.exists(), "the follower to write a snapshot")
    header, _offset, _length = read_header(follower._snapshot_path)
    assert header.last_entry[1] >= target - 1
    assert header.applied_index >= header.last_entry[1], "the snapshot claims entries the state does not hold"


def test_the_leader_goes_on_committing_while_it_writes_a_snapshot_and_keeps_its_journal_until_written(network, monkeypatch):
    """pysyncobj writes snapshots on its tick thread: every node compacts at the same index, and the leader
    stepped down while it copied its state. The write now runs on a thread of its own."""
    nodes, stores, events, sends, genesis, key = network
    leader = _leader(nodes)
    leader_store = stores[nodes.index(leader)]
    before = _propose_accounts(leader, genesis, key, [f"before{number}" for number in range(5)])
    # Compacted before these were applied (a loaded machine), the snapshot would end at the journal's first
    # entry and leave nothing to drop.
    _wait(lambda: leader_store.summary().applied_index >= before, "the leader to apply the first proposals")
    writing, release = threading.Event(), threading.Event()
    real_write = adapter_module.write_snapshot

    def held_write(*arguments, **keywords):
        writing.set()
        if not release.wait(wait_seconds):
            raise AssertionError("the test never released the snapshot write")
        return real_write(*arguments, **keywords)

    monkeypatch.setattr(adapter_module, "write_snapshot", held_write)
    first_before = leader._journal[0][1]
    leader._syncobj.forceLogCompaction()
    try:
        assert writing.wait(wait_seconds), "no snapshot write started"
        target = _propose_accounts(leader, genesis, key, [f"during{number}" for number in range(5)])
        _wait(lambda: leader._syncobj.raftCommitIndex >= target, "the leader to commit while its snapshot is written")
        assert leader.is_leader()
        assert leader._journal[0][1] == first_before, "the journal was compacted before the snapshot was written"
    finally:
        release.set()
    _wait(lambda: leader._journal[0][1] > first_before, "the journal to be compacted once the snapshot is written")
    header, _offset, _length = read_header(leader._snapshot_path)
    assert header.applied_index >= header.last_entry[1]
    assert leader._journal[0][1] <= header.last_entry[1], "the journal lost entries the snapshot does not hold"
    _wait(lambda: len({store.summary() for store in stores}) == 1, "identical state on every node")


def test_a_node_starting_on_a_snapshot_reads_it_once(network, node_keys, monkeypatch, tmp_path, caplog):
    # Start-up checks the local snapshot, then pysyncobj loads it: a state-sized file, verified once.
    nodes, stores, events, sends, genesis, key = network
    leader = _leader(nodes)
    follower = next(node for node in nodes if node is not leader)
    number = nodes.index(follower)
    once = _propose_accounts(leader, genesis, key, [f"once{index}" for index in range(5)])
    # pysyncobj snapshots at its last applied entry, and not at all before two are applied.
    _wait(lambda: stores[number].summary().applied_index >= once, "the follower to apply")
    follower._syncobj.forceLogCompaction()
    _wait(lambda: follower._snapshot_path.exists(), "the follower to write a snapshot")
    follower.destroy()
    caplog.set_level(logging.INFO, logger="tonle.raft")
    reads = []

    def counting(read):
        def wrapper(path):
            reads.append(path)
            return read(path)
        return wrapper

    monkeypatch.setattr(adapter_module, "read_header", counting(adapter_module.read_header))
    monkeypatch.setattr(snapshot_module, "read_header", counting(snapshot_module.read_header))
    restarted = RaftNode(genesis=genesis, node=follower._node, node_key=node_keys[number],
                         data_dir=tmp_path / follower._node.name, raft_config=raft, store=stores[number],
                         verify=signature_is_valid, events=events[number])
    nodes[number] = restarted  # the fixture destroys it
    _wait(lambda: "ignoring snapshot" in caplog.text, "pysyncobj to load the snapshot (older than the state)")
    assert reads == [follower._snapshot_path], reads


class _FullDiskFile:
    """Stands in for pysyncobj's open file of a received snapshot when the disk fills: every write fails."""

    def write(self, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        pass


def test_a_received_snapshot_that_cannot_be_written_leaves_no_partial_file(tmp_path):
    """pysyncobj drops its file object after a failed write but leaves the file, which held disk space on a
    full disk until the next snapshot arrived."""
    snapshots = adapter_module._BackgroundSnapshots(
        lambda file_name, data: None, str(tmp_path / "snapshot.bin"), 1 << 16, lambda file_name: None, lambda path: False
    )
    partial = tmp_path / "snapshot.bin.1.tmp"
    assert snapshots.setTransmissionData((b"first chunk", True, False)) is False
    snapshots._Serializer__incomingTransmissionFile.close()
    assert partial.read_bytes() == b"first chunk"
    snapshots._Serializer__incomingTransmissionFile = _FullDiskFile()
    assert snapshots.setTransmissionData((b"second chunk", False, False)) is False
    assert not partial.exists()
    assert snapshots.setTransmissionData((b"last chunk", False, True)) is False
    assert not partial.exists() and not (tmp_path / "snapshot.bin").exists()
    # The next transmission starts afresh and lands.
    assert snapshots.setTransmissionData((b"whole", True, False)) is False
    assert snapshots.setTransmissionData((b" snapshot", False, True)) is True
    assert (tmp_path / "snapshot.bin").read_bytes() == b"whole snapshot" and not partial.exists()
