"""Receipts from a node, and auditing: export a node's log with its signed heads, replay it from genesis
offline, check heads against each other with consistency proofs, and check a node's entry-hash index."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from config.loader import load_genesis
from config.schema import Genesis
from consensus import merkle
from consensus.codec import CodecError, pack
from consensus.entries import signature_is_valid
from consensus.receipts import (
    HeadSignature,
    TreeHead,
    decode_receipt_binary,
    encode_receipt_json,
    encode_receipt_text,
    receipt_qr_png,
    receipt_qr_svg,
    verify_tree_head,
)
from node.cli_support import cluster_of, exit_code_failure, non_negative, pick_node, positive, print_json, transfer_id_argument
from node.indexer import check_index, index_check_document
from storage import tree
from storage.records import archived_batches, heads_from
from storage.rules import apply_batch, apply_no_op, genesis_applied_index, initialize
from storage.state import LedgerStore

export_magic = "tonle-export"
export_format_version = 1
audit_map_size_bytes = 64 << 30
receipt_wait_poll_seconds = 0.2


# Fetching receipts -------------------------------------------------------------------------------------


def command_receipt(arguments: argparse.Namespace) -> int:
    cluster = cluster_of(arguments)
    deadline = time.monotonic() + arguments.wait
    with cluster.client(pick_node(cluster, arguments.node)) as client:
        while True:
            reply = client.receipt(arguments.transfer_id)
            if reply["found"] or reply["why"] != "not_yet_signed" or time.monotonic() >= deadline:
                break
            time.sleep(receipt_wait_poll_seconds)
    if not reply["found"]:
        print(f"tonle receipt: no receipt for {arguments.transfer_id.hex()}: {reply['why']}", file=sys.stderr)
        return exit_code_failure
    receipt = decode_receipt_binary(reply["receipt"])
    output: bytes
    if arguments.format == "json":
        output = (encode_receipt_json(receipt) + "\n").encode()
    elif arguments.format == "text":
        output = (encode_receipt_text(receipt) + "\n").encode()
    elif arguments.format == "binary":
        output = reply["receipt"]
    elif arguments.format == "qr-png":
        output = receipt_qr_png(receipt)
    else:
        output = receipt_qr_svg(receipt).encode()
    if arguments.out:
        Path(arguments.out).write_bytes(output)
    else:
        sys.stdout.buffer.write(output)
    return 0


def command_receipt_status(arguments: argparse.Namespace) -> int:
    cluster = cluster_of(arguments)
    with cluster.client(pick_node(cluster, arguments.node)) as client:
        status = client.receipt_status(arguments.transfer_id)
    print_json(status if status is not None else {"id": arguments.transfer_id, "found": False})
    return 0 if status is not None and status["current"] else exit_code_failure


# Export ---------------------------------------------------------------------------------------------------


def export_log(data_dir: Path, output: Path, first_index: int = genesis_applied_index + 1, last_index: int | None = None) -> dict[str, int]:
    """Write a node's archived batches and signed heads to a file an auditor can replay from genesis.

    Reads the node's LMDB read-only, so it runs beside a live node (LMDB readers never block the writer).
    """
    store = LedgerStore(data_dir / "state", map_size_bytes=audit_map_size_bytes, readonly=True)
    batches = heads = 0
    try:
        with store.read() as transaction, open(output, "wb") as file:
            summary = transaction.summary()
            identity = transaction.identity()
            last = summary.applied_index if last_index is None else min(last_index, summary.applied_index)
            file.write(pack([export_magic, export_format_version, identity[0] if identity else "", first_index, last]))
            for index, batch_bytes in archived_batches(transaction, first_index, last):
                file.write(pack(["batch", index, batch_bytes]))
                batches += 1
            for head in heads_from(transaction, first_index):
                if head.index > last:
                    break
                file.write(pack(["head", head.index, head.tree_size, head.root_hash, head.state_hash, head.cluster_time_ms,
                                 [list(item) for item in head.signatures]]))
                heads += 1
    finally:
        store.close()
    return {"batches": batches, "heads": heads, "last_index": last}


def _data_dir(arguments: argparse.Namespace) -> Path:
    """`--data-dir`, or the data directory of `--node` in the local network `--dir`."""
    if arguments.data_dir:
        return Path(arguments.data_dir)
    cluster = cluster_of(arguments)
    return cluster.nodes[pick_node(cluster, arguments.node)].data_dir


def command_export(arguments: argparse.Namespace) -> int:
    print_json(export_log(_data_dir(arguments), Path(arguments.out)))
    return 0


def command_index_check(arguments: argparse.Namespace) -> int:
    found = check_index(_data_dir(arguments))
    print_json(index_check_document(found))
    return 0 if found.consistent else exit_code_failure


# Audit ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditResult:
    ok: bool
    reason: str
    details: dict[str, Any]


def _read_export(path: Path):
    with open(path, "rb") as file:
        unpacker = msgpack.Unpacker(file, raw=False, strict_map_key=True, max_buffer_size=16 << 20)
        header = next(unpacker, None)
        if type(header) is not list or len(header) != 5 or header[0] != export_magic or header[1] != export_format_version:
            raise CodecError("not a Tonle export (bad header)")
        yield header
        yield from unpacker


def audit_export(path: Path, genesis: Genesis) -> AuditResult:
    """Replay an export from genesis in a scratch LMDB, verifying every entry's signature, and check the
    recomputed tree and state hash against every head signed by a majority of the genesis validators, and
    every pair of consecutive signed heads against each other with a consistency proof."""
    records = _read_export(path)
    _magic, _version, cluster_id, first_index, last_index = next(records)
    if cluster_id != genesis.cluster_id:
        return AuditResult(False, "wrong_network", {"export": cluster_id, "genesis": genesis.cluster_id})
    if first_index != genesis_applied_index + 1:
        return AuditResult(False, "not_from_genesis", {"first_index": first_index})
    batches: dict[int, bytes] = {}
    heads: list[tuple[TreeHead, tuple[HeadSignature, ...]]] = []
    for record in records:
        if record[0] == "batch":
            batches[record[1]] = record[2]
        elif record[0] == "head":
            _, index, size, root, state_hash, time_ms, signatures = record
            head = TreeHead(genesis.cluster_id, size, root, state_hash, index, time_ms)
            heads.append((head, tuple(HeadSignature(name, signature) for name, signature in signatures)))
    signed = [(head, signatures) for head, signatures in heads if verify_tree_head(head, signatures, genesis).valid]
    with tempfile.TemporaryDirectory(prefix="tonle-audit-") as scratch:
        store = LedgerStore(Path(scratch), map_size_bytes=audit_map_size_bytes, sync=False)
        try:
            with store.write() as transaction:
                initialize(transaction, genesis)
            checked = 0
            last_signed_index = 0
            by_index = {head.applied_index: head for head, _ in signed}
            previous: TreeHead | None = None
            for index in range(first_index, last_index + 1):
                with store.write() as transaction:
                    if index in batches:
                        apply_batch(transaction, index, batches[index], signature_is_valid, genesis.cluster_id)
                    else:
                        apply_no_op(transaction, index)
                    head = by_index.get(index)
                    if head is None:
                        continue
                    recomputed = (tree.tree_size(transaction), tree.root(transaction), transaction.state_hash())
                    if recomputed != (head.tree_size, head.root_hash, head.state_hash):
                        return AuditResult(False, "head_mismatch", {"index": index, "signed_tree_size": head.tree_size,
                                                                     "replayed_tree_size": recomputed[0]})
                    if previous is not None:
                        proof = tree.consistency_proof(transaction, previous.tree_size, head.tree_size) if previous.tree_size < head.tree_size else []
                        if not merkle.verify_consistency(previous.tree_size, head.tree_size, previous.root_hash, head.root_hash, proof):
                            return AuditResult(False, "heads_inconsistent", {"from": previous.applied_index, "to": index})
                    previous = head
                    checked += 1
                    last_signed_index = index
            with store.read() as transaction:
                final = transaction.summary()
                balances_recomputed = transaction.recompute_state_hash() == final.state_hash
        finally:
            store.close()
    if not balances_recomputed:
        return AuditResult(False, "state_hash_mismatch", {})
    return AuditResult(
        checked > 0,
        "ok" if checked else "no_signed_heads",
        {"batches": len(batches), "applied_index": final.applied_index, "signed_heads_checked": checked,
         "state_hash": final.state_hash.hex(), "heads_without_majority": len(heads) - len(signed),
         # What no signed head covers yet could still differ from what validators will sign: say how much.
         "batches_after_last_signed_head": sum(1 for index in batches if index > last_signed_index)},
    )


def check_consistency(genesis: Genesis, older: dict[str, Any], newer: dict[str, Any], proof: list[bytes]) -> AuditResult:
    """Two heads, each signed by a majority of the genesis validators, where the newer tree extends the older."""
    heads = []
    for document in (older, newer):
        head = TreeHead(genesis.cluster_id, document["tree_size"], document["root_hash"], document["state_hash"],
                        document["index"], document["cluster_time_ms"])
        signatures = tuple(HeadSignature(name, signature) for name, signature in document["signatures"])
        verification = verify_tree_head(head, signatures, genesis)
        if not verification.valid:
            return AuditResult(False, verification.reason, {"index": document["index"]})
        heads.append(head)
    old, new = heads
    if not merkle.verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash, proof):
        return AuditResult(False, "heads_inconsistent", {"old_size": old.tree_size, "new_size": new.tree_size})
    return AuditResult(True, "ok", {"old_index": old.applied_index, "new_index": new.applied_index,
                                    "old_size": old.tree_size, "new_size": new.tree_size})


def command_audit(arguments: argparse.Namespace) -> int:
    genesis_path = Path(arguments.genesis) if arguments.genesis else Path(arguments.dir) / "genesis.toml"
    genesis = load_genesis(genesis_path)
    if arguments.export:
        result = audit_export(Path(arguments.export), genesis)
    elif not arguments.dir:
        print("tonle audit: give --export FILE, or --dir DIR to check heads of a running network", file=sys.stderr)
        return exit_code_failure
    else:
        cluster = cluster_of(arguments)
        with cluster.client(pick_node(cluster, arguments.node)) as client:
            older = client.tree_head(arguments.from_index)
            newer = client.tree_head(arguments.to_index) if arguments.to_index is not None else client.tree_head()
            if older is None or newer is None:
                print("tonle audit: no signed head at those indexes yet", file=sys.stderr)
                return exit_code_failure
            proof = client.consistency_proof(older["tree_size"], newer["tree_size"]) if older["tree_size"] < newer["tree_size"] else []
        result = check_consistency(genesis, older, newer, proof or [])
    print(("AUDIT OK" if result.ok else f"AUDIT FAILED: {result.reason}"))
    for key, value in result.details.items():
        print(f"  {key}: {value}")
    return 0 if result.ok else exit_code_failure


def add_audit_commands(commands: argparse._SubParsersAction) -> None:
    receipt = commands.add_parser("receipt", help="a transfer's receipt from a node: verifiable offline")
    receipt.add_argument("--dir", required=True)
    receipt.add_argument("--node")
    receipt.add_argument("transfer_id", type=transfer_id_argument, metavar="TRANSFER_ID")
    receipt.add_argument("--format", choices=("json", "text", "binary", "qr-png", "qr-svg"), default="json")
    receipt.add_argument("--out", help="write here instead of standard output")
    receipt.add_argument("--wait", type=float, default=5.0, help="seconds to wait for a head signed by a majority")
    receipt.set_defaults(handler=command_receipt)

    status = commands.add_parser("receipt-status", help="whether a receipt is still current (not reversed)")
    status.add_argument("--dir", required=True)
    status.add_argument("--node")
    status.add_argument("transfer_id", type=transfer_id_argument, metavar="TRANSFER_ID")
    status.set_defaults(handler=command_receipt_status)

    export = commands.add_parser("export", help="a node's log from genesis with its signed heads, for `tonle audit`")
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="the node's data directory (read-only; the node may keep running)")
    source.add_argument("--dir", help="a local network's directory (with --node)")
    export.add_argument("--node")
    export.add_argument("--out", required=True)
    export.set_defaults(handler=command_export)

    check = commands.add_parser(
        "index-check",
        help="compare a node's entry-hash index with its state's hash log (read-only; the node may keep running)",
    )
    source = check.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="the node's data directory")
    source.add_argument("--dir", help="a local network's directory (with --node)")
    check.add_argument("--node")
    check.set_defaults(handler=command_index_check)

    audit = commands.add_parser("audit", help="replay an export from genesis, or check two signed heads are consistent")
    genesis = audit.add_mutually_exclusive_group(required=True)
    genesis.add_argument("--genesis", help="the network's genesis.toml")
    genesis.add_argument("--dir", help="a local network's directory (its genesis, and its nodes for --from-index)")
    audit.add_argument("--export", help="an export file: replay it from genesis offline")
    audit.add_argument("--node")
    audit.add_argument("--from-index", type=non_negative, default=0, help="older head: the first signed at or after")
    audit.add_argument("--to-index", type=positive, help="newer head (default: the latest signed)")
    audit.set_defaults(handler=command_audit)
