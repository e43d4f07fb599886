"""The hardened Raft layer against real node processes: hostile peers, crashes, flipped bits, divergence."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from config.keys import load_signing_key
from config.loader import load_genesis
from consensus.raft.transport import FrameCipher, InitiatorHandshake, PeerIdentity
from consensus.raft.wire import encode_message
from node.client import Client, ClientError, new_transfer_id
from node.cluster import LocalCluster, customer_funding
from tests.cluster.conftest import _remember, start_cluster

pytestmark = pytest.mark.cluster

connection_close_seconds = 10.0


# Raw peers ----------------------------------------------------------------------------------------------


def raft_address(cluster: LocalCluster, name: str) -> tuple[str, int]:
    host, port = cluster.nodes[name].raft_address.rsplit(":", 1)
    return host, int(port)


def peer_identity(cluster: LocalCluster, name: str) -> PeerIdentity:
    spec = load_genesis(Path(cluster.description["genesis"])).node(name)
    return PeerIdentity(spec.name, str(spec.role), spec.public_key, str(spec.raft_address))


def node_key(cluster: LocalCluster, name: str) -> SigningKey:
    return load_signing_key(cluster.nodes[name].directory / "node.key")


def handshake(cluster: LocalCluster, responder: str, as_name: str, key: SigningKey) -> tuple[socket.socket, FrameCipher]:
    """Dial `responder`'s Raft port as `as_name` and complete the handshake with `key`."""
    connection = socket.create_connection(raft_address(cluster, responder), timeout=5)
    initiator = InitiatorHandshake(
        cluster_id=cluster.cluster_id, self_name=as_name, responder=peer_identity(cluster, responder), signing_key=key
    )
    connection.sendall(struct.pack(">H", len(initiator.hello)) + initiator.hello)
    (length,) = struct.unpack(">H", _read_exactly(connection, 2))
    confirmation, keys = initiator.confirm(_read_exactly(connection, length))
    connection.sendall(struct.pack(">H", len(confirmation)) + confirmation)
    return connection, FrameCipher(keys)


def _read_exactly(connection: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = connection.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed during the handshake")
        data += chunk
    return data


def sealed(cipher: FrameCipher, plaintext: bytes) -> bytes:
    ciphertext = cipher.seal(plaintext)
    return struct.pack(">I", len(ciphertext)) + ciphertext


def closed_by_peer(connection: socket.socket, timeout_seconds: float = connection_close_seconds) -> bool:
    """True once the node closes the connection (reading past anything it still sends us)."""
    connection.settimeout(timeout_seconds)
    deadline = time.monotonic() + timeout_seconds
    try:
        while time.monotonic() < deadline:
            if not connection.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def metric(cluster: LocalCluster, node: str, name: str, labels: str = "") -> float:
    _code, text = cluster.admin_get(node, "/metrics")
    prefix = name + ("{" + labels + "}" if labels else "")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def commit_one(cluster: LocalCluster, via: str = "v1") -> None:
    with cluster.client(via) as client:
        (result,) = client.submit([cluster.transfer("c1.khr@aba", "c2.khr@aba", 1, "KHR")], deadline_seconds=30)
    assert (result["status"], result["result"]) == ("applied", "ok")


def wait_alive(cluster: LocalCluster, name: str, timeout_seconds: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        try:
            if cluster.admin_get(name, "/livez")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{name} did not answer /livez within {timeout_seconds} s\n{cluster.logs([name])}")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class _Marker:
    """A pickle that would create a marker file if anything ever unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


# Tests --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def impersonated(tmp_path_factory):
    """A network whose aba-1 and v3 are stopped, so the tests can speak with their keys without the real
    nodes reconnecting and displacing the test's connection (which would close it for the wrong reason)."""
    cluster = start_cluster(tmp_path_factory.mktemp("impersonated") / "network")
    with cluster:
        cluster.stop(["aba-1", "v3"])
        cluster.wait_for_leader(among=["v1", "v2"])
        yield cluster


@pytest.fixture
def network(request, impersonated):
    _remember(request, impersonated)
    return impersonated


def test_a_crafted_pickle_executes_nothing_with_or_without_a_handshake(network, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Marker(marker), protocol=2)
    host, port = raft_address(network, "v1")

    # As pysyncobj frames it, and as a pre-authentication handshake frame.
    for frame in (struct.pack("i", len(zlib.compress(payload))) + zlib.compress(payload), struct.pack(">H", len(payload)) + payload):
        with socket.create_connection((host, port), timeout=5) as connection:
            connection.sendall(frame)
            assert closed_by_peer(connection)

    # After a genuine handshake, from an institution node and from a validator, as the frame's plaintext.
    malformed_before = metric(network, "v1", "tonle_raft_frames_refused_total", 'reason="malformed"')
    for as_name in ("aba-1", "v3"):
        connection, cipher = handshake(network, "v1", as_name, node_key(network, as_name))
        with connection:
            connection.sendall(sealed(cipher, payload))
            assert closed_by_peer(connection)
    assert metric(network, "v1", "tonle_raft_frames_refused_total", 'reason="malformed"') == malformed_before + 2

    # Inside a well-formed append_entries from a validator, as the command of a log entry.
    connection, cipher = handshake(network, "v1", "v3", node_key(network, "v3"))
    with connection:
        message = {"type": "append_entries", "term": 0, "commit_index": 0, "prevLogIdx": 1, "prevLogTerm": 0,
                   "entries": [(b"\x02" + payload, 2, 0), (b"\x00" + payload, 3, 0)]}
        connection.sendall(sealed(cipher, encode_message(message)))
    time.sleep(1)
    assert not marker.exists()
    commit_one(network)
    assert not marker.exists()


def test_an_unknown_key_a_borrowed_name_and_a_replayed_frame_are_refused_logged_and_counted(network):
    before = {
        reason: metric(network, "v1", "tonle_raft_handshakes_refused_total", f'reason="{reason}"')
        for reason in ("unknown_peer", "bad_signature")
    }
    replay_before = metric(network, "v1", "tonle_raft_frames_refused_total", 'reason="authentication"')

    with pytest.raises(ConnectionError):
        handshake(network, "v1", "mallory", SigningKey.generate())

    impostor, _cipher = handshake(network, "v1", "v2", SigningKey.generate())  # v2's name, not v2's key
    with impostor:
        assert closed_by_peer(impostor)

    connection, cipher = handshake(network, "v1", "aba-1", node_key(network, "aba-1"))
    with connection:
        frame = sealed(cipher, encode_message({"type": "next_node_idx", "term": 1, "next_node_idx": 2, "reset": False, "success": False}))
        connection.sendall(frame)
        connection.sendall(frame)  # the same bytes again: a replay
        assert closed_by_peer(connection)

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        counts = {
            reason: metric(network, "v1", "tonle_raft_handshakes_refused_total", f'reason="{reason}"')
            for reason in ("unknown_peer", "bad_signature")
        }
        replays = metric(network, "v1", "tonle_raft_frames_refused_total", 'reason="authentication"')
        if all(counts[reason] > before[reason] for reason in counts) and replays > replay_before:
            break
        time.sleep(0.2)
    assert all(counts[reason] > before[reason] for reason in counts), counts
    assert replays > replay_before
    log = network.nodes["v1"].log.read_text()
    for reason in ("unknown_peer", "bad_signature", "authentication"):
        assert reason in log, reason
    commit_one(network)


def test_64_mib_of_garbage_grows_memory_by_less_than_16_mib_and_commits_continue(network):
    leader = network.wait_for_leader()
    pid = network.nodes[leader].pid
    commit_one(network)
    before = rss_bytes(pid)
    sent = 0
    generator = random.Random(7)
    block = bytes(generator.getrandbits(8) for _ in range(1 << 16))
    total = 64 << 20
    while sent < total:
        with socket.create_connection(raft_address(network, leader), timeout=5) as connection:
            try:
                while sent < total:
                    connection.sendall(block)
                    sent += len(block)
            except (BrokenPipeError, ConnectionResetError):
                pass
    # And from an authenticated peer: a frame header announcing 2 GiB.
    connection, _cipher = handshake(network, leader, "aba-1", node_key(network, "aba-1"))
    with connection:
        connection.sendall(struct.pack(">I", 2**31 - 1) + block)
        assert closed_by_peer(connection)
    commit_one(network, via=leader)
    assert rss_bytes(pid) - before < 16 << 20


def test_the_raft_port_listens_only_on_its_configured_address(network):
    host, port = raft_address(network, "v1")
    assert host == "127.0.0.1"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=5).close()


class _ModelWorkload:
    """Concurrent transfers that remember everything submitted and everything acknowledged."""

    def __init__(self, cluster: LocalCluster, threads: int = 6) -> None:
        self.cluster = cluster
        self.submitted: dict[bytes, tuple[str, str, int]] = {}
        self.acknowledged: set[bytes] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._accounts = [a["account"] for a in cluster.customer_accounts() if a["currency"] == "KHR"]
        names = list(cluster.nodes)
        self._threads = [
            threading.Thread(target=self._run, args=(number, names[number % len(names)]), daemon=True)
            for number in range(threads)
        ]

    def _run(self, number: int, node: str) -> None:
        generator = random.Random(1000 + number)
        client = Client(self.cluster.nodes[node].client_address, timeout_seconds=5)
        while not self._stop.is_set():
            debit, credit = generator.sample(self._accounts, 2)
            amount = generator.randint(1, 1000)
            transfer_id = new_transfer_id()
            with self._lock:
                self.submitted[transfer_id] = (debit, credit, amount)
            entry = self.cluster.transfer(debit, credit, amount, "KHR", transfer_id)
            try:
                (result,) = client.submit([entry], deadline_seconds=5)
            except ClientError:
                time.sleep(0.1)
                continue
            if result["status"] == "applied" and result["result"] == "ok":
                with self._lock:
                    self.acknowledged.add(transfer_id)
        client.close()

    def __enter__(self) -> _ModelWorkload:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def __exit__(self, *exception: object) -> None:
        self.stop()


def check_against_model(cluster: LocalCluster, workload: _ModelWorkload) -> None:
    """Every acknowledged transfer applied once on every node, and balances equal the model's replay."""
    expected = {account: customer_funding["KHR"] for account in workload._accounts}
    for name in cluster.nodes:
        applied = set()
        with cluster.client(name) as client:
            for transfer_id, (debit, credit, amount) in workload.submitted.items():
                found = client.lookup_transfer(transfer_id)
                if found is not None and found["result"] == "ok":
                    applied.add(transfer_id)
            balances = {account: client.balance(account)["balance"] for account in expected}
        assert workload.acknowledged <= applied, f"{name} lost {len(workload.acknowledged - applied)} acknowledged transfers"
        model = dict(expected)
        for transfer_id in applied:
            debit, credit, amount = workload.submitted[transfer_id]
            model[debit] -= amount
            model[credit] += amount
        assert balances == model, f"{name}: balances differ from one application of each applied transfer"


def test_sigkill_of_every_node_with_transfers_in_flight_loses_and_duplicates_nothing(cluster):
    with _ModelWorkload(cluster) as workload:
        time.sleep(3)
        cluster.kill()
        count = len(workload.acknowledged)
        time.sleep(1)
        cluster.start()
        cluster.wait_for_leader()
        time.sleep(3)
    assert count > 0 and len(workload.acknowledged) > count, "the network did not commit before and after the crash"
    statuses = cluster.wait_converged()
    assert len({status["state_hash"] for status in statuses.values()}) == 1
    check_against_model(cluster, workload)


def _record_offsets(journal: Path) -> list[tuple[int, int]]:
    """(offset, payload length) of every record in a raft.log (16-byte header; 20-byte record header)."""
    data = journal.read_bytes()
    offsets, position = [], 16
    while position + 20 <= len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        offsets.append((position, length))
        position += 20 + length + 16
    return offsets


@pytest.mark.parametrize("state_wiped", [False, True], ids=["state-kept", "state-wiped"])
def test_a_bit_flipped_in_a_committed_log_record_never_applies_different_data(cluster, state_wiped):
    for _ in range(30):
        commit_one(cluster)
    reference = cluster.wait_converged()
    follower = next(name for name in cluster.validators() if reference[name]["role"] == "follower")
    cluster.stop([follower])
    journal = cluster.nodes[follower].data_dir / "raft" / "journal" / "raft.log"
    offsets = _record_offsets(journal)
    offset, length = offsets[len(offsets) // 2]
    data = bytearray(journal.read_bytes())
    data[offset + 20 + length // 2] ^= 0x04
    journal.write_bytes(bytes(data))
    if state_wiped:
        # The node must now re-apply the whole log: the damaged record must come from its peers instead.
        shutil.rmtree(cluster.nodes[follower].data_dir / "state")
    cluster.start([follower])
    commit_one(cluster)
    statuses = cluster.wait_converged()
    assert statuses[follower]["state_hash"] == statuses["v1"]["state_hash"]
    assert "damaged" in cluster.nodes[follower].log.read_text()
    deadline = time.monotonic() + 30
    while metric(cluster, follower, "tonle_raft_recovering") != 0 and time.monotonic() < deadline:
        commit_one(cluster)
        time.sleep(0.2)
    assert metric(cluster, follower, "tonle_raft_recovering") == 0


def test_the_journal_fsyncs_once_per_batch_not_once_per_transfer(network):
    validators = [name for name in network.validators() if network.is_running(name)]
    fsyncs_before = {name: metric(network, name, "tonle_journal_fsync_seconds_count") for name in validators}
    applied_before = {name: metric(network, name, "tonle_entries_applied_total") for name in validators}
    entries = [network.transfer("c4.khr@aba", "c4.khr@acleda", 1, "KHR") for _ in range(2000)]
    with network.client(network.wait_for_leader()) as client:
        results = client.submit(entries)
    assert all(result["result"] == "ok" for result in results)
    network.wait_converged(validators)
    for name in validators:
        fsyncs = metric(network, name, "tonle_journal_fsync_seconds_count") - fsyncs_before[name]
        applied = metric(network, name, "tonle_entries_applied_total") - applied_before[name]
        assert applied >= 2000, name
        assert 0 < fsyncs * 20 < applied, f"{name}: {fsyncs} fsyncs for {applied} transfers"


def test_a_diverged_replica_raises_the_alarm_and_is_not_ready(request, tmp_path):
    cluster = start_cluster(tmp_path / "network")
    _remember(request, cluster)
    with cluster:
        statuses = cluster.wait_converged()
        follower = next(name for name in cluster.validators() if statuses[name]["role"] == "follower")
        cluster.stop([follower])
        cluster.start([follower], environment={"TONLE_FAILPOINTS": "apply_extra_record"})
        wait_alive(cluster, follower)
        deadline = time.monotonic() + 60
        while metric(cluster, follower, "tonle_state_diverged") != 1 and time.monotonic() < deadline:
            try:
                commit_one(cluster)
            except (ClientError, AssertionError):
                pass
            time.sleep(0.2)
        assert metric(cluster, follower, "tonle_state_diverged") == 1
        assert metric(cluster, follower, "tonle_state_divergence_total") >= 1
        code, body = cluster.admin_get(follower, "/readyz?verbose")
        assert code == 503 and "[-]not_diverged" in body
        assert "state divergence at index" in cluster.nodes[follower].log.read_text()


def test_a_state_in_an_older_layout_is_refused_at_start_with_what_to_do(tmp_path):
    from storage.rules import initialize
    from storage.state import open_store, schema_version

    cluster = LocalCluster.create(tmp_path / "network", validators=1, institutions=1)
    (name,) = cluster.validators()
    node = cluster.nodes[name]
    store = open_store(node.data_dir, map_size_bytes=64 << 20)
    with store.write() as transaction:
        initialize(transaction, load_genesis(Path(cluster.description["genesis"])))
        transaction.put_unhashed("meta", b"schema_version", (schema_version - 1).to_bytes(8, "big"))
    store.close()
    cluster.start([name])
    try:
        deadline = time.monotonic() + 60
        while cluster.is_running(name) and time.monotonic() < deadline:
            time.sleep(0.1)
        log = cluster.logs([name])
        assert not cluster.is_running(name), f"the node started on a state in layout {schema_version - 1}:\n{log}"
        assert f"layout version {schema_version - 1}" in log and "empty data directory" in log, log
    finally:
        cluster.kill()
