"""Tests for the secure Raft transport: real pysyncobj nodes on 127.0.0.1 and raw-socket attackers.

The attackers speak the handshake through an independent implementation written from the spec
(below), so these tests also pin the wire format rather than the module agreeing with itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import nacl.bindings
import nacl.signing
import pytest
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.node import Node
from pysyncobj.syncobj import SyncObjException

from consensus.raft import transport as transport_module
from consensus.raft.transport import (
    InitiatorHandshake,
    PeerIdentity,
    ResponderHandshake,
    SecureTransport,
    TransportConfigError,
    handshake_frame_bytes_max,
    handshake_timeout_seconds,
    peer_frame_bytes_max,
    send_buffer_bytes_max,
    unauthenticated_connections_max,
)
from consensus.raft.wire import encode_message
from tests.waiting import wait_until

cluster_id = "tonle-test-1"
wait_seconds = 10.0
socket_timeout_seconds = 5.0
validator_names = ("v1", "v2", "v3")
acknowledgement = {"type": "next_node_idx", "term": 9, "next_node_idx": 2, "reset": False, "success": False}
# v4 hosts a lone validator, v5 a fake responder written in this file; aba-1 runs as a read-only
# replica of the cluster, aba-2 and aba-3 are identities the tests use to attack or to dial.
node_names = ("v1", "v2", "v3", "v4", "v5", "aba-1", "aba-2", "aba-3")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Genesis:
    keys: dict[str, nacl.signing.SigningKey]
    peers: dict[str, PeerIdentity]

    def address(self, name: str) -> str:
        return self.peers[name].raft_address

    def socket_address(self, name: str) -> tuple[str, int]:
        host, port = self.address(name).rsplit(":", 1)
        return host, int(port)


def make_genesis() -> Genesis:
    keys = {name: nacl.signing.SigningKey.generate() for name in node_names}
    peers = {
        name: PeerIdentity(
            name,
            "institution" if name.startswith("aba") else "validator",
            keys[name].verify_key.encode(),
            f"127.0.0.1:{free_port()}",
        )
        for name in node_names
    }
    return Genesis(keys, peers)


class RecordingObserver:
    """A TransportObserver that keeps every event for the test thread to wait on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[tuple[object, ...]] = []

    def peer_connected(self, name: str, role: str) -> None:
        self._add("peer_connected", name, role)

    def peer_disconnected(self, name: str) -> None:
        self._add("peer_disconnected", name)

    def handshake_refused(self, reason: str, remote: str) -> None:
        self._add("handshake_refused", reason, remote)

    def frame_refused(self, peer: str, reason: str) -> None:
        self._add("frame_refused", peer, reason)

    def message_dropped(self, peer: str, message_type: str, reason: str) -> None:
        self._add("message_dropped", peer, message_type, reason)

    def round_trip_observed(self, peer: str, seconds: float) -> None:
        self._add("round_trip_observed", peer)

    def events(self) -> list[tuple[object, ...]]:
        with self._lock:
            return list(self._events)

    def count(self, event: tuple[object, ...]) -> int:
        return self.events().count(event)

    def wait_for(self, event: tuple[object, ...], timeout_seconds: float = wait_seconds) -> None:
        wait_until(lambda: event in self.events(), timeout_seconds, f"{event} in {self.events()}")

    def _add(self, *event: object) -> None:
        with self._lock:
            self._events.append(event)


class Counter(SyncObj):
    def __init__(
        self,
        self_address: str | None,
        other_addresses: list[str],
        conf: SyncObjConf,
        transport_class: object,
    ) -> None:
        super().__init__(self_address, other_addresses, conf, transportClass=transport_class)
        self.value = 0

    @replicated
    def increment(self) -> int:
        self.value += 1
        return self.value


def make_conf(*, auto_tick: bool = True, election_timeout_seconds: float = 1.0) -> SyncObjConf:
    return SyncObjConf(
        autoTick=auto_tick,
        autoTickPeriod=0.02,
        appendEntriesPeriod=0.05,
        raftMinTimeout=election_timeout_seconds,
        raftMaxTimeout=2 * election_timeout_seconds,
        connectionTimeout=2.5,
        connectionRetryTime=0.2,
        leaderFallbackTimeout=5.0,
        bindRetryTime=0.05,
        maxBindRetries=3,
        commandsWaitLeader=True,
        sendBufferSize=2**16,
        recvBufferSize=2**16,
    )


@dataclass
class RunningNode:
    name: str
    syncobj: Counter
    observer: RecordingObserver
    transports: list[SecureTransport]
    before_send_calls: list[str]  # the type of each message the transport was about to send

    @property
    def transport(self) -> SecureTransport:
        return self.transports[0]


def start_node(
    genesis: Genesis,
    name: str,
    self_address: str | None,
    other_addresses: list[str],
    conf: SyncObjConf,
    before_send: Callable[[str], object] | None = None,
) -> RunningNode:
    observer = RecordingObserver()
    transports: list[SecureTransport] = []
    before_send_calls: list[str] = []

    def record_before_send(message_type: str) -> None:
        before_send_calls.append(message_type)
        if before_send is not None:
            before_send(message_type)

    def build(sync_object: SyncObj, self_node: object, other_nodes: object) -> SecureTransport:
        built = SecureTransport(
            sync_object,
            self_node,  # type: ignore[arg-type]
            other_nodes,  # type: ignore[arg-type]
            cluster_id=cluster_id,
            self_name=name,
            signing_key=genesis.keys[name],
            peers=genesis.peers,
            before_send=record_before_send,
            observer=observer,
        )
        transports.append(built)
        return built

    syncobj = Counter(self_address, other_addresses, conf, build)
    return RunningNode(name, syncobj, observer, transports, before_send_calls)


def stop(node: RunningNode) -> None:
    if node.syncobj.conf.autoTick:
        node.syncobj.destroy_synchronous()
    else:
        node.syncobj.destroy()


# An independent implementation of the handshake and framing, written from the spec. ------------


def handshake_frame(fields: list[object]) -> bytes:
    body = msgpack.packb(fields, use_bin_type=True)
    return struct.pack(">H", len(body)) + body


def receive_exactly(sock: socket.socket, length: int) -> bytes:
    data = bytearray()
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        if not chunk:
            raise ConnectionError("closed by peer")
        data += chunk
    return bytes(data)


def receive_handshake_fields(sock: socket.socket) -> tuple[bytes, list[object]]:
    (length,) = struct.unpack(">H", receive_exactly(sock, 2))
    body = receive_exactly(sock, length)
    return body, msgpack.unpackb(body, raw=False)


def transcript_hash(hello: bytes, ephemeral: bytes, nonce: bytes) -> bytes:
    transcript = hashlib.blake2b(digest_size=32, person=b"tonle-raft-hs1")
    transcript.update(hello + ephemeral + nonce)
    return transcript.digest()


def session_key(shared: bytes, transcript: bytes, direction: bytes) -> bytes:
    key = hashlib.blake2b(digest_size=32, key=shared, person=b"tonle-raft-k1")
    key.update(transcript + direction)
    return key.digest()


class RawSession:
    """An authenticated session driven by hand: frames can be recorded, replayed and reordered."""

    def __init__(self, sock: socket.socket, send_key: bytes, receive_key: bytes) -> None:
        self.socket = sock
        self._send_key = send_key
        self._receive_key = receive_key
        self._send_counter = 0
        self._receive_counter = 0

    def seal(self, plaintext: bytes) -> bytes:
        nonce = self._send_counter.to_bytes(12, "big")
        self._send_counter += 1
        ciphertext = nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
            plaintext, b"", nonce, self._send_key
        )
        return struct.pack(">I", len(ciphertext)) + ciphertext

    def send_message(self, message: dict[str, object]) -> bytes:
        frame = self.seal(encode_message(message))
        self.socket.sendall(frame)
        return frame

    def receive_message(self) -> list[object]:
        (length,) = struct.unpack(">I", receive_exactly(self.socket, 4))
        nonce = self._receive_counter.to_bytes(12, "big")
        self._receive_counter += 1
        plaintext = nacl.bindings.crypto_aead_chacha20poly1305_ietf_decrypt(
            receive_exactly(self.socket, length), b"", nonce, self._receive_key
        )
        return msgpack.unpackb(plaintext, raw=False)


raw_sockets: list[socket.socket] = []


def raw_connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=socket_timeout_seconds)
    raw_sockets.append(sock)
    return sock


@pytest.fixture(autouse=True)
def close_raw_sockets() -> Iterator[None]:
    yield
    while raw_sockets:
        raw_sockets.pop().close()


def raw_handshake(
    address: tuple[str, int],
    *,
    initiator: str,
    responder: str,
    signing_key: nacl.signing.SigningKey,
    responder_key: bytes,
) -> RawSession:
    sock = raw_connect(address)
    secret = os.urandom(32)
    ephemeral = nacl.bindings.crypto_scalarmult_base(secret)
    hello = msgpack.packb(
        ["tonle-raft/1", cluster_id, initiator, responder, ephemeral, os.urandom(32)],
        use_bin_type=True,
    )
    sock.sendall(struct.pack(">H", len(hello)) + hello)
    _, (responder_ephemeral, responder_nonce, signature) = receive_handshake_fields(sock)
    transcript = transcript_hash(hello, responder_ephemeral, responder_nonce)
    nacl.signing.VerifyKey(responder_key).verify(transcript + b"responder", signature)
    sock.sendall(handshake_frame([signing_key.sign(transcript + b"initiator").signature]))
    shared = nacl.bindings.crypto_scalarmult(secret, responder_ephemeral)
    return RawSession(
        sock, session_key(shared, transcript, b"i2r"), session_key(shared, transcript, b"r2i")
    )


def closed_by_peer(sock: socket.socket, timeout_seconds: float = wait_seconds) -> bool:
    """True once the peer closes (EOF or reset) within the timeout; data received is discarded."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(2**16):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def local_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()
    return f"{host}:{port}"


def pickle_exploit(marker: Path) -> bytes:
    # A protocol-0 pickle for builtins.open(marker, "w"): unpickling it would create the marker.
    # Written out by hand so that nothing in the test suite imports pickle either.
    return b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."


def pysyncobj_frame(payload: bytes) -> bytes:
    # Exactly what pysyncobj's own transport would unpickle: native int length, zlib(pickle).
    compressed = zlib.compress(payload, 3)
    return struct.pack("i", len(compressed)) + compressed


def resident_set_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# Fixtures ---------------------------------------------------------------------------------------


@dataclass
class Cluster:
    genesis: Genesis
    validators: list[RunningNode]
    replica: RunningNode
    started_at: float

    def node(self, name: str) -> RunningNode:
        return next(node for node in self.validators if node.name == name)

    def leader(self) -> RunningNode:
        wait_until(
            lambda: sum(node.syncobj._isLeader() for node in self.validators) == 1,
            wait_seconds,
            "one leader",
        )
        return next(node for node in self.validators if node.syncobj._isLeader())

    def commit_and_wait_everywhere(self) -> int:
        return self.commit_and_wait_everywhere_but(None)

    def commit_and_wait_everywhere_but(self, stopped: RunningNode | None) -> int:
        value = self.leader().syncobj.increment(sync=True, timeout=wait_seconds)
        for node in [*self.validators, self.replica]:
            if node is not stopped:
                self.wait_applied(node, value)
        return value

    @staticmethod
    def wait_applied(node: RunningNode, value: int) -> None:
        wait_until(lambda: node.syncobj.value >= value, wait_seconds, f"{node.name} at {value}")


@pytest.fixture(scope="module")
def genesis() -> Genesis:
    return make_genesis()


def start_validator(genesis: Genesis, name: str) -> RunningNode:
    others = [genesis.address(other) for other in validator_names if other != name]
    return start_node(genesis, name, genesis.address(name), others, make_conf())


@pytest.fixture(scope="module")
def cluster(genesis: Genesis) -> Iterator[Cluster]:
    nodes: list[RunningNode] = []
    try:
        nodes.extend(start_validator(genesis, name) for name in validator_names)
        addresses = [genesis.address(name) for name in validator_names]
        nodes.append(start_node(genesis, "aba-1", None, addresses, make_conf()))
        started = Cluster(genesis, nodes[:-1], nodes[-1], time.monotonic())
        started.commit_and_wait_everywhere()
        yield started
        nodes = [*started.validators, started.replica]  # a test may have restarted one
    finally:
        for node in nodes:
            stop(node)


@pytest.fixture
def lone_validator(genesis: Genesis) -> Iterator[RunningNode]:
    conf = make_conf(election_timeout_seconds=0.3)
    node = start_node(genesis, "v4", genesis.address("v4"), [], conf)
    try:
        yield node
    finally:
        stop(node)


def attacker_session(genesis: Genesis, target: str, identity: str = "aba-2") -> RawSession:
    return raw_handshake(
        genesis.socket_address(target),
        initiator=identity,
        responder=target,
        signing_key=genesis.keys[identity],
        responder_key=genesis.peers[target].public_key,
    )


# A real cluster ----------------------------------------------------------------------------------


def test_validators_elect_replicate_and_a_read_only_institution_applies(cluster: Cluster) -> None:
    before = cluster.commit_and_wait_everywhere()
    leader = cluster.leader()

    for _ in range(5):
        leader.syncobj.increment(sync=True, timeout=wait_seconds)

    for node in [*cluster.validators, cluster.replica]:
        cluster.wait_applied(node, before + 5)
    followers = [node.name for node in cluster.validators if node is not leader]
    for follower in followers:
        leader.observer.wait_for(("round_trip_observed", follower))
    assert ("peer_connected", "aba-1", "institution") in leader.observer.events()
    assert ("peer_connected", leader.name, "validator") in cluster.replica.observer.events()
    refusals = [
        event
        for node in [*cluster.validators, cluster.replica]
        for event in node.observer.events()
        if event[0] in ("handshake_refused", "frame_refused", "message_dropped")
    ]
    assert refusals == []


def test_before_send_runs_on_every_node_that_transmits(cluster: Cluster) -> None:
    cluster.commit_and_wait_everywhere()

    assert all(node.before_send_calls for node in [*cluster.validators, cluster.replica])


def test_institution_sending_votes_and_entries_is_dropped_and_terms_do_not_change(
    cluster: Cluster,
) -> None:
    terms = {node.name: node.syncobj._getTerm() for node in cluster.validators}
    leader = cluster.leader()
    target = next(node for node in cluster.validators if node is not leader)
    term = max(terms.values()) + 100
    messages = [
        {"type": "request_vote", "term": term, "last_log_index": 10**6, "last_log_term": term},
        {"type": "timeout_now", "term": term},
        {"type": "response_vote", "term": term},
        {
            "type": "append_entries",
            "term": term,
            "commit_index": 10**6,
            "prevLogIdx": 1,
            "prevLogTerm": 0,
            "entries": [(b"\x00forged", 2, term)],
        },
        {
            "type": "append_entries",
            "term": term,
            "commit_index": 10**6,
            "serialized": (b"x", True, True),
        },
    ]

    for node in (leader, target):
        session = attacker_session(cluster.genesis, node.name)
        for message in messages:
            session.send_message(message)
        session.send_message(acknowledgement)
        for message_type in ("request_vote", "timeout_now", "response_vote", "append_entries"):
            node.observer.wait_for(("message_dropped", "aba-2", message_type, "not_permitted"))
        # Both appends (entries and a snapshot chunk) are dropped; the second may still be on its way when the
        # first is seen, so wait for it rather than count at once.
        dropped_entries = ("message_dropped", "aba-2", "append_entries", "not_permitted")
        wait_until(lambda: node.observer.count(dropped_entries) >= 2, wait_seconds,
                   f"two dropped appends in {node.observer.events()}")
        assert not closed_by_peer(session.socket, timeout_seconds=0.3)
        session.socket.close()

    assert cluster.leader() is leader
    assert {node.name: node.syncobj._getTerm() for node in cluster.validators} == terms
    dropped = [event for event in target.observer.events() if event[0] == "message_dropped"]
    assert all(event[2] != "next_node_idx" for event in dropped)
    cluster.commit_and_wait_everywhere()


def test_sixty_four_mebibytes_of_garbage_are_cut_off_at_the_length_check(cluster: Cluster) -> None:
    target = cluster.node("v1")
    chunk = b"\xff\xff" + os.urandom(2**20 - 2)  # A u16 length of 65535, far above the maximum.
    baseline_bytes = resident_set_bytes()
    sent_bytes = 0

    with raw_connect(cluster.genesis.socket_address("v1")) as attacker:
        try:
            for _ in range(64):
                attacker.sendall(chunk)
                sent_bytes += len(chunk)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        assert closed_by_peer(attacker)
        target.observer.wait_for(("handshake_refused", "frame_too_large", local_address(attacker)))

    assert sent_bytes < 64 * 2**20  # the node stopped reading long before the end
    assert resident_set_bytes() - baseline_bytes < 16 * 2**20
    cluster.commit_and_wait_everywhere()


def test_idle_connections_between_followers_outlive_the_connection_timeout(
    cluster: Cluster,
) -> None:
    quiet_seconds = make_conf().connectionTimeout + 1.0
    time.sleep(max(0.0, cluster.started_at + quiet_seconds - time.monotonic()))

    lost = [
        (node.name, event)
        for node in [*cluster.validators, cluster.replica]
        for event in node.observer.events()
        if event[0] == "peer_disconnected" and event[1] in validator_names + ("aba-1",)
    ]
    assert lost == []
    cluster.commit_and_wait_everywhere()


def test_restarted_validator_reconnects_and_catches_up(cluster: Cluster) -> None:
    leader = cluster.leader()
    follower = next(node for node in cluster.validators if node is not leader)
    stop(follower)
    leader.observer.wait_for(("peer_disconnected", follower.name))
    value = cluster.commit_and_wait_everywhere_but(follower)

    restarted = start_validator(cluster.genesis, follower.name)
    cluster.validators[cluster.validators.index(follower)] = restarted

    cluster.wait_applied(restarted, value)
    assert leader.observer.count(("peer_connected", follower.name, "validator")) == 2
    cluster.commit_and_wait_everywhere()


# Handshake refusals ------------------------------------------------------------------------------


def test_unknown_peer_name_is_refused(genesis: Genesis, lone_validator: RunningNode) -> None:
    stranger = nacl.signing.SigningKey.generate()

    with pytest.raises(ConnectionError):
        raw_handshake(
            genesis.socket_address("v4"),
            initiator="mallory",
            responder="v4",
            signing_key=stranger,
            responder_key=genesis.peers["v4"].public_key,
        )

    wait_until(lambda: len(lone_validator.observer.events()) == 1, wait_seconds, "a refusal")
    assert lone_validator.observer.events()[0][:2] == ("handshake_refused", "unknown_peer")


def test_known_name_with_the_wrong_key_is_refused_as_bad_signature(
    genesis: Genesis, lone_validator: RunningNode
) -> None:
    session = raw_handshake(
        genesis.socket_address("v4"),
        initiator="aba-2",
        responder="v4",
        signing_key=nacl.signing.SigningKey.generate(),
        responder_key=genesis.peers["v4"].public_key,
    )

    assert closed_by_peer(session.socket)
    lone_validator.observer.wait_for(("handshake_refused", "bad_signature", local_address(session.socket)))
    assert not any(event[0] == "peer_connected" for event in lone_validator.observer.events())


def test_a_genuine_key_of_another_node_does_not_vouch_for_this_name(
    genesis: Genesis, lone_validator: RunningNode
) -> None:
    session = raw_handshake(
        genesis.socket_address("v4"),
        initiator="aba-2",
        responder="v4",
        signing_key=genesis.keys["v1"],
        responder_key=genesis.peers["v4"].public_key,
    )

    assert closed_by_peer(session.socket)
    lone_validator.observer.wait_for(("handshake_refused", "bad_signature", local_address(session.socket)))


@pytest.mark.parametrize(
    ("hello", "reason"),
    [
        (["tonle-raft/2", cluster_id, "aba-2", "v4", b"k" * 32, b"n" * 32], "protocol"),
        ([], "protocol"),
        (["tonle-raft/1", "another-cluster", "aba-2", "v4", b"k" * 32, b"n" * 32], "wrong_cluster"),
        (["tonle-raft/1", cluster_id, "aba-2", "v1", b"k" * 32, b"n" * 32], "wrong_responder"),
        (["tonle-raft/1", cluster_id, "v4", "v4", b"k" * 32, b"n" * 32], "unknown_peer"),
        (["tonle-raft/1", cluster_id, "aba-2", "v4", b"k" * 31, b"n" * 32], "malformed"),
        (["tonle-raft/1", cluster_id, "aba-2", "v4", b"k" * 32], "malformed"),
        (["tonle-raft/1", cluster_id, 7, "v4", b"k" * 32, b"n" * 32], "malformed"),
    ],
    ids=["version", "empty", "cluster", "responder", "self", "short-key", "short", "int-name"],
)
def test_bad_hello_is_refused_with_its_reason(
    genesis: Genesis, lone_validator: RunningNode, hello: list[object], reason: str
) -> None:
    with raw_connect(genesis.socket_address("v4")) as attacker:
        attacker.sendall(handshake_frame(hello))

        assert closed_by_peer(attacker)
        lone_validator.observer.wait_for(("handshake_refused", reason, local_address(attacker)))


def test_low_order_ephemeral_key_is_refused(genesis: Genesis, lone_validator: RunningNode) -> None:
    fields = ["tonle-raft/1", cluster_id, "aba-2", "v4", bytes(32), os.urandom(32)]
    hello = msgpack.packb(fields, use_bin_type=True)

    with raw_connect(genesis.socket_address("v4")) as attacker:
        attacker.sendall(struct.pack(">H", len(hello)) + hello)
        _, (ephemeral, nonce, _) = receive_handshake_fields(attacker)
        transcript = transcript_hash(hello, ephemeral, nonce)
        signature = genesis.keys["aba-2"].sign(transcript + b"initiator").signature
        attacker.sendall(handshake_frame([signature]))

        assert closed_by_peer(attacker)
        remote = local_address(attacker)
        lone_validator.observer.wait_for(("handshake_refused", "malformed", remote))


def test_handshake_length_above_the_maximum_closes_before_the_body(
    genesis: Genesis, lone_validator: RunningNode
) -> None:
    address = genesis.socket_address("v4")
    with raw_connect(address) as over_limit, raw_connect(address) as at_limit:
        over_limit.sendall(struct.pack(">H", handshake_frame_bytes_max + 1))
        at_limit.sendall(
            struct.pack(">H", handshake_frame_bytes_max) + b"\xc1" * handshake_frame_bytes_max
        )

        assert closed_by_peer(over_limit)
        assert closed_by_peer(at_limit)
        over_remote, at_remote = local_address(over_limit), local_address(at_limit)
        lone_validator.observer.wait_for(("handshake_refused", "frame_too_large", over_remote))
        lone_validator.observer.wait_for(("handshake_refused", "malformed", at_remote))


def test_pickle_payload_before_authentication_never_runs(
    genesis: Genesis, lone_validator: RunningNode, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned-before-auth"
    exploit = pickle_exploit(marker)

    with raw_connect(genesis.socket_address("v4")) as pysyncobj_style:
        pysyncobj_style.sendall(pysyncobj_frame(exploit))
        assert closed_by_peer(pysyncobj_style)
        remote = local_address(pysyncobj_style)
        lone_validator.observer.wait_for(("handshake_refused", "frame_too_large", remote))
    with raw_connect(genesis.socket_address("v4")) as framed:
        framed.sendall(struct.pack(">H", len(exploit)) + exploit)
        assert closed_by_peer(framed)
        lone_validator.observer.wait_for(("handshake_refused", "malformed", local_address(framed)))

    assert not marker.exists()


def test_too_many_unauthenticated_connections_are_closed_at_once(
    genesis: Genesis, lone_validator: RunningNode
) -> None:
    excess = 8
    total = unauthenticated_connections_max + excess
    sockets = [raw_connect(genesis.socket_address("v4")) for _ in range(total)]
    try:
        wait_until(
            lambda: len(lone_validator.observer.events()) == excess, wait_seconds, "refusals"
        )
        assert {event[1] for event in lone_validator.observer.events()} == {"too_many_connections"}
        refused = {event[2] for event in lone_validator.observer.events()}
        assert refused == {local_address(sock) for sock in sockets[-excess:]}
        assert all(closed_by_peer(sock, timeout_seconds=2.0) for sock in sockets[-excess:])
        assert not any(closed_by_peer(sock, timeout_seconds=0.05) for sock in sockets[:-excess])
    finally:
        for sock in sockets:
            sock.close()


def test_stalled_handshake_is_closed_after_the_timeout(
    genesis: Genesis, lone_validator: RunningNode
) -> None:
    address = genesis.socket_address("v4")
    with raw_connect(address) as silent, raw_connect(address) as partial:
        partial.sendall(struct.pack(">H", 100) + b"\x96" * 10)
        started = time.monotonic()

        assert not closed_by_peer(silent, timeout_seconds=handshake_timeout_seconds - 1.0)
        assert closed_by_peer(silent, timeout_seconds=3.0)
        assert closed_by_peer(partial, timeout_seconds=1.0)
        assert time.monotonic() - started >= handshake_timeout_seconds - 0.1
        lone_validator.observer.wait_for(("handshake_refused", "timeout", local_address(silent)))
        lone_validator.observer.wait_for(("handshake_refused", "timeout", local_address(partial)))


def test_refusals_are_logged_at_most_once_per_reason_and_remote_per_second(
    genesis: Genesis, lone_validator: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=transport_module.__name__)
    hello = ["tonle-raft/1", "another-cluster", "aba-2", "v4", b"k" * 32, b"n" * 32]
    started = time.monotonic()

    for _ in range(3):
        with raw_connect(genesis.socket_address("v4")) as attacker:
            attacker.sendall(handshake_frame(hello))
            assert closed_by_peer(attacker)
    wait_until(lambda: len(lone_validator.observer.events()) == 3, wait_seconds, "three refusals")

    assert time.monotonic() - started < transport_module.refusal_log_interval_seconds
    assert sum("wrong_cluster" in record.getMessage() for record in caplog.records) == 1


def test_listener_is_bound_only_to_the_configured_host(
    genesis: Genesis, lone_validator: RunningNode
) -> None:
    _, port = genesis.socket_address("v4")

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=socket_timeout_seconds).close()
    raw_connect(("127.0.0.1", port)).close()


# Authenticated frames ----------------------------------------------------------------------------


def test_pickle_payload_after_a_valid_handshake_never_runs(
    genesis: Genesis, lone_validator: RunningNode, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned-after-auth"
    for payload in (pickle_exploit(marker), zlib.compress(pickle_exploit(marker), 3)):
        session = attacker_session(genesis, "v4")
        session.socket.sendall(session.seal(payload))

        assert closed_by_peer(session.socket)
    wait_until(
        lambda: lone_validator.observer.count(("frame_refused", "aba-2", "malformed")) == 2,
        wait_seconds,
        "two malformed frames",
    )
    assert not marker.exists()


def test_utility_messages_are_refused_as_malformed(
    genesis: Genesis, lone_validator: RunningNode
) -> None:
    session = attacker_session(genesis, "v4")
    session.socket.sendall(session.seal(msgpack.packb(["status"])))

    assert closed_by_peer(session.socket)
    lone_validator.observer.wait_for(("frame_refused", "aba-2", "malformed"))


def test_replayed_frame_is_refused_and_connection_closed(
    genesis: Genesis, lone_validator: RunningNode
) -> None:
    session = attacker_session(genesis, "v4")
    recorded = session.send_message(acknowledgement)
    assert not closed_by_peer(session.socket, timeout_seconds=0.3)

    session.socket.sendall(recorded)

    assert closed_by_peer(session.socket)
    lone_validator.observer.wait_for(("frame_refused", "aba-2", "authentication"))


def test_reordered_frames_are_refused_and_connection_closed(
    genesis: Genesis, lone_validator: RunningNode
) -> None:
    session = attacker_session(genesis, "v4")
    payload = encode_message(acknowledgement)
    first, second = session.seal(payload), session.seal(payload)

    session.socket.sendall(second + first)

    assert closed_by_peer(session.socket)
    lone_validator.observer.wait_for(("frame_refused", "aba-2", "authentication"))


def test_altered_frame_is_refused_and_connection_closed(
    genesis: Genesis, lone_validator: RunningNode
) -> None:
    session = attacker_session(genesis, "v4")
    frame = bytearray(session.seal(encode_message({"type": "response_vote", "term": 1})))
    frame[7] ^= 0x01

    session.socket.sendall(bytes(frame))

    assert closed_by_peer(session.socket)
    lone_validator.observer.wait_for(("frame_refused", "aba-2", "authentication"))


def test_frame_length_above_the_maximum_is_refused_before_buffering(
    genesis: Genesis, lone_validator: RunningNode
) -> None:
    over = attacker_session(genesis, "v4")
    over.socket.sendall(struct.pack(">I", peer_frame_bytes_max + 1) + b"\x00" * 1024)
    assert closed_by_peer(over.socket)
    lone_validator.observer.wait_for(("frame_refused", "aba-2", "frame_too_large"))

    at_limit = attacker_session(genesis, "v4")
    at_limit.socket.sendall(
        struct.pack(">I", peer_frame_bytes_max) + b"\x00" * peer_frame_bytes_max
    )
    assert closed_by_peer(at_limit.socket)
    lone_validator.observer.wait_for(("frame_refused", "aba-2", "authentication"))
    assert lone_validator.observer.count(("frame_refused", "aba-2", "frame_too_large")) == 1


def test_a_new_authenticated_connection_replaces_the_old_one(
    genesis: Genesis, lone_validator: RunningNode
) -> None:
    first = attacker_session(genesis, "v4")
    lone_validator.observer.wait_for(("peer_connected", "aba-2", "institution"))

    second = attacker_session(genesis, "v4")

    assert closed_by_peer(first.socket)
    wait_until(
        lambda: lone_validator.observer.count(("peer_connected", "aba-2", "institution")) == 2,
        wait_seconds,
        "second connection",
    )
    assert lone_validator.observer.count(("peer_disconnected", "aba-2")) == 1
    assert not closed_by_peer(second.socket, timeout_seconds=0.3)


# The dialling side against a fake responder ------------------------------------------------------


@pytest.fixture
def fake_responder(genesis: Genesis) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(genesis.socket_address("v5"))
        listener.listen(8)
        listener.settimeout(wait_seconds)
        yield listener


@pytest.fixture
def dialling_replica(genesis: Genesis, fake_responder: socket.socket) -> Iterator[RunningNode]:
    node = start_node(genesis, "aba-3", None, [genesis.address("v5")], make_conf())
    try:
        yield node
    finally:
        stop(node)


def heartbeat(term: int, entries: list[tuple[bytes, int, int]] | None = None) -> dict[str, object]:
    return {
        "type": "append_entries",
        "term": term,
        "commit_index": 1,
        "prevLogIdx": 1,
        "prevLogTerm": 0,
        "entries": entries or [],
    }


def accept_hello(listener: socket.socket) -> tuple[socket.socket, bytes, list[object]]:
    connection, _ = listener.accept()
    connection.settimeout(socket_timeout_seconds)
    hello, fields = receive_handshake_fields(connection)
    return connection, hello, fields


def respond(
    connection: socket.socket, hello: bytes, signing_key: nacl.signing.SigningKey
) -> tuple[bytes, bytes]:
    """Answer a hello as the responder; returns the shared secret and the transcript hash."""
    secret = os.urandom(32)
    ephemeral, nonce = nacl.bindings.crypto_scalarmult_base(secret), os.urandom(32)
    transcript = transcript_hash(hello, ephemeral, nonce)
    signature = signing_key.sign(transcript + b"responder").signature
    connection.sendall(handshake_frame([ephemeral, nonce, signature]))
    initiator_ephemeral = msgpack.unpackb(hello, raw=False)[4]
    return nacl.bindings.crypto_scalarmult(secret, initiator_ephemeral), transcript


def test_initiator_sends_the_documented_hello(
    genesis: Genesis, fake_responder: socket.socket, dialling_replica: RunningNode
) -> None:
    connection, _, fields = accept_hello(fake_responder)
    with connection:
        assert fields[:4] == ["tonle-raft/1", cluster_id, "aba-3", "v5"]
        assert [len(field) for field in fields[4:]] == [32, 32]  # type: ignore[arg-type]


def test_initiator_refuses_a_responder_without_the_genesis_key(
    genesis: Genesis, fake_responder: socket.socket, dialling_replica: RunningNode
) -> None:
    connection, hello, _ = accept_hello(fake_responder)
    with connection:
        respond(connection, hello, nacl.signing.SigningKey.generate())

        assert closed_by_peer(connection)
        remote = "{}:{}".format(*genesis.socket_address("v5"))
        dialling_replica.observer.wait_for(("handshake_refused", "bad_signature", remote))


def test_initiator_refuses_an_oversized_handshake_frame(
    genesis: Genesis, fake_responder: socket.socket, dialling_replica: RunningNode
) -> None:
    connection, _, _ = accept_hello(fake_responder)
    with connection:
        connection.sendall(struct.pack(">H", 0xFFFF) + b"\x00" * 1024)

        assert closed_by_peer(connection)
        remote = "{}:{}".format(*genesis.socket_address("v5"))
        dialling_replica.observer.wait_for(("handshake_refused", "frame_too_large", remote))


def test_read_only_node_accepts_only_entries_from_a_validator(
    genesis: Genesis, fake_responder: socket.socket, dialling_replica: RunningNode
) -> None:
    connection, hello, _ = accept_hello(fake_responder)
    with connection:
        shared, transcript = respond(connection, hello, genesis.keys["v5"])
        _, (signature,) = receive_handshake_fields(connection)
        initiator_key = nacl.signing.VerifyKey(genesis.peers["aba-3"].public_key)
        initiator_key.verify(transcript + b"initiator", signature)
        send_key = session_key(shared, transcript, b"r2i")
        session = RawSession(connection, send_key, session_key(shared, transcript, b"i2r"))
        dialling_replica.observer.wait_for(("peer_connected", "v5", "validator"))

        session.send_message(
            {"type": "request_vote", "term": 9, "last_log_index": 1, "last_log_term": 0}
        )
        session.send_message(acknowledgement)
        session.send_message(heartbeat(term=9))

        assert session.receive_message() == [3, 9, 2, False, True]  # next_node_idx 2, success, term 9
        for message_type in ("request_vote", "next_node_idx"):
            dropped = ("message_dropped", "v5", message_type, "not_permitted")
            dialling_replica.observer.wait_for(dropped)


# Manually ticked node: before_send, unsupported messages, slow peers -----------------------------


@pytest.fixture
def failing_sync() -> threading.Event:
    """While set, the ticked leader's before_send raises, as a failing journal fsync would."""
    return threading.Event()


@pytest.fixture
def ticked_leader(genesis: Genesis, failing_sync: threading.Event) -> Iterator[RunningNode]:
    """v4 alone with autoTick off, so the test thread drives every send and sees every exception."""

    def before_send(message_type: str) -> None:
        if failing_sync.is_set():
            raise RuntimeError("journal sync failed")

    conf = make_conf(auto_tick=False, election_timeout_seconds=0.3)
    node = start_node(genesis, "v4", genesis.address("v4"), [], conf, before_send)
    try:
        tick_until(node, node.syncobj._isLeader, "v4 leads")
        yield node
    finally:
        stop(node)


def tick_until(node: RunningNode, condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + wait_seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        node.syncobj.doTick(0.01)


def connect_in_background(genesis: Genesis, node: RunningNode) -> RawSession:
    sessions: list[RawSession] = []
    worker = threading.Thread(target=lambda: sessions.append(attacker_session(genesis, "v4")))
    worker.start()
    tick_until(node, lambda: not worker.is_alive(), "handshake")
    connected = ("peer_connected", "aba-2", "institution")
    tick_until(node, lambda: connected in node.observer.events(), "connected")
    return sessions[0]


def test_before_send_runs_before_anything_is_transmitted_and_its_error_propagates(
    genesis: Genesis, ticked_leader: RunningNode, failing_sync: threading.Event
) -> None:
    session = connect_in_background(genesis, ticked_leader)
    session.socket.settimeout(0.2)
    with pytest.raises(TimeoutError):
        while True:  # Drain what was sent before the failure; nothing more is sent untill ticked.
            session.receive_message()
    failing_sync.set()

    with pytest.raises(RuntimeError, match="journal sync failed"):
        tick_until(ticked_leader, lambda: False, "an append_entries to the replica")
    with pytest.raises(TimeoutError):
        session.socket.recv(1)

    failing_sync.clear()
    calls_before = len(ticked_leader.before_send_calls)
    tick_until(ticked_leader, lambda: len(ticked_leader.before_send_calls) > calls_before, "a send")
    assert ticked_leader.before_send_calls[calls_before] == "append_entries"  # the hook is told what it precedes
    session.socket.settimeout(socket_timeout_seconds)
    assert session.receive_message()[0] == 1  # append_entries


def test_unsupported_message_is_dropped_without_before_send(
    genesis: Genesis, ticked_leader: RunningNode
) -> None:
    connect_in_background(genesis, ticked_leader)
    calls_before = len(ticked_leader.before_send_calls)
    forwarded_command = {"type": "apply_command", "command": b"\x00x"}

    sent = ticked_leader.transport.send(Node("aba-2"), forwarded_command)

    assert sent is False
    assert len(ticked_leader.before_send_calls) == calls_before
    dropped = ("message_dropped", "aba-2", "apply_command", "unsupported")
    assert dropped in ticked_leader.observer.events()


def test_peer_that_stops_reading_is_disconnected_above_the_send_buffer_limit(
    genesis: Genesis, ticked_leader: RunningNode
) -> None:
    session = connect_in_background(genesis, ticked_leader)
    entries = [(b"x" * 60_000, index, 1) for index in range(2, 62)]
    message = heartbeat(term=1, entries=entries)
    # Kernel socket buffers absorb a few megabytes before the transport has to buffer anything.
    sends_needed = send_buffer_bytes_max // (60 * 60_000) + 6

    results = [ticked_leader.transport.send(Node("aba-2"), message) for _ in range(sends_needed)]

    assert results[0] is True
    assert results[-1] is False
    assert ("peer_disconnected", "aba-2") in ticked_leader.observer.events()
    assert closed_by_peer(session.socket)


def test_silent_peer_is_disconnected_after_the_connection_timeout(
    genesis: Genesis, ticked_leader: RunningNode
) -> None:
    session = connect_in_background(genesis, ticked_leader)
    connected_at = time.monotonic()

    disconnected = ("peer_disconnected", "aba-2")
    tick_until(ticked_leader, lambda: disconnected in ticked_leader.observer.events(), "timeout")

    assert time.monotonic() - connected_at >= ticked_leader.syncobj.conf.connectionTimeout - 0.1
    assert closed_by_peer(session.socket)


# Configuration -----------------------------------------------------------------------------------


def test_bind_failure_is_retried_then_reported(genesis: Genesis) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(genesis.socket_address("v4"))
        squatter.listen(1)

        with pytest.raises(SyncObjException, match="BindError"):
            start_node(genesis, "v4", genesis.address("v4"), [], make_conf(auto_tick=False))


def test_signing_key_must_match_the_genesis_key(genesis: Genesis) -> None:
    with pytest.raises(TransportConfigError, match="not 'v4'"):
        SecureTransport(
            object(),  # type: ignore[arg-type]
            None,
            [],
            cluster_id=cluster_id,
            self_name="v4",
            signing_key=genesis.keys["v1"],
            peers=genesis.peers,
        )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("v1", "validator", b"short", "127.0.0.1:1"), "32 bytes"),
        (("v1", "observer", b"k" * 32, "127.0.0.1:1"), "unknown role"),
        (("v1", "validator", b"k" * 32, "127.0.0.1"), "host:port"),
    ],
)
def test_peer_identity_is_validated(arguments: tuple[str, str, bytes, str], message: str) -> None:
    with pytest.raises(TransportConfigError, match=message):
        PeerIdentity(*arguments)  # type: ignore[arg-type]


def test_handshake_objects_agree_on_keys_without_sockets(genesis: Genesis) -> None:
    initiator = InitiatorHandshake(
        cluster_id=cluster_id,
        self_name="aba-2",
        responder=genesis.peers["v1"],
        signing_key=genesis.keys["aba-2"],
    )
    responder = ResponderHandshake(
        cluster_id=cluster_id,
        self_name="v1",
        signing_key=genesis.keys["v1"],
        initiator_key=lambda name: nacl.signing.VerifyKey(genesis.peers[name].public_key),
    )

    confirmation, initiator_keys = initiator.confirm(responder.respond(initiator.hello))
    responder_keys = responder.finish(confirmation)

    assert initiator_keys.send_key == responder_keys.receive_key
    assert initiator_keys.receive_key == responder_keys.send_key
    assert initiator_keys.send_key != initiator_keys.receive_key
