"""Receipts end to end on a real 3-validator network: fetched from any node, verified offline after the whole
network is stopped, read back from a QR image; correcting transfers; exports replayed by `tonle audit`."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest

from config.loader import load_genesis
from consensus.codec import pack
from consensus.entries import Transfer, decode_entry
from consensus.receipts import decode_receipt_binary, encode_receipt_text, receipt_qr_png, verify_receipt
from node.audit import audit_export, check_consistency, export_log
from node.client import new_transfer_id
from tests.qr_reading import png_luminance, read_qr_text

pytestmark = pytest.mark.cluster

receipt_wait_seconds = 20.0


def fetch_receipt(cluster, node: str, transfer_id: bytes) -> bytes:
    deadline = time.monotonic() + receipt_wait_seconds
    with cluster.client(node) as client:
        while time.monotonic() < deadline:
            reply = client.receipt(transfer_id)
            if reply["found"]:
                return reply["receipt"]
            assert reply["why"] == "not_yet_signed", reply
            time.sleep(0.1)
    raise AssertionError(f"no signed receipt for {transfer_id.hex()} from {node} within {receipt_wait_seconds} s")


def test_receipts_verify_offline_after_the_network_is_gone_and_from_a_qr_image(cluster):
    transfers = []
    with cluster.client("v1") as client:
        for number in range(12):
            entry = cluster.transfer("c1.khr@aba", "c2.khr@acleda", 100 + number, "KHR")
            assert client.submit([entry])[0]["result"] == "ok"
            transfers.append(decode_entry(entry).body().id)
        failed = cluster.transfer("c1.khr@acleda", "c1.khr@aba", 10**12, "KHR")
        assert client.submit([failed])[0]["result"] == "exceeds_credits"
        transfers.append(decode_entry(failed).body().id)
    nodes = list(cluster.nodes)
    receipts = {transfer_id: fetch_receipt(cluster, nodes[position % len(nodes)], transfer_id)
                for position, transfer_id in enumerate(transfers)}
    cluster.stop()
    genesis = load_genesis(Path(cluster.description["genesis"]))
    for transfer_id, binary in receipts.items():
        verification = verify_receipt(binary, genesis)
        assert verification.valid, (transfer_id.hex(), verification)
    assert decode_receipt_binary(receipts[transfers[-1]]).result == "exceeds_credits"
    receipt = decode_receipt_binary(receipts[transfers[3]])
    text = read_qr_text(*png_luminance(receipt_qr_png(receipt)))
    assert text == encode_receipt_text(receipt)
    assert verify_receipt(text, genesis).valid


def test_a_correcting_transfer_makes_a_receipt_no_longer_current(network):
    original = network.transfer("c2.khr@aba", "c2.khr@acleda", 5000, "KHR")
    original_id = decode_entry(original).body().id
    with network.client("v2") as client:
        assert client.submit([original])[0]["result"] == "ok"
        assert client.receipt_status(original_id)["current"] is True
        correction = network.sign(
            Transfer(new_transfer_id(), "c2.khr@acleda", "c2.khr@aba", 5000, "KHR", reference=f"reverses:{original_id.hex()}"),
            "acleda",
        )
        assert client.submit([correction])[0]["result"] == "ok"
        status = client.receipt_status(original_id)
    assert status["current"] is False and status["reversed_by"] == [decode_entry(correction).body().id]


def test_an_export_replays_from_genesis_to_every_signed_head_and_a_tampered_one_does_not(network, tmp_path):
    with network.client("v1") as client:
        for _ in range(20):
            client.submit([network.transfer("c3.khr@aba", "c3.khr@acleda", 3, "KHR")])
    time.sleep(1.5)  # a head window passes, so the last transfers are under a signed head
    genesis = load_genesis(Path(network.description["genesis"]))
    export = tmp_path / "export.bin"
    summary = export_log(network.nodes["aba-1"].data_dir, export)
    assert summary["heads"] > 0
    result = audit_export(export, genesis)
    assert result.ok, result

    # Change one transfer's amount (3 riel, then its currency) inside an archived batch: its signature no
    # longer verifies, so the replay no longer matches the signed heads.
    records = list(_records(export))
    amount_three = b"\x03\xa3KHR"
    position = next(n for n, record in enumerate(records) if record[0] == "batch" and amount_three in record[2])
    records[position] = ["batch", records[position][1], records[position][2].replace(amount_three, b"\x04\xa3KHR", 1)]
    tampered = tmp_path / "tampered.bin"
    tampered.write_bytes(b"".join(pack(record) for record in records))
    assert not audit_export(tampered, genesis).ok

    with network.client("v3") as client:
        older = client.tree_head(0)
        newer = client.tree_head()
        proof = client.consistency_proof(older["tree_size"], newer["tree_size"]) if older["tree_size"] < newer["tree_size"] else []
    assert check_consistency(genesis, older, newer, proof).ok
    if proof:
        assert not check_consistency(genesis, older, newer, [bytes(32)] * len(proof)).ok


def _records(path: Path):
    with open(path, "rb") as file:
        yield from msgpack.Unpacker(file, raw=False)
