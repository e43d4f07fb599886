"""Authenticated, encrypted, pickle-free replacement for pysyncobj's TCP transport."""

from __future__ import annotations

import enum
import errno
import functools
import hashlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, Protocol

import msgpack
import nacl.bindings
import nacl.exceptions
import nacl.signing
import nacl.utils
from pysyncobj.dns_resolver import globalDnsResolver
from pysyncobj.monotonic import monotonic as monotonic_time
from pysyncobj.node import Node, TCPNode
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.transport import Transport, TransportNotReadyError

from consensus.raft.wire import WireError, decode_message, encode_message_parts, message_type_label

if TYPE_CHECKING:
    from pysyncobj.syncobj import SyncObj

logger = logging.getLogger(__name__)

protocol_name: Final = "tonle-raft/1"
handshake_frame_bytes_max: Final = 512
handshake_timeout_seconds: Final = 5.0
unauthenticated_connections_max: Final = 32
peer_frame_bytes_max: Final = 4 * 2**20
send_buffer_bytes_max: Final = 64 * 2**20
listen_backlog_connections: Final = 64
# Bytes read per recv(). Together with peer_frame_bytes_max it bounds a connection's read buffer:
# a frame header is checked as soon as it is complete, at most one chunk past it.
receive_chunk_bytes: Final = 2**16
refusal_log_interval_seconds: Final = 1.0

HandshakeRefusalReason = Literal[
    "protocol",
    "wrong_cluster",
    "wrong_responder",
    "unknown_peer",
    "bad_signature",
    "frame_too_large",
    "timeout",
    "too_many_connections",
    "malformed",
]
FrameRefusalReason = Literal["authentication", "frame_too_large", "malformed"]
DropReason = Literal["unsupported", "not_permitted"]

_handshake_header_bytes: Final = 2
_frame_header_bytes: Final = 4
_authentication_tag_bytes: Final = 16
_key_bytes: Final = 32
_handshake_nonce_bytes: Final = 32
_signature_bytes: Final = 64
_transcript_person: Final = b"tonle-raft-hs1"
_key_person: Final = b"tonle-raft-k1"
_aead_nonce_bytes: Final = 12
_roles: Final = frozenset({"validator", "institution"})
# What each side may receive, by the sender's genesis role (never by anything on the wire): an
# institution node is only ever a read-only replica, so it may acknowledge entries but never vote,
# campaign or lead; it in turn only needs the leader's entries and snapshots.
_types_from_institution: Final = frozenset({"next_node_idx"})
_types_to_institution: Final = frozenset({"append_entries"})


class TransportConfigError(ValueError):
    """The genesis peers, keys or pysyncobj nodes given to the transport do not fit together."""


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """One genesis node as the transport sees it; its role decides what it may send."""

    name: str
    role: Literal["validator", "institution"]
    public_key: bytes  # Ed25519, 32 bytes
    raft_address: str  # "host:port"; where a validator listens

    def __post_init__(self) -> None:
        if self.role not in _roles:
            raise TransportConfigError(f"peer {self.name!r}: unknown role {self.role!r}")
        if type(self.public_key) is not bytes or len(self.public_key) != _key_bytes:
            raise TransportConfigError(f"peer {self.name!r}: public key must be 32 bytes")
        _split_address(self.raft_address)


class TransportObserver(Protocol):
    """Receives every transport event worth counting; metric labels stay within closed sets."""

    def peer_connected(self, name: str, role: str) -> None: ...

    def peer_disconnected(self, name: str) -> None: ...

    def handshake_refused(self, reason: str, remote: str) -> None: ...

    def frame_refused(self, peer: str, reason: str) -> None: ...

    def message_dropped(self, peer: str, message_type: str, reason: str) -> None: ...

    def round_trip_observed(self, peer: str, seconds: float) -> None: ...


class NullTransportObserver:
    """An observer that ignores every event."""

    def peer_connected(self, name: str, role: str) -> None:
        pass

    def peer_disconnected(self, name: str) -> None:
        pass

    def handshake_refused(self, reason: str, remote: str) -> None:
        pass

    def frame_refused(self, peer: str, reason: str) -> None:
        pass

    def message_dropped(self, peer: str, message_type: str, reason: str) -> None:
        pass

    def round_trip_observed(self, peer: str, seconds: float) -> None:
        pass


class HandshakeRefused(Exception):
    """A handshake step failed; `reason` is one of HandshakeRefusalReason."""

    def __init__(self, reason: HandshakeRefusalReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: HandshakeRefusalReason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """Per-direction ChaCha20-Poly1305 keys agreed by one handshake."""

    send_key: bytes
    receive_key: bytes


class InitiatorHandshake:
    """The dialling side of the handshake; pure, so it can be driven without sockets."""

    def __init__(
        self,
        *,
        cluster_id: str,
        self_name: str,
        responder: PeerIdentity,
        signing_key: nacl.signing.SigningKey,
    ) -> None:
        self._responder_key = nacl.signing.VerifyKey(responder.public_key)
        self._signing_key = signing_key
        self._ephemeral_secret: bytes | None = nacl.utils.random(_key_bytes)
        ephemeral_public = nacl.bindings.crypto_scalarmult_base(self._ephemeral_secret)
        nonce = nacl.utils.random(_handshake_nonce_bytes)
        self.hello = _pack_handshake(
            [protocol_name, cluster_id, self_name, responder.name, ephemeral_public, nonce]
        )

    def confirm(self, response: bytes) -> tuple[bytes, SessionKeys]:
        """Check the responder's reply; return the confirmation to send and the session keys."""
        # Taken out first, so the secret leaves this object whatever happens next.
        secret, self._ephemeral_secret = self._ephemeral_secret, None
        if secret is None:
            raise HandshakeRefused("malformed", "a second response on one handshake")
        fields = _unpack_handshake(response)
        if len(fields) != 3 or not _is_key(fields[0]) or not _is_key(fields[1]):
            raise HandshakeRefused("malformed", "response must be [ephemeral, nonce, signature]")
        responder_ephemeral, responder_nonce, signature = fields
        transcript = _transcript_hash(self.hello, responder_ephemeral, responder_nonce)
        _verify(self._responder_key, transcript + b"responder", signature)
        signature = self._signing_key.sign(transcript + b"initiator").signature
        confirmation = _pack_handshake([signature])
        shared = _shared_secret(secret, responder_ephemeral)
        return confirmation, SessionKeys(
            send_key=_derive_key(shared, transcript, b"i2r"),
            receive_key=_derive_key(shared, transcript, b"r2i"),
        )


class ResponderHandshake:
    """The accepting side of the handshake; pure, so it can be driven without sockets."""

    def __init__(
        self,
        *,
        cluster_id: str,
        self_name: str,
        signing_key: nacl.signing.SigningKey,
        initiator_key: Callable[[str], nacl.signing.VerifyKey | None],
    ) -> None:
        self._cluster_id = cluster_id
        self._self_name = self_name
        self._signing_key = signing_key
        self._initiator_key = initiator_key
        self._ephemeral_secret: bytes | None = None
        self._initiator_ephemeral = b""
        self._transcript = b""
        self.initiator_name: str | None = None

    def respond(self, hello: bytes) -> bytes:
        """Check the initiator's hello and return the signed response."""
        if self.initiator_name is not None:
            raise HandshakeRefused("malformed", "a second hello on one handshake")
        fields = _unpack_handshake(hello)
        if not fields or fields[0] != protocol_name:
            raise HandshakeRefused("protocol", f"expected {protocol_name!r}")
        if len(fields) != 6 or not all(type(field) is str for field in fields[1:4]):
            raise HandshakeRefused("malformed", "hello must be [protocol, cluster, from, to, ...]")
        _, cluster_id, initiator_name, responder_name, ephemeral, nonce = fields
        if not _is_key(ephemeral) or not _is_key(nonce):
            raise HandshakeRefused("malformed", "ephemeral key and nonce must be 32 bytes each")
        if cluster_id != self._cluster_id:
            raise HandshakeRefused("wrong_cluster", f"cluster {cluster_id[:64]!r}")
        if responder_name != self._self_name:
            raise HandshakeRefused("wrong_responder", f"addressed to {responder_name[:64]!r}")
        if initiator_name == self._self_name or self._initiator_key(initiator_name) is None:
            raise HandshakeRefused("unknown_peer", f"initiator {initiator_name[:64]!r}")
        self.initiator_name = initiator_name
        self._initiator_ephemeral = ephemeral
        self._ephemeral_secret = nacl.utils.random(_key_bytes)
        own_ephemeral = nacl.bindings.crypto_scalarmult_base(self._ephemeral_secret)
        own_nonce = nacl.utils.random(_handshake_nonce_bytes)
        self._transcript = _transcript_hash(hello, own_ephemeral, own_nonce)
        signature = self._signing_key.sign(self._transcript + b"responder").signature
        return _pack_handshake([own_ephemeral, own_nonce, signature])

    def finish(self, confirmation: bytes) -> SessionKeys:
        """Check the initiator's signature and return the session keys."""
        secret, self._ephemeral_secret = self._ephemeral_secret, None
        if secret is None or self.initiator_name is None:
            raise HandshakeRefused("malformed", "confirmation before hello")
        fields = _unpack_handshake(confirmation)
        if len(fields) != 1:
            raise HandshakeRefused("malformed", "confirmation must be [signature]")
        initiator_key = self._initiator_key(self.initiator_name)
        if initiator_key is None:
            raise HandshakeRefused("unknown_peer", f"initiator {self.initiator_name!r}")
        _verify(initiator_key, self._transcript + b"initiator", fields[0])
        shared = _shared_secret(secret, self._initiator_ephemeral)
        return SessionKeys(
            send_key=_derive_key(shared, self._transcript, b"r2i"),
            receive_key=_derive_key(shared, self._transcript, b"i2r"),
        )


class FrameCipher:
    """ChaCha20-Poly1305 with a per-direction frame counter as nonce: replays and reorders fail."""

    __slots__ = ("_receive_counter", "_receive_key", "_send_counter", "_send_key")

    def __init__(self, keys: SessionKeys) -> None:
        self._send_key = keys.send_key
        self._receive_key = keys.receive_key
        self._send_counter = 0
        self._receive_counter = 0

    def seal(self, plaintext: bytes) -> bytes:
        nonce = self._send_counter.to_bytes(_aead_nonce_bytes, "big")
        self._send_counter += 1
        return nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
            plaintext, b"", nonce, self._send_key
        )

    def open(self, ciphertext: bytes) -> bytes:
        """Decrypt the next frame; raises nacl.exceptions.CryptoError if it is not that frame."""
        nonce = self._receive_counter.to_bytes(_aead_nonce_bytes, "big")
        plaintext = nacl.bindings.crypto_aead_chacha20poly1305_ietf_decrypt(
            ciphertext, b"", nonce, self._receive_key
        )
        self._receive_counter += 1
        return plaintext


class _Phase(enum.Enum):
    CONNECTING = enum.auto()
    AWAITING_RESPONSE = enum.auto()  # initiator sent hello
    AWAITING_HELLO = enum.auto()  # responder accepted the TCP connection
    AWAITING_CONFIRMATION = enum.auto()  # responder sent its response
    AUTHENTICATED = enum.auto()
    CLOSED = enum.auto()


class _Connection:
    """One TCP connection and its handshake or session state."""

    __slots__ = (
        "awaited_since",
        "cipher",
        "deadline",
        "handshake",
        "node",
        "on_event",
        "peer_name",
        "phase",
        "read_buffer",
        "remote",
        "socket",
        "subscribed_mask",
        "write_buffer",
    )

    def __init__(self, sock: socket.socket, remote: str, phase: _Phase) -> None:
        self.socket = sock
        self.remote = remote
        self.phase = phase
        self.deadline = monotonic_time() + handshake_timeout_seconds
        self.handshake: InitiatorHandshake | ResponderHandshake | None = None
        self.cipher: FrameCipher | None = None
        self.peer_name: str | None = None
        self.node: Node | None = None
        self.read_buffer = bytearray()
        self.write_buffer = bytearray()
        self.subscribed_mask = 0
        # When the first append_entries still unanswered by a next_node_idx was sent.
        self.awaited_since: float | None = None
        self.on_event: Callable[[int, int], None] | None = None


class SecureTransport(Transport):
    """pysyncobj transport: Ed25519-authenticated X25519 handshake, then encrypted msgpack frames.

    Everything runs in pysyncobj's tick thread on non-blocking sockets, exactly like TCPTransport.
    """

    def __init__(
        self,
        syncObj: SyncObj,
        selfNode: TCPNode | None,
        otherNodes: Iterable[TCPNode],
        *,
        cluster_id: str,
        self_name: str,
        signing_key: nacl.signing.SigningKey,
        peers: Mapping[str, PeerIdentity],
        before_send: Callable[[str], object] = lambda message_type: None,
        observer: TransportObserver | None = None,
        admitted_peer: Callable[[str], PeerIdentity | None] = lambda name: None,
    ) -> None:
        super().__init__(syncObj, selfNode, otherNodes)
        # Institution nodes admitted after genesis (by a replicated AdmitNode entry) are looked up here
        # when they first connect; validators are fixed by the genesis and never come from this.
        self._admitted_peer = admitted_peer
        self._identity = _check_identity(self_name, selfNode, signing_key, peers)
        self._conf = syncObj.conf
        self._poller = syncObj._poller
        self._current_term = lambda: syncObj.raftCurrentTerm
        self._cluster_id = cluster_id
        self._signing_key = signing_key
        self._peers = dict(peers)
        self._verify_keys = {
            name: nacl.signing.VerifyKey(peer.public_key) for name, peer in peers.items()
        }
        self._validator_by_address = {
            peer.raft_address: name for name, peer in peers.items() if peer.role == "validator"
        }
        self._before_send = before_send
        self._observer: TransportObserver = observer or NullTransportObserver()
        self._refusal_log = _RateLimitedLog(refusal_log_interval_seconds)
        self._is_institution = selfNode is None
        self._nodes: dict[str, TCPNode] = {}  # validator name -> the pysyncobj node object
        self._authenticated: dict[str, _Connection] = {}
        self._dialing: dict[str, _Connection] = {}
        self._incoming_handshakes: set[_Connection] = set()
        self._last_dial: dict[str, float] = {}
        self._listener: socket.socket | None = None
        self._bind_attempts = 0
        self._last_bind_attempt = 0.0
        self._bind_over = threading.Event()
        self._ready = False
        self._destroyed = False
        syncObj.addOnTickCallback(self._onTick)
        for node in otherNodes:
            self.addNode(node)
        if self._is_institution:
            self._ready = True
            self._bind_over.set()

    # pysyncobj Transport interface ---------------------------------------------------------------

    def tryGetReady(self) -> None:
        self._maybe_bind()

    @property
    def ready(self) -> bool:
        return self._ready

    def waitReady(self) -> None:
        self._bind_over.wait()
        if not self._ready:
            raise TransportNotReadyError(f"could not bind {self._bind_address()}")

    def addNode(self, node: Node) -> None:
        name = self._validator_by_address.get(node.address) if isinstance(node, TCPNode) else None
        if name is None or name == self._identity.name:
            raise TransportConfigError(f"{node!r} is not another validator in the genesis")
        self._nodes[name] = node

    def dropNode(self, node: Node) -> None:
        name = self._peer_name(node)
        if name is None:
            return
        self._nodes.pop(name, None)
        self._last_dial.pop(name, None)
        for connection in (self._authenticated.get(name), self._dialing.get(name)):
            if connection is not None:
                self._close(connection)

    def send(self, node: Node, message: object) -> bool:
        name = self._peer_name(node)
        connection = self._authenticated.get(name) if name is not None else None
        if connection is None or connection.cipher is None:
            return False
        if isinstance(message, dict) and message.get("type") == "next_node_idx" and "term" not in message:
            # pysyncobj answers an append without saying for which term; it answers in the tick that handled
            # the append, whose term it has just taken, so the current term is the append's. The leader's
            # adapter drops answers of other terms (_LedgerSyncObj._SyncObj__onMessageReceived).
            message = {**message, "term": self._current_term()}
        try:
            payloads = encode_message_parts(
                message, peer_frame_bytes_max - _authentication_tag_bytes
            )
        except WireError as error:
            self._drop(connection, message_type_label(message), "unsupported", error.reason)
            return False
        self._before_send(message_type_label(message))
        for payload in payloads:
            ciphertext = connection.cipher.seal(payload)
            connection.write_buffer += len(ciphertext).to_bytes(_frame_header_bytes, "big")
            connection.write_buffer += ciphertext
        if message_type_label(message) == "append_entries" and connection.awaited_since is None:
            # pysyncobj answers every current append_entries with next_node_idx, so a peer that
            # stays silent after one is hung or gone. Replies (next_node_idx, response_vote) are not
            # answered, so idle connections, e.g. between followers, never time out.
            connection.awaited_since = monotonic_time()
        self._flush(connection)
        if len(connection.write_buffer) > send_buffer_bytes_max:
            logger.warning(
                "raft transport %s: %d bytes unsent to %s, above %d; disconnecting the slow peer",
                self._identity.name, len(connection.write_buffer), name, send_buffer_bytes_max,
            )
            self._close(connection)
        return connection.phase is _Phase.AUTHENTICATED

    def destroy(self) -> None:
        self.setOnMessageReceivedCallback(None)
        self.setOnNodeConnectedCallback(None)
        self.setOnNodeDisconnectedCallback(None)
        self.setOnReadonlyNodeConnectedCallback(None)
        self.setOnReadonlyNodeDisconnectedCallback(None)
        self._destroyed = True
        connections = [*self._authenticated.values(), *self._dialing.values()]
        for connection in connections + list(self._incoming_handshakes):
            self._close(connection)
        self._close_listener()

    def _onTick(self) -> None:
        if self._destroyed:
            return
        try:
            self._maybe_bind()
        except TransportNotReadyError:
            pass  # Logged; retried after bindRetryTime while Raft runs on, as in TCPTransport.
        now = monotonic_time()
        self._expire_handshakes(now)
        self._expire_silent_peers(now)
        self._dial_missing_peers(now)

    # Listening -----------------------------------------------------------------------------------

    def _bind_address(self) -> str:
        # An explicit conf.bindAddress wins (e.g. 0.0.0.0 inside a container); otherwise bind
        # exactly the genesis address, never pysyncobj's 0.0.0.0 default.
        return self._conf.bindAddress or self._identity.raft_address

    def _maybe_bind(self) -> None:
        if self._destroyed or self._is_institution or self._listener is not None:
            return
        if monotonic_time() < self._last_bind_attempt + self._conf.bindRetryTime:
            return
        self._last_bind_attempt = monotonic_time()
        try:
            self._listener = self._bind_listener()
        except OSError as error:
            self._bind_attempts += 1
            logger.warning(
                "raft transport %s: cannot bind %s: %s",
                self._identity.name, self._bind_address(), error,
            )
            if self._conf.maxBindRetries and self._bind_attempts >= self._conf.maxBindRetries:
                self._bind_over.set()
                raise TransportNotReadyError(f"cannot bind {self._bind_address()}") from error
        else:
            self._bind_attempts = 0
            self._ready = True
            self._bind_over.set()

    def _bind_listener(self) -> socket.socket:
        host, port = _split_address(self._bind_address())
        family, _, _, _, socket_address = socket.getaddrinfo(
            host, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setblocking(False)
            listener.bind(socket_address)
            listener.listen(listen_backlog_connections)
        except OSError:
            listener.close()
            raise
        self._poller.subscribe(
            listener.fileno(), self._on_listener_event, POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR
        )
        logger.info("raft transport %s: listening on %s", self._identity.name, socket_address)
        return listener

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._poller.unsubscribe(self._listener.fileno())
            self._listener.close()
            self._listener = None

    def _on_listener_event(self, descriptor: int, event: int) -> None:
        if self._listener is None or descriptor != self._listener.fileno():
            return
        if event & POLL_EVENT_TYPE.ERROR:
            logger.warning("raft transport %s: listener error; binding again", self._identity.name)
            self._close_listener()
            return
        # Bounded so that a connection flood cannot keep the tick thread in accept().
        for _ in range(listen_backlog_connections):
            if not self._accept_one():
                return

    def _accept_one(self) -> bool:
        assert self._listener is not None  # only called from the listener's own event
        try:
            sock, address = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as error:
            logger.warning("raft transport %s: accept failed: %s", self._identity.name, error)
            return False
        remote = _format_remote(address)
        if len(self._incoming_handshakes) >= unauthenticated_connections_max:
            sock.close()
            self._report_handshake_refusal(
                "too_many_connections", remote, f"{unauthenticated_connections_max} pending"
            )
            return True
        self._configure(sock)
        connection = _Connection(sock, remote, _Phase.AWAITING_HELLO)
        connection.handshake = ResponderHandshake(
            cluster_id=self._cluster_id,
            self_name=self._identity.name,
            signing_key=self._signing_key,
            initiator_key=self._acceptable_initiator_key,
        )
        self._incoming_handshakes.add(connection)
        self._start(connection)
        return True

    def _acceptable_initiator_key(self, name: str) -> nacl.signing.VerifyKey | None:
        peer = self._peers.get(name)
        if peer is None:
            peer = self._admitted_peer(name)
            if peer is None or peer.role != "institution" or peer.name != name:
                return None
            self._peers[name] = peer
            self._verify_keys[name] = nacl.signing.VerifyKey(peer.public_key)
        if peer.role == "validator" and name not in self._nodes:
            return None
        return self._verify_keys[name]

    # Dialling ------------------------------------------------------------------------------------

    def _dial_missing_peers(self, now: float) -> None:
        for name in list(self._nodes):
            if name in self._authenticated or name in self._dialing or not self._dials(name):
                continue
            if now - self._last_dial.get(name, -self._conf.connectionRetryTime) < (
                self._conf.connectionRetryTime
            ):
                continue
            self._last_dial[name] = now
            self._dial(name)

    def _dials(self, name: str) -> bool:
        # pysyncobj's rule: the greater address initiates; a read-only node dials every validator.
        return self._is_institution or self._identity.raft_address > self._peers[name].raft_address

    def _dial(self, name: str) -> None:
        host, port = _split_address(self._peers[name].raft_address)
        address = globalDnsResolver().resolve(host)
        if address is None:
            return
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        self._configure(sock)
        result = sock.connect_ex((address, port))
        if result not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            logger.debug(
                "raft transport %s: connect to %s failed: %s",
                self._identity.name, name, os.strerror(result),
            )
            sock.close()
            return
        connection = _Connection(sock, _format_remote((address, port)), _Phase.CONNECTING)
        connection.peer_name = name
        connection.handshake = InitiatorHandshake(
            cluster_id=self._cluster_id,
            self_name=self._identity.name,
            responder=self._peers[name],
            signing_key=self._signing_key,
        )
        self._dialing[name] = connection
        self._start(connection)

    def _on_connect_event(self, connection: _Connection) -> None:
        try:
            connection.socket.getpeername()
        except OSError:
            if connection.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._close(connection)
            return  # Still connecting (or a stale event for a reused descriptor).
        assert isinstance(connection.handshake, InitiatorHandshake)
        connection.phase = _Phase.AWAITING_RESPONSE
        connection.write_buffer += _handshake_frame(connection.handshake.hello)
        self._flush(connection)

    # Socket events -------------------------------------------------------------------------------

    def _configure(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._conf.sendBufferSize)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._conf.recvBufferSize)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keepalive = self._conf.tcp_keepalive
        if keepalive is not None and hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive[0])
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive[1])
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive[2])

    def _start(self, connection: _Connection) -> None:
        connection.on_event = functools.partial(self._on_connection_event, connection)
        self._subscribe(connection)

    def _subscribe(self, connection: _Connection) -> None:
        mask = POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR
        if connection.phase is _Phase.CONNECTING or connection.write_buffer:
            mask |= POLL_EVENT_TYPE.WRITE
        if mask != connection.subscribed_mask:
            self._poller.subscribe(connection.socket.fileno(), connection.on_event, mask)
            connection.subscribed_mask = mask

    def _on_connection_event(self, connection: _Connection, descriptor: int, event: int) -> None:
        if connection.phase is _Phase.CLOSED or descriptor != connection.socket.fileno():
            return
        if connection.phase is _Phase.CONNECTING:
            self._on_connect_event(connection)
            return
        # An error or hang-up is confirmed by reading (EOF or the pending error), not trusted: a
        # stale event for a descriptor number that was closed and reused must not kill a new peer.
        if event & (POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR):
            self._read(connection)
        if connection.phase is not _Phase.CLOSED and event & POLL_EVENT_TYPE.WRITE:
            self._flush(connection)

    def _read(self, connection: _Connection) -> None:
        read_bytes = 0
        while connection.phase is not _Phase.CLOSED and read_bytes <= peer_frame_bytes_max:
            chunk_bytes = (
                receive_chunk_bytes
                if connection.phase is _Phase.AUTHENTICATED
                else _handshake_header_bytes + handshake_frame_bytes_max
            )
            try:
                chunk = connection.socket.recv(chunk_bytes)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                logger.debug("raft transport: receive from %s failed: %s", connection.remote, error)
                self._close(connection)
                return
            if not chunk:
                self._close(connection)
                return
            read_bytes += len(chunk)
            connection.read_buffer += chunk
            self._process_read_buffer(connection)

    def _flush(self, connection: _Connection) -> None:
        while connection.write_buffer and connection.phase is not _Phase.CLOSED:
            try:
                sent = connection.socket.send(connection.write_buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                logger.debug("raft transport: send to %s failed: %s", connection.remote, error)
                self._close(connection)
                return
            del connection.write_buffer[:sent]
        if connection.phase is not _Phase.CLOSED:
            self._subscribe(connection)

    # Framing -------------------------------------------------------------------------------------

    def _process_read_buffer(self, connection: _Connection) -> None:
        buffer = connection.read_buffer
        while connection.phase is not _Phase.CLOSED:
            authenticated = connection.phase is _Phase.AUTHENTICATED
            header_bytes = _frame_header_bytes if authenticated else _handshake_header_bytes
            if len(buffer) < header_bytes:
                return
            length = int.from_bytes(buffer[:header_bytes], "big")
            if authenticated and length > peer_frame_bytes_max:
                self._refuse_frame(connection, "frame_too_large", f"{length} bytes")
                return
            if not authenticated and length > handshake_frame_bytes_max:
                self._refuse_handshake(connection, "frame_too_large", f"{length} bytes")
                return
            if len(buffer) < header_bytes + length:
                return
            body = bytes(buffer[header_bytes : header_bytes + length])
            del buffer[: header_bytes + length]
            if authenticated:
                self._on_frame(connection, body)
            else:
                self._on_handshake_frame(connection, body)

    def _on_handshake_frame(self, connection: _Connection, body: bytes) -> None:
        handshake = connection.handshake
        try:
            awaiting_hello = connection.phase is _Phase.AWAITING_HELLO
            if isinstance(handshake, ResponderHandshake) and awaiting_hello:
                response = handshake.respond(body)
                connection.peer_name = handshake.initiator_name
                connection.phase = _Phase.AWAITING_CONFIRMATION
                connection.write_buffer += _handshake_frame(response)
                self._flush(connection)
            elif isinstance(handshake, ResponderHandshake):
                self._authenticate(connection, handshake.finish(body))
            elif isinstance(handshake, InitiatorHandshake):
                confirmation, keys = handshake.confirm(body)
                # The confirmation must precede the first encrypted frame in the write buffer.
                connection.write_buffer += _handshake_frame(confirmation)
                self._authenticate(connection, keys)
                self._flush(connection)
        except HandshakeRefused as refusal:
            self._refuse_handshake(connection, refusal.reason, refusal.detail)

    def _on_frame(self, connection: _Connection, ciphertext: bytes) -> None:
        assert connection.cipher is not None  # set when the connection was authenticated
        assert connection.peer_name is not None
        name = connection.peer_name
        try:
            plaintext = connection.cipher.open(ciphertext)
        except nacl.exceptions.CryptoError:
            self._refuse_frame(connection, "authentication", "frame failed authentication")
            return
        try:
            message = decode_message(plaintext)
        except WireError as error:
            self._refuse_frame(connection, "malformed", error.reason)
            return
        message_type = str(message["type"])
        if not self._permitted(name, message_type):
            self._drop(connection, message_type, "not_permitted", "not allowed for this role")
            return
        if message_type == "next_node_idx" and connection.awaited_since is not None:
            round_trip_seconds = monotonic_time() - connection.awaited_since
            connection.awaited_since = None
            self._observer.round_trip_observed(name, round_trip_seconds)
        assert connection.node is not None
        self._onMessageReceived(connection.node, message)

    def _permitted(self, name: str, message_type: str) -> bool:
        if self._is_institution:
            return message_type in _types_to_institution
        if self._peers[name].role == "institution":
            return message_type in _types_from_institution
        return True

    # Connection lifecycle ------------------------------------------------------------------------

    def _authenticate(self, connection: _Connection, keys: SessionKeys) -> None:
        name = connection.peer_name
        assert name is not None  # set from the verified hello or by the dialler
        connection.cipher = FrameCipher(keys)
        connection.handshake = None
        connection.phase = _Phase.AUTHENTICATED
        self._incoming_handshakes.discard(connection)
        if self._dialing.get(name) is connection:
            del self._dialing[name]
        previous = self._authenticated.get(name)
        if previous is not None:
            # A peer that connects again has restarted; its old connection is dead or soon will be.
            self._close(previous)
        peer = self._peers[name]
        connection.node = self._nodes[name] if peer.role == "validator" else Node(name)
        self._authenticated[name] = connection
        logger.info(
            "raft transport %s: %s %s connected from %s",
            self._identity.name, peer.role, name, connection.remote,
        )
        if peer.role == "validator":
            self._onNodeConnected(connection.node)
        else:
            self._onReadonlyNodeConnected(connection.node)
        self._observer.peer_connected(name, peer.role)

    def _close(self, connection: _Connection) -> None:
        if connection.phase is _Phase.CLOSED:
            return
        was_authenticated = connection.phase is _Phase.AUTHENTICATED
        connection.phase = _Phase.CLOSED
        connection.handshake = None
        connection.cipher = None
        connection.read_buffer.clear()
        connection.write_buffer.clear()
        if connection.subscribed_mask:
            self._poller.unsubscribe(connection.socket.fileno())
        connection.socket.close()
        self._incoming_handshakes.discard(connection)
        name = connection.peer_name
        if name is not None and self._dialing.get(name) is connection:
            del self._dialing[name]
        if not was_authenticated or name is None or self._authenticated.get(name) is not connection:
            return
        del self._authenticated[name]
        logger.info("raft transport %s: %s disconnected", self._identity.name, name)
        if self._peers[name].role == "validator":
            self._onNodeDisconnected(connection.node)
        else:
            self._onReadonlyNodeDisconnected(connection.node)
        self._observer.peer_disconnected(name)

    def _expire_handshakes(self, now: float) -> None:
        for connection in [*self._incoming_handshakes, *self._dialing.values()]:
            if now <= connection.deadline:
                continue
            if connection.phase is _Phase.CONNECTING:
                logger.debug(
                    "raft transport %s: connect to %s timed out",
                    self._identity.name, connection.peer_name,
                )
                self._close(connection)
            else:
                self._refuse_handshake(
                    connection, "timeout", f"not finished in {handshake_timeout_seconds} s"
                )

    def _expire_silent_peers(self, now: float) -> None:
        for name, connection in list(self._authenticated.items()):
            since = connection.awaited_since
            if since is not None and now - since > self._conf.connectionTimeout:
                logger.warning(
                    "raft transport %s: %s has not answered for %.1f s; reconnecting",
                    self._identity.name, name, now - since,
                )
                self._close(connection)

    def _peer_name(self, node: Node) -> str | None:
        if isinstance(node, TCPNode):
            return self._validator_by_address.get(node.address)
        peer = self._peers.get(node.id) if isinstance(node.id, str) else None
        return node.id if peer is not None and peer.role == "institution" else None

    # Refusals ------------------------------------------------------------------------------------

    def _refuse_handshake(
        self, connection: _Connection, reason: HandshakeRefusalReason, detail: str
    ) -> None:
        # Counted before the close: whoever sees the connection closed finds the refusal already counted.
        self._report_handshake_refusal(reason, connection.remote, detail)
        self._close(connection)

    def _report_handshake_refusal(
        self, reason: HandshakeRefusalReason, remote: str, detail: str
    ) -> None:
        # Keyed by host, not host:port: every attacking connection has a new source port.
        self._refusal_log.warning(
            (reason, remote.rpartition(":")[0]),
            "raft transport %s: handshake with %s refused (%s): %s",
            self._identity.name, remote, reason, detail,
        )
        self._observer.handshake_refused(reason, remote)

    def _refuse_frame(
        self, connection: _Connection, reason: FrameRefusalReason, detail: str
    ) -> None:
        peer = connection.peer_name or connection.remote
        self._refusal_log.warning(
            (reason, peer),
            "raft transport %s: frame from %s refused (%s): %s",
            self._identity.name, peer, reason, detail,
        )
        self._observer.frame_refused(peer, reason)
        self._close(connection)  # after counting, as in _refuse_handshake

    def _drop(
        self, connection: _Connection, message_type: str, reason: DropReason, detail: str
    ) -> None:
        peer = connection.peer_name or connection.remote
        direction = "to" if reason == "unsupported" else "from"
        self._refusal_log.warning(
            (reason, peer),
            "raft transport %s: %s message %s %s dropped (%s): %s",
            self._identity.name, message_type, direction, peer, reason, detail,
        )
        self._observer.message_dropped(peer, message_type, reason)


class _RateLimitedLog:
    """At most one warning line per key per interval, so a flood cannot flood the log."""

    def __init__(self, interval_seconds: float) -> None:
        self._interval_seconds = interval_seconds
        self._last_logged: dict[tuple[str, str], float] = {}
        self._last_pruned = 0.0

    def warning(self, key: tuple[str, str], message: str, *arguments: object) -> None:
        now = monotonic_time()
        if now - self._last_pruned > self._interval_seconds:
            self._last_logged = {
                seen: at for seen, at in self._last_logged.items()
                if now - at < self._interval_seconds
            }
            self._last_pruned = now
        last = self._last_logged.get(key)
        if last is not None and now - last < self._interval_seconds:
            return
        self._last_logged[key] = now
        logger.warning(message, *arguments)


def _check_identity(
    self_name: str,
    self_node: TCPNode | None,
    signing_key: nacl.signing.SigningKey,
    peers: Mapping[str, PeerIdentity],
) -> PeerIdentity:
    for name, peer in peers.items():
        if peer.name != name:
            raise TransportConfigError(f"peers[{name!r}] describes {peer.name!r}")
    addresses = [peer.raft_address for peer in peers.values() if peer.role == "validator"]
    if len(set(addresses)) != len(addresses):
        raise TransportConfigError("two validators share a raft address")
    identity = peers.get(self_name)
    if identity is None:
        raise TransportConfigError(f"self {self_name!r} is not in the genesis peers")
    if signing_key.verify_key.encode() != identity.public_key:
        raise TransportConfigError(f"the signing key is not {self_name!r}'s genesis key")
    if self_node is None and identity.role != "institution":
        raise TransportConfigError(f"{self_name!r} is a validator but pysyncobj gave no self node")
    if self_node is not None and (
        identity.role != "validator" or self_node.address != identity.raft_address
    ):
        raise TransportConfigError(
            f"pysyncobj self node {self_node.address!r} is not validator {self_name!r}"
        )
    return identity


def _split_address(address: str) -> tuple[str, int]:
    host, separator, port = address.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 2**16:
        raise TransportConfigError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def _format_remote(address: tuple[object, ...]) -> str:
    return f"{address[0]}:{address[1]}"


def _pack_handshake(fields: list[object]) -> bytes:
    return msgpack.packb(
        fields,
        use_bin_type=True,
        strict_types=True,
        use_single_float=False,
        autoreset=True,
        datetime=False,
        unicode_errors="strict",
    )


def _handshake_frame(body: bytes) -> bytes:
    return len(body).to_bytes(_handshake_header_bytes, "big") + body


def _unpack_handshake(body: bytes) -> list[object]:
    try:
        fields = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
            timestamp=0,
            max_str_len=handshake_frame_bytes_max,
            max_bin_len=handshake_frame_bytes_max,
            max_array_len=handshake_frame_bytes_max,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException) as error:
        raise HandshakeRefused("malformed", f"not one msgpack value: {error}") from None
    if type(fields) is not list:
        raise HandshakeRefused("malformed", "handshake message must be an array")
    return fields


def _is_key(value: object) -> bool:
    return type(value) is bytes and len(value) == _key_bytes


def _verify(key: nacl.signing.VerifyKey, message: bytes, signature: object) -> None:
    if type(signature) is not bytes or len(signature) != _signature_bytes:
        raise HandshakeRefused("malformed", "signature must be 64 bytes")
    try:
        key.verify(message, signature)
    except nacl.exceptions.BadSignatureError:
        raise HandshakeRefused("bad_signature", "not signed by the genesis key") from None


def _transcript_hash(hello: bytes, responder_ephemeral: bytes, responder_nonce: bytes) -> bytes:
    transcript = hashlib.blake2b(digest_size=32, person=_transcript_person)
    transcript.update(hello)
    transcript.update(responder_ephemeral)
    transcript.update(responder_nonce)
    return transcript.digest()


def _shared_secret(own_secret: bytes, peer_public: bytes) -> bytes:
    try:
        shared = nacl.bindings.crypto_scalarmult(own_secret, peer_public)
    except nacl.exceptions.CryptoError:
        shared = bytes(_key_bytes)  # libsodium refuses low-order points; treat as all-zero
    if shared == bytes(_key_bytes):
        raise HandshakeRefused("malformed", "ephemeral key is a low-order point")
    return shared


def _derive_key(shared: bytes, transcript: bytes, direction: bytes) -> bytes:
    return hashlib.blake2b(
        transcript + direction, digest_size=32, key=shared, person=_key_person
    ).digest()
