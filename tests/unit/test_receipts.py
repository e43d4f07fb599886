"""Receipts: a real signed transfer proven into a real LMDB tree, every encoding, every tampering, QR and CLI."""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from config.render import render_genesis
from config.schema import Address, Currency, Genesis, Institution, NodeRole, NodeSpec, Role
from consensus import merkle
from consensus.codec import pack, unpack
from consensus.entries import OpenAccount, Transfer, sign_entry
from consensus.receipts import (
    HeadSignature,
    Receipt,
    ReceiptError,
    TreeHead,
    base45_decode,
    base45_encode,
    decode_receipt,
    decode_receipt_binary,
    decode_receipt_json,
    decode_receipt_text,
    encode_leaf_data,
    encode_receipt_binary,
    encode_receipt_json,
    encode_receipt_text,
    qr_text_characters_max,
    receipt_bytes_max,
    receipt_json_bytes_max,
    receipt_qr_png,
    receipt_qr_svg,
    receipt_signatures_max,
    receipt_text_characters_max,
    result_characters_max,
    sign_tree_head,
    verify_receipt,
    verify_tree_head,
)
from node.receipt_cli import add_receipt_commands, receipt_input_bytes_max
from storage import tree
from storage.state import LedgerStore
from tests.qr_reading import png_luminance, read_qr_text, svg_luminance

cluster_id = "tonle-receipts-1"
transfer_id = bytes(range(1, 17))
leaves_before = 9
leaves_after = 3


@dataclass
class Fixture:
    genesis: Genesis
    validator_keys: dict[str, SigningKey]
    institution_keys: dict[str, SigningKey]
    receipt: Receipt


def validator(name: str, number: int, key: SigningKey) -> NodeSpec:
    return NodeSpec(
        name=name,
        role=NodeRole.VALIDATOR,
        institution=None,
        raft_address=Address("127.0.0.1", 7000 + number),
        client_address=Address("127.0.0.1", 8000 + number),
        admin_address=Address("127.0.0.1", 9000 + number),
        public_key=bytes(key.verify_key),
    )


def make_genesis(validator_keys: dict[str, SigningKey], institution_keys: dict[str, SigningKey], network: str) -> Genesis:
    roles = {"nbc": Role.CENTRAL_BANK, "aba": Role.BANK, "acleda": Role.BANK}
    return Genesis(
        format_version=1,
        cluster_id=network,
        currencies=(Currency("KHR", 0), Currency("USD", 2)),
        institutions=tuple(
            Institution(name, name.upper(), roles[name], bytes(key.verify_key)) for name, key in institution_keys.items()
        ),
        validators=tuple(validator(name, number, key) for number, (name, key) in enumerate(validator_keys.items(), 1)),
        institution_nodes=(),
    )


def signed_head(head: TreeHead, keys: dict[str, SigningKey], names: tuple[str, ...]) -> tuple[HeadSignature, ...]:
    return tuple(sign_tree_head(head, name, keys[name]) for name in names)


def build_fixture(directory: Path) -> Fixture:
    """A transfer applied as leaf 9 of 13 in a real LMDB tree, its head signed by all three validators."""
    validator_keys = {name: SigningKey.generate() for name in ("v1", "v2", "v3")}
    institution_keys = {name: SigningKey.generate() for name in ("nbc", "aba", "acleda")}
    genesis = make_genesis(validator_keys, institution_keys, cluster_id)
    entry = sign_entry(
        Transfer(transfer_id, "sokha@aba", "dara@acleda", 150_000, "KHR"),
        cluster_id=cluster_id, signer="aba", signing_key=institution_keys["aba"],
    )
    store = LedgerStore(directory, map_size_bytes=16 << 20, sync=False)
    with store.write() as transaction:
        for number in range(leaves_before):
            tree.append_leaf(transaction, encode_leaf_data(b"other %d" % number, "ok", 10 + number, 1_700_000_000_000))
        leaf_index = tree.append_leaf(transaction, encode_leaf_data(entry, "ok", 42, 1_700_000_123_456))
        for number in range(leaves_after):
            tree.append_leaf(transaction, encode_leaf_data(b"later %d" % number, "exceeds_credits", 50, 1_700_000_200_000))
        size = tree.tree_size(transaction)
        head = TreeHead(cluster_id, size, tree.root(transaction), transaction.state_hash(), 57, 1_700_000_300_000)
        path = tuple(tree.inclusion_proof(transaction, leaf_index, size))
    store.close()
    receipt = Receipt(
        entry_raw=entry,
        result="ok",
        raft_index=42,
        cluster_time_ms=1_700_000_123_456,
        leaf_index=leaf_index,
        inclusion_path=path,
        head=head,
        signatures=signed_head(head, validator_keys, ("v1", "v2", "v3")),
    )
    return Fixture(genesis, validator_keys, institution_keys, receipt)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> Fixture:
    return build_fixture(tmp_path_factory.mktemp("receipt-tree"))


def resign(fixture: Fixture, receipt: Receipt, names: tuple[str, ...] = ("v1", "v2", "v3")) -> Receipt:
    return replace(receipt, signatures=signed_head(receipt.head, fixture.validator_keys, names))


# A valid receipt in every form ---------------------------------------------------------------------------


def test_a_real_receipt_is_valid_in_every_form(fixture):
    receipt = fixture.receipt
    assert receipt.leaf_index == leaves_before
    assert receipt.head.tree_size == leaves_before + 1 + leaves_after
    forms = [receipt, encode_receipt_binary(receipt), encode_receipt_json(receipt), encode_receipt_text(receipt)]
    for form in forms:
        verification = verify_receipt(form, fixture.genesis)
        assert (verification.valid, verification.reason) == (True, "valid")
    details = verify_receipt(receipt, fixture.genesis).details
    assert details["debit"] == "sokha@aba"
    assert details["credit"] == "dara@acleda"
    assert details["amount"] == 150_000
    assert details["currency"] == "KHR"
    assert details["id"] == transfer_id.hex()
    assert details["result"] == "ok"
    assert details["signed_by"] == "v1, v2, v3"


def test_every_form_decodes_back_to_the_same_receipt(fixture):
    receipt = fixture.receipt
    assert decode_receipt_binary(encode_receipt_binary(receipt)) == receipt
    assert decode_receipt_json(encode_receipt_json(receipt)) == receipt
    assert decode_receipt_text(encode_receipt_text(receipt)) == receipt
    assert decode_receipt(encode_receipt_text(receipt) + "\r\n") == receipt
    assert decode_receipt(encode_receipt_json(receipt).encode()) == receipt


def test_the_text_form_uses_only_qr_alphanumeric_characters(fixture):
    text = encode_receipt_text(fixture.receipt)
    assert text.startswith("TONLE1:")
    assert set(text) <= set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:")


def test_the_json_form_shows_the_transfer_but_the_verifier_ignores_that(fixture):
    document = json.loads(encode_receipt_json(fixture.receipt))
    assert document["transfer"] == {
        "kind": "transfer", "id": transfer_id.hex(), "debit": "sokha@aba", "credit": "dara@acleda",
        "amount": 150_000, "currency": "KHR",
    }
    document["transfer"]["amount"] = 1
    verification = verify_receipt(json.dumps(document), fixture.genesis)
    assert verification.valid
    assert verification.details["amount"] == 150_000


# Every single-byte change --------------------------------------------------------------------------------

entry_reasons = {"entry_malformed", "entry_signature_invalid"}
leaf_reasons = {"inclusion_proof_invalid"}
head_reasons = {"head_signature_invalid"}
name_reasons = {"unknown_signer", "duplicate_signer", "head_signature_invalid"}


def byte_reasons(receipt: Receipt) -> list[tuple[str, set[str]]]:
    """For each byte of the binary form: the field it belongs to and the reasons a change to it may give.

    A changed byte may always break the encoding (`malformed`), except inside a byte string, where any
    value is well formed and only the field's own check may catch it.
    """
    fields = unpack(encode_receipt_binary(receipt))
    layout: list[tuple[str, set[str]]] = []

    def header(value, name: str) -> None:
        contents = sum(len(pack(item)) for item in value)
        layout.extend([(name, {"malformed"})] * (len(pack(value)) - contents))

    def scalar(value, name: str, reasons: set[str]) -> None:
        encoded = pack(value)
        if type(value) is bytes:
            size_prefix = len(encoded) - len(value)
            layout.extend([(name, {"malformed"})] * size_prefix)
            layout.extend([(name, reasons)] * len(value))
        else:
            layout.extend([(name, reasons | {"malformed"})] * len(encoded))

    def entry(raw: bytes) -> None:
        layout.extend([("entry", {"malformed"})] * (len(pack(raw)) - len(raw)))
        envelope = unpack(raw)
        layout.extend([("entry", entry_reasons)] * (len(raw) - sum(len(pack(item)) for item in envelope)))
        for position, item in enumerate(envelope):
            # The signer's name is outside the entry signature (the apply checks that the key is the
            # signer's), so a changed name is caught where the leaf no longer matches the tree.
            name, reasons = ("entry_signer", entry_reasons | leaf_reasons) if position == 4 else ("entry", entry_reasons)
            layout.extend([(name, reasons)] * len(pack(item)))

    header(fields, "receipt")
    version, cluster, entry_raw, result, raft_index, time_ms, leaf_index, path, head, signatures = fields
    scalar(version, "format", set())
    scalar(cluster, "cluster_id", {"wrong_network"})
    entry(entry_raw)
    scalar(result, "result", leaf_reasons)
    scalar(raft_index, "raft_index", leaf_reasons)
    scalar(time_ms, "cluster_time_ms", leaf_reasons)
    scalar(leaf_index, "leaf_index", leaf_reasons | {"leaf_index_out_of_range"})
    header(path, "inclusion_path")
    for item in path:
        scalar(item, "path_hash", leaf_reasons)
    header(head, "tree_head")
    for name, item in zip(("tree_size", "root_hash", "state_hash", "applied_index", "head_cluster_time_ms"), head, strict=True):
        scalar(item, name, head_reasons)
    header(signatures, "signatures")
    for name, signature in signatures:
        header([name, signature], "signature_pair")
        scalar(name, "validator_name", name_reasons)
        scalar(signature, "head_signature", head_reasons)
    return layout


def test_every_single_byte_change_is_malformed_or_invalid_for_its_own_field(fixture):
    binary = encode_receipt_binary(fixture.receipt)
    layout = byte_reasons(fixture.receipt)
    assert len(layout) == len(binary)
    seen: dict[str, set[str]] = {}
    wrong = []
    for position, (field, allowed) in enumerate(layout):
        for value in set(range(256)) - {binary[position]}:
            changed = binary[:position] + bytes([value]) + binary[position + 1 :]
            verification = verify_receipt(changed, fixture.genesis)
            seen.setdefault(field, set()).add(verification.reason)
            if verification.valid or verification.reason not in allowed:
                wrong.append((position, field, value, verification.reason))
    assert wrong == []
    # Each field's own check was reached, not just the decoder.
    assert seen["entry"] >= entry_reasons
    assert "inclusion_proof_invalid" in seen["entry_signer"]
    assert "wrong_network" in seen["cluster_id"]
    assert seen["leaf_index"] >= {"inclusion_proof_invalid", "leaf_index_out_of_range"}
    for field in ("result", "raft_index", "cluster_time_ms", "path_hash"):
        assert "inclusion_proof_invalid" in seen[field], field
    for field in ("tree_size", "root_hash", "state_hash", "applied_index", "head_cluster_time_ms", "head_signature"):
        assert "head_signature_invalid" in seen[field], field
    assert seen["validator_name"] >= {"unknown_signer", "duplicate_signer"}


# Head signatures -------------------------------------------------------------------------------------------


def test_a_strict_majority_of_validators_is_enough_and_fewer_is_not(fixture):
    two = resign(fixture, fixture.receipt, ("v3", "v1"))
    assert verify_receipt(two, fixture.genesis).valid
    one = resign(fixture, fixture.receipt, ("v2",))
    assert verify_receipt(one, fixture.genesis).reason == "insufficient_signatures"
    none = replace(fixture.receipt, signatures=())
    assert verify_receipt(none, fixture.genesis).reason == "insufficient_signatures"


def test_a_key_outside_the_genesis_is_an_unknown_signer(fixture):
    receipt = fixture.receipt
    outsider = sign_tree_head(receipt.head, "v4", SigningKey.generate())
    assert verify_receipt(replace(receipt, signatures=receipt.signatures + (outsider,)), fixture.genesis).reason == (
        "unknown_signer"
    )


def test_a_validator_name_signed_with_another_key_is_an_invalid_head_signature(fixture):
    receipt = fixture.receipt
    impostor = sign_tree_head(receipt.head, "v2", SigningKey.generate())
    signatures = (receipt.signatures[0], impostor, receipt.signatures[2])
    assert verify_receipt(replace(receipt, signatures=signatures), fixture.genesis).reason == "head_signature_invalid"


def test_the_same_validator_twice_is_a_duplicate_signer(fixture):
    receipt = fixture.receipt
    signatures = (receipt.signatures[0], receipt.signatures[0], receipt.signatures[1])
    assert verify_receipt(replace(receipt, signatures=signatures), fixture.genesis).reason == "duplicate_signer"


def test_a_head_signed_for_another_network_does_not_verify_here(fixture):
    other = make_genesis(fixture.validator_keys, fixture.institution_keys, "tonle-elsewhere")
    assert verify_receipt(fixture.receipt, other).reason == "wrong_network"
    assert verify_tree_head(fixture.receipt.head, fixture.receipt.signatures, fixture.genesis).valid
    assert verify_tree_head(fixture.receipt.head, fixture.receipt.signatures, other).reason == "wrong_network"


# The entry and its inclusion -------------------------------------------------------------------------------


def test_an_entry_with_a_changed_amount_fails_its_own_signature(fixture):
    fields = unpack(fixture.receipt.entry_raw)
    body = unpack(fields[3])
    body[4] = 1
    fields[3] = pack(body)
    receipt = replace(fixture.receipt, entry_raw=pack(fields))
    assert verify_receipt(receipt, fixture.genesis).reason == "entry_signature_invalid"


def test_an_entry_that_is_not_a_transfer_or_issue_is_malformed(fixture):
    entry = sign_entry(
        OpenAccount("sokha@aba", "KHR"), cluster_id=cluster_id, signer="aba", signing_key=fixture.institution_keys["aba"]
    )
    assert verify_receipt(replace(fixture.receipt, entry_raw=entry), fixture.genesis).reason == "entry_malformed"
    assert verify_receipt(replace(fixture.receipt, entry_raw=b"\x00"), fixture.genesis).reason == "entry_malformed"


def test_a_different_result_or_position_is_not_the_leaf_the_tree_holds(fixture):
    receipt = fixture.receipt
    assert verify_receipt(replace(receipt, result="exceeds_credits"), fixture.genesis).reason == "inclusion_proof_invalid"
    assert verify_receipt(replace(receipt, raft_index=43), fixture.genesis).reason == "inclusion_proof_invalid"
    assert verify_receipt(replace(receipt, leaf_index=8), fixture.genesis).reason == "inclusion_proof_invalid"
    assert verify_receipt(replace(receipt, inclusion_path=receipt.inclusion_path[:-1]), fixture.genesis).reason == (
        "inclusion_proof_invalid"
    )
    out_of_range = replace(receipt, leaf_index=receipt.head.tree_size)
    assert verify_receipt(out_of_range, fixture.genesis).reason == "leaf_index_out_of_range"


def test_the_first_failing_check_is_the_reason(fixture):
    receipt = fixture.receipt
    both = replace(receipt, result="exceeds_credits", signatures=receipt.signatures[:1])
    assert verify_receipt(both, fixture.genesis).reason == "insufficient_signatures"
    bad_entry_and_index = replace(receipt, entry_raw=b"\x00", leaf_index=receipt.head.tree_size)
    assert verify_receipt(bad_entry_and_index, fixture.genesis).reason == "entry_malformed"


# Strict decoding and limits ------------------------------------------------------------------------------


def test_json_receipts_are_decoded_strictly(fixture):
    document = json.loads(encode_receipt_json(fixture.receipt))
    variants = {
        "uppercase hex": {**document, "entry_raw": document["entry_raw"].upper()},
        "unknown key": {**document, "note": "x"},
        "missing key": {key: value for key, value in document.items() if key != "leaf_index"},
        "boolean index": {**document, "leaf_index": True},
        "negative index": {**document, "raft_index": -1},
    }
    for name, variant in variants.items():
        verification = verify_receipt(json.dumps(variant), fixture.genesis)
        assert verification.reason == "malformed", name
    text = encode_receipt_json(fixture.receipt)
    assert verify_receipt(text.replace('"leaf_index": 9', '"leaf_index": 9.0'), fixture.genesis).reason == "malformed"
    duplicated = text.replace('"result": "ok"', '"result": "ok", "result": "ok"')
    assert verify_receipt(duplicated, fixture.genesis).reason == "malformed"
    assert verify_receipt("[" * 20_000, fixture.genesis).reason == "malformed"


def test_base45_matches_the_rfc_9285_examples_and_refuses_what_it_does_not_define():
    assert base45_encode(b"AB") == "BB8"
    assert base45_encode(b"Hello!!") == "%69 VD92EX0"
    assert base45_encode(b"base-45") == "UJCLQE7W581"
    assert base45_decode("QED8WEX0") == b"ietf!"
    for text in ("GGW", "A", "BB8A", "bb8", "BB8\n", ":::"):
        with pytest.raises(ReceiptError):
            base45_decode(text)


def test_a_binary_receipt_over_the_byte_limit_is_malformed(fixture):
    fields = unpack(encode_receipt_binary(fixture.receipt))
    fields[2] = bytes(receipt_bytes_max)
    with pytest.raises(ReceiptError, match=f"at most {receipt_bytes_max} bytes"):
        decode_receipt_binary(pack(fields))
    with pytest.raises(ReceiptError, match="receipt_too_large"):
        encode_receipt_binary(replace(fixture.receipt, entry_raw=bytes(receipt_bytes_max)))


def test_json_and_text_receipts_over_their_limits_are_malformed(fixture):
    padded = encode_receipt_json(fixture.receipt) + " " * receipt_json_bytes_max
    with pytest.raises(ReceiptError, match=f"at most {receipt_json_bytes_max}"):
        decode_receipt_json(padded)
    text = encode_receipt_text(fixture.receipt)
    padded_text = text + "0" * (receipt_text_characters_max - len(text) + 1)
    with pytest.raises(ReceiptError, match=f"at most {receipt_text_characters_max}"):
        decode_receipt_text(padded_text)


def test_field_limits_are_enforced(fixture):
    receipt = fixture.receipt
    with pytest.raises(ReceiptError, match="inclusion path length"):
        replace(receipt, inclusion_path=(bytes(32),) * (merkle.proof_hashes_max + 1))
    with pytest.raises(ReceiptError, match="signature count"):
        replace(receipt, signatures=(receipt.signatures[0],) * (receipt_signatures_max + 1))
    with pytest.raises(ReceiptError, match="result"):
        replace(receipt, result="a" * (result_characters_max + 1))
    assert replace(receipt, result="a" * result_characters_max).result == "a" * result_characters_max
    with pytest.raises(ReceiptError, match="raft index"):
        replace(receipt, raft_index=2**64)


# QR --------------------------------------------------------------------------------------------------------


def test_the_qr_png_decodes_to_the_text_form_and_verifies(fixture):
    text = read_qr_text(*png_luminance(receipt_qr_png(fixture.receipt)))
    assert text == encode_receipt_text(fixture.receipt)
    assert verify_receipt(text, fixture.genesis).valid


def test_the_qr_svg_decodes_to_the_text_form_and_verifies(fixture):
    text = read_qr_text(*svg_luminance(receipt_qr_svg(fixture.receipt), pixels_per_module=4))
    assert text == encode_receipt_text(fixture.receipt)
    assert verify_receipt(text, fixture.genesis).valid


def test_a_receipt_too_long_for_one_qr_code_is_refused(fixture):
    signatures = signed_head(fixture.receipt.head, fixture.validator_keys, ("v1", "v2", "v3")) * 10
    receipt = replace(fixture.receipt, signatures=signatures, inclusion_path=(bytes(32),) * 40)
    assert len(encode_receipt_text(receipt)) > qr_text_characters_max
    with pytest.raises(ReceiptError, match="receipt_too_large_for_qr"):
        receipt_qr_png(receipt)
    with pytest.raises(ReceiptError, match="receipt_too_large_for_qr"):
        receipt_qr_svg(receipt)


# CLI ---------------------------------------------------------------------------------------------------------


def run_verify(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tonle")
    add_receipt_commands(parser.add_subparsers(dest="command", required=True))
    arguments = parser.parse_args(["verify", *argv])
    return arguments.handler(arguments)


@pytest.fixture
def network_directory(tmp_path, fixture) -> Path:
    (tmp_path / "genesis.toml").write_text(render_genesis(fixture.genesis))
    return tmp_path


def test_cli_verifies_every_form_from_a_file_with_the_genesis(network_directory, fixture, capsys):
    forms = {
        "receipt.json": encode_receipt_json(fixture.receipt).encode(),
        "receipt.bin": encode_receipt_binary(fixture.receipt),
        "receipt.txt": (encode_receipt_text(fixture.receipt) + "\n").encode(),
    }
    for name, content in forms.items():
        (network_directory / name).write_bytes(content)
        code = run_verify([str(network_directory / name), "--genesis", str(network_directory / "genesis.toml")])
        output = capsys.readouterr().out
        assert (code, output.splitlines()[0]) == (0, "VALID"), name
        assert "  amount: 150000" in output.splitlines()


def test_cli_takes_the_text_itself_or_stdin_and_a_network_directory(network_directory, fixture, capsys, monkeypatch):
    text = encode_receipt_text(fixture.receipt)
    assert run_verify([text, "--dir", str(network_directory)]) == 0
    assert capsys.readouterr().out.startswith("VALID\n")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(encode_receipt_binary(fixture.receipt))))
    assert run_verify(["-", "--dir", str(network_directory)]) == 0
    assert capsys.readouterr().out.startswith("VALID\n")


def test_cli_prints_invalid_with_the_reason_and_exits_1(network_directory, fixture, capsys):
    receipt = replace(fixture.receipt, result="exceeds_credits")
    path = network_directory / "receipt.json"
    path.write_text(encode_receipt_json(receipt))
    assert run_verify([str(path), "--dir", str(network_directory)]) == 1
    assert capsys.readouterr().out.splitlines()[0] == "INVALID: inclusion_proof_invalid"


def test_cli_refuses_input_over_the_limit_as_malformed(network_directory, capsys):
    path = network_directory / "huge.json"
    path.write_bytes(b" " * (receipt_input_bytes_max + 1))
    assert run_verify([str(path), "--dir", str(network_directory)]) == 1
    assert capsys.readouterr().out.splitlines()[0] == "INVALID: malformed"


def test_cli_exits_2_when_the_receipt_or_genesis_cannot_be_read(network_directory, fixture, capsys):
    assert run_verify([str(network_directory / "missing.json"), "--dir", str(network_directory)]) == 2
    assert "cannot read" in capsys.readouterr().err
    text = encode_receipt_text(fixture.receipt)
    assert run_verify([text, "--genesis", str(network_directory / "missing.toml")]) == 2
    assert "cannot load the genesis" in capsys.readouterr().err
