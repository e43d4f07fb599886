"""A working network: transfers through any node, bad input refused, leader loss, restarts and snapshots."""

from __future__ import annotations

import random
import shutil
import socket
import struct
import threading
import time
from dataclasses import replace

import pytest

from consensus.codec import pack
from consensus.entries import EntryKind, decode_entry, signing_payload
from node.client import Client, ClientError, new_transfer_id
from node.cluster import LocalCluster, local_raft
from node.protocol import decode_payload, encode_frame
from tests.cluster.conftest import _remember, start_cluster

pytestmark = pytest.mark.cluster


def crafted_transfer(cluster: LocalCluster, fields: list, signer: str, *, cluster_id: str | None = None) -> bytes:
    """Sign a transfer body the client library would refuse to build (bad amounts...)."""
    network = cluster_id or cluster.cluster_id
    # id, debit, credit, amount, currency; then flags, pending id, timeout, reference, code, rate terms.
    body = pack([1, *fields, 0, b"", 0, "", 0, 0, 0])
    key = cluster.institution_key(signer)
    signature = key.sign(signing_payload(network, EntryKind.TRANSFER, body)).signature
    return pack([1, network, int(EntryKind.TRANSFER), body, signer, bytes(key.verify_key), signature])


def balances(cluster: LocalCluster, node: str, accounts: list[str]) -> list[int]:
    with cluster.client(node) as client:
        return [client.balance(account)["balance"] for account in accounts]


def test_a_transfer_submitted_to_an_institution_node_is_applied_on_every_node(network):
    entry = network.transfer("c1.khr@aba", "c2.khr@acleda", 777, "KHR")
    with network.client("acleda-1") as client:
        (result,) = client.submit([entry])
    assert (result["status"], result["result"]) == ("applied", "ok")
    transfer_id = decode_entry(entry).body().id
    network.wait_converged()
    for name in network.nodes:
        with network.client(name) as client:
            found = client.lookup_transfer(transfer_id)
        assert found is not None and found["result"] == "ok" and found["amount"] == 777, name


def test_every_awaited_outcome_is_answered_and_released_on_every_node(network):
    """Several requests await the same entry, one request carries an entry twice, some go through a node
    that forwards: each gets the outcome, and no node keeps waiting for anything afterwards."""
    entries = [network.transfer("c1.khr@aba", "c2.khr@acleda", 5, "KHR") for _ in range(20)]
    answers: dict[str, list] = {}

    def submit(node: str, batch: list[bytes]) -> None:
        with network.client(node) as client:
            answers[node] = client.submit(batch)

    threads = [
        threading.Thread(target=submit, args=(node, entries + entries[:3]))
        for node in ("v1", "v2", "v3", "aba-1", "acleda-1")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(answers) == ["aba-1", "acleda-1", "v1", "v2", "v3"]
    for node, results in answers.items():
        assert len(results) == 23, node
        assert all(result["status"] == "applied" and result["result"] in ("ok", "exists") for result in results), (node, results)
    for node in network.nodes:
        _code, text = network.admin_get(node, "/metrics")
        assert "tonle_outcomes_awaited_entries 0.0" in text.splitlines(), node


def test_two_bodies_under_one_id_each_get_their_own_outcome_and_only_the_first_is_applied(network):
    """Waiters are matched by the bytes they sent, not by the id alone: the second body must not be told `ok`."""
    transfer_id = new_transfer_id()
    first = network.transfer("c1.khr@aba", "c2.khr@acleda", 11, "KHR", transfer_id=transfer_id)
    second = network.transfer("c1.khr@aba", "c2.khr@acleda", 12, "KHR", transfer_id=transfer_id)
    with network.client("v2") as client:
        results = client.submit([first, second])
    assert [(result["status"], result["result"]) for result in results] == [
        ("applied", "ok"), ("applied", "exists_with_different_fields"),
    ]
    with network.client("acleda-1") as client:
        (again,) = client.submit([second])
        found = client.lookup_transfer(transfer_id)
    assert (again["result"], found["amount"]) == ("exists_with_different_fields", 11)


def _bad_inputs(cluster: LocalCluster) -> list[tuple[str, bytes, str, str]]:
    """(case, entry, expected status, expected result) for every kind of bad input the issue lists."""
    debit, credit = "c1.khr@aba", "c2.khr@acleda"
    good = cluster.transfer(debit, credit, 10, "KHR")
    broken_signature = good[:-1] + bytes([good[-1] ^ 0x01])
    return [
        ("wrong signature", broken_signature, "rejected", "signature_invalid"),
        (
            "signature of another institution",
            crafted_transfer(cluster, [new_transfer_id(), debit, credit, 10, "KHR"], "acleda"),
            "applied",
            "signer_must_own_debit_account",
        ),
        (
            "another network",
            crafted_transfer(cluster, [new_transfer_id(), debit, credit, 10, "KHR"], "aba", cluster_id="tonle-elsewhere"),
            "rejected",
            "wrong_network",
        ),
        ("zero amount", crafted_transfer(cluster, [new_transfer_id(), debit, credit, 0, "KHR"], "aba"), "rejected", "amount_must_be_positive"),
        ("negative amount", crafted_transfer(cluster, [new_transfer_id(), debit, credit, -10, "KHR"], "aba"), "rejected", "amount_must_be_positive"),
        ("float amount", crafted_transfer(cluster, [new_transfer_id(), debit, credit, 10.0, "KHR"], "aba"), "rejected", "malformed_entry"),
        ("oversized amount", crafted_transfer(cluster, [new_transfer_id(), debit, credit, 2**63, "KHR"], "aba"), "rejected", "amount_out_of_range"),
        ("unknown debit account", cluster.transfer("nobody.khr@aba", credit, 10, "KHR"), "applied", "debit_account_not_found"),
        ("unknown credit account", cluster.transfer(debit, "nobody.khr@acleda", 10, "KHR"), "applied", "credit_account_not_found"),
        ("currency mismatch", cluster.transfer(debit, "c1.usd@acleda", 10, "KHR"), "applied", "accounts_must_have_the_same_currency"),
    ]


@pytest.mark.parametrize("node", ["v1", "v3", "aba-1"])
def test_bad_entries_get_their_typed_error_and_change_nothing(network, node):
    accounts = ["c1.khr@aba", "c2.khr@acleda", "c1.usd@acleda"]
    before = balances(network, node, accounts)
    for case, entry, status, result in _bad_inputs(network):
        with network.client(node) as client:
            (reply,) = client.submit([entry])
        assert (reply["status"], reply["result"]) == (status, result), case
    network.wait_converged()
    assert balances(network, node, accounts) == before
    with network.client(node) as client:
        assert client.status()["ready"]


def test_a_duplicate_id_with_a_different_body_is_refused_and_the_first_stands(network):
    transfer_id = new_transfer_id()
    first = network.transfer("c3.khr@aba", "c3.khr@acleda", 50, "KHR", transfer_id)
    second = network.transfer("c3.khr@aba", "c3.khr@acleda", 5000, "KHR", transfer_id)
    with network.client("v2") as client:
        assert client.submit([first])[0]["result"] == "ok"
        assert client.submit([first])[0]["result"] == "exists"
        assert client.submit([second])[0]["result"] == "exists_with_different_fields"
        assert client.lookup_transfer(transfer_id)["amount"] == 50


def _raw_exchange(address: str, data: bytes) -> list[dict]:
    host, port = address.rsplit(":", 1)
    replies = []
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(data)
        buffer = b""
        connection.settimeout(2)
        try:
            while True:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                buffer += chunk
                while len(buffer) >= 4 and len(buffer) >= 4 + struct.unpack(">I", buffer[:4])[0]:
                    length = struct.unpack(">I", buffer[:4])[0]
                    replies.append(decode_payload(buffer[4 : 4 + length]))
                    buffer = buffer[4 + length :]
        except TimeoutError:
            pass
    return replies


def test_a_malformed_frame_gets_an_error_and_the_connection_keeps_serving(network):
    garbage = b"\xc1\xc1\xc1"
    replies = _raw_exchange(
        network.nodes["v1"].client_address,
        struct.pack(">I", len(garbage)) + garbage + encode_frame({"id": 7, "op": "status"}),
    )
    assert replies[0]["error"]["code"] == "malformed_frame"
    assert replies[1]["id"] == 7 and replies[1]["ok"]


def test_an_oversized_frame_is_refused_before_it_is_read_and_the_node_keeps_serving(network):
    replies = _raw_exchange(network.nodes["v1"].client_address, struct.pack(">I", 64 << 20) + b"x" * 1000)
    assert [reply["error"]["code"] for reply in replies] == ["frame_too_large"]
    with network.client("v1") as client:
        assert client.status()["name"] == "v1"


def test_unknown_operations_and_fields_are_refused_by_name(network):
    with network.client("v2") as client:
        with pytest.raises(ClientError) as unknown:
            client.request("drop_database")
        assert unknown.value.code == "unknown_operation"
        with pytest.raises(ClientError) as extra:
            client.request("status", sneaky=True)
        assert extra.value.code == "malformed_request"


class _Workload:
    """Random transfers from several threads against chosen nodes, remembering what was acknowledged."""

    def __init__(self, cluster: LocalCluster, nodes: list[str], threads: int = 6) -> None:
        self.cluster = cluster
        self.nodes = nodes
        self.acknowledged: dict[bytes, int] = {}
        self.failed_attempts = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(number,), daemon=True) for number in range(threads)]
        accounts = [a["account"] for a in cluster.customer_accounts() if a["currency"] == "KHR"]
        self._accounts = accounts

    def _run(self, number: int) -> None:
        generator = random.Random(number)
        client = Client(self.cluster.nodes[self.nodes[number % len(self.nodes)]].client_address, timeout_seconds=15)
        while not self._stop.is_set():
            debit, credit = generator.sample(self._accounts, 2)
            transfer_id = new_transfer_id()
            entry = self.cluster.transfer(debit, credit, generator.randint(1, 100), "KHR", transfer_id)
            try:
                (result,) = client.submit([entry], deadline_seconds=30)
            except ClientError:
                self.failed_attempts += 1
                continue
            if result["status"] == "applied" and result["result"] in ("ok", "exists"):
                with self._lock:
                    self.acknowledged[transfer_id] = result["index"]
        client.close()

    def __enter__(self) -> _Workload:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exception: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def _assert_all_acknowledged_everywhere(cluster: LocalCluster, acknowledged: dict[bytes, int]) -> None:
    for name in cluster.nodes:
        with cluster.client(name) as client:
            for transfer_id in acknowledged:
                found = client.lookup_transfer(transfer_id)
                assert found is not None and found["result"] == "ok", (name, transfer_id.hex())


def test_sigkill_of_the_leader_under_load_loses_no_acknowledged_transfer(cluster):
    leader = cluster.wait_for_leader()
    others = [name for name in cluster.nodes if name != leader]
    with _Workload(cluster, others) as workload:
        time.sleep(2)
        cluster.kill([leader])
        new_leader = cluster.wait_for_leader(among=[v for v in cluster.validators() if v != leader])
        assert new_leader != leader
        count_at_new_leader = len(workload.acknowledged)
        time.sleep(3)
    assert len(workload.acknowledged) > count_at_new_leader, "the network did not commit after the new election"
    cluster.start([leader])
    statuses = cluster.wait_converged()
    assert len({status["state_hash"] for status in statuses.values()}) == 1
    _assert_all_acknowledged_everywhere(cluster, workload.acknowledged)
    with cluster.client(leader) as client:
        totals = client.totals()["totals"]
    assert all(row["held"] == row["issued"] and row["net"] == 0 for row in totals.values())


def _metric(cluster: LocalCluster, node: str, name: str) -> float:
    _code, text = cluster.admin_get(node, "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_a_restarted_node_replays_its_log_without_applying_anything_twice(cluster):
    with cluster.client("v1") as client:
        for _ in range(20):
            assert client.submit([cluster.transfer("c1.khr@aba", "c2.khr@aba", 1, "KHR")])[0]["result"] == "ok"
    before = cluster.wait_converged()
    follower = next(name for name in cluster.validators() if before[name]["role"] == "follower")
    cluster.stop([follower])
    cluster.start([follower])
    after = cluster.wait_converged()
    # The leader may have proposed empty housekeeping batches meanwhile (tree heads), never transfers, and
    # each moves every node's state hash: the follower's state is then checked against the nodes that applied
    # those batches once (CI saw a restart span three of them).
    assert after[follower]["applied_index"] >= before[follower]["applied_index"]
    assert {status["state_hash"] for status in after.values()} == {after[follower]["state_hash"]}
    if after[follower]["applied_index"] == before[follower]["applied_index"]:
        assert after[follower]["state_hash"] == before[follower]["state_hash"]
    # Everything in its journal was already in LMDB: the replay applied no entry.
    assert _metric(cluster, follower, "tonle_entries_applied_total") == 0


def test_an_older_snapshot_is_ignored(request, tmp_path):
    cluster = start_cluster(tmp_path / "network", raft=replace(local_raft, log_compaction_entries=100))
    _remember(request, cluster)
    with cluster:
        follower = "v2"
        snapshot = cluster.nodes[follower].data_dir / "raft" / "snapshot.bin"
        _submit_until_snapshot(cluster, snapshot)
        cluster.stop([follower])
        old_copy = tmp_path / "old-snapshot.bin"
        shutil.copy(snapshot, old_copy)
        cluster.start([follower])
        cluster.wait_converged()
        first = snapshot.stat().st_mtime_ns
        _submit_until_snapshot(cluster, snapshot, changed_after=first)
        before = cluster.wait_converged()
        cluster.stop([follower])
        shutil.copy(old_copy, snapshot)
        cluster.start([follower])
        # Converged means every node has the same applied index and state hash. The leader may have applied
        # an empty housekeeping batch (a checkpoint, a tree head) meanwhile, so the index may have moved on;
        # what must not happen is the follower going back to the old snapshot's state.
        after = cluster.wait_converged()
        assert after[follower]["applied_index"] >= before[follower]["applied_index"]
        if after[follower]["applied_index"] == before[follower]["applied_index"]:
            assert after[follower]["state_hash"] == before[follower]["state_hash"]
        assert "ignoring snapshot" in cluster.nodes[follower].log.read_text()


def test_a_follower_behind_the_compacted_log_installs_the_leaders_snapshot_and_counts_it(request, tmp_path):
    cluster = start_cluster(tmp_path / "network", raft=replace(local_raft, log_compaction_entries=100))
    _remember(request, cluster)
    with cluster:
        status = cluster.wait_converged()
        leader = next(name for name, node in status.items() if node["role"] == "leader")
        follower = next(name for name in cluster.validators() if name not in (leader, "v1"))  # "v1" takes the load
        cluster.stop([follower])
        snapshot = cluster.nodes[leader].data_dir / "raft" / "snapshot.bin"
        # A snapshot the leader writes after the stop covers entries the follower lacks and drops them from
        # the leader's journal: the follower can then only catch up by installing it.
        _submit_until_snapshot(cluster, snapshot, changed_after=snapshot.stat().st_mtime_ns if snapshot.exists() else None)
        cluster.start([follower])
        after = cluster.wait_converged()
        assert {node["state_hash"] for node in after.values()} == {after[follower]["state_hash"]}
        assert "installed snapshot" in cluster.nodes[follower].log.read_text()
        assert _metric(cluster, follower, "tonle_snapshot_install_seconds_count") >= 1
        assert _metric(cluster, leader, "tonle_snapshot_write_seconds_count") >= 1
        assert _metric(cluster, leader, "tonle_snapshot_file_bytes") > 0
        accounts = ["c1.khr@aba", "c2.khr@aba"]
        assert balances(cluster, follower, accounts) == balances(cluster, leader, accounts)
        # The swap left neither the replaced state nor the scratch it built the new one in.
        assert sorted(path.name for path in cluster.nodes[follower].data_dir.iterdir()
                      if path.name.startswith((".state", "state"))) == ["state"]


def _submit_until_snapshot(cluster: LocalCluster, snapshot, changed_after: int | None = None) -> None:
    deadline = time.monotonic() + 120
    with cluster.client("v1") as client:
        while time.monotonic() < deadline:
            if snapshot.exists() and (changed_after is None or snapshot.stat().st_mtime_ns != changed_after):
                return
            client.submit([cluster.transfer("c1.khr@aba", "c2.khr@aba", 1, "KHR")])
    raise AssertionError("no snapshot was written")
