"""Compaction (`tonle node compact`) and snapshot installs leave every B-tree page of the state full, and
change no record: the same records, the same state hash, nothing half-done when it fails."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

import storage.state
from node.cli import main
from node.cluster import LocalCluster
from storage.state import LedgerStore, StorageCorrupted, open_store, write_environment_in_full_pages
from tests.ledger_fixtures import stored_records

map_size_bytes = 256 << 20
accounts_count = 20_000
# LMDB's page: a 16-byte header; each record a 2-byte pointer and an 8-byte node header beside its key and value.
page_header_bytes = 16
record_overhead_bytes = 10


def _fragmented_store(path: Path) -> LedgerStore:
    """Accounts opened in random key order, then a third of them grown in place: how a live node's
    account database ends up (LMDB splits a full page in half)."""
    store = LedgerStore(path, map_size_bytes=map_size_bytes, sync=False)
    generator = random.Random(6)
    names = [f"s{number}.khr@aba".encode() for number in range(accounts_count)]
    generator.shuffle(names)
    for start in range(0, accounts_count, 1_000):
        with store.write() as transaction:
            for name in names[start : start + 1_000]:
                transaction.put("accounts", name, b"\x01" * 40)
            transaction.put("history", start.to_bytes(8, "big"), b"event" * 10)
    with store.write() as transaction:
        for name in generator.sample(names, accounts_count // 3):
            transaction.put("accounts", name, b"\x02" * 52)
    return store


def _leaf_pages(store: LedgerStore, name: str) -> int:
    with store.environment.begin() as transaction:
        return transaction.stat(store.databases[name])["leaf_pages"]


def _full_leaf_pages(store: LedgerStore, name: str) -> int:
    """How many leaf pages the database's records fill when each page is filled until the next record
    does not fit (each page then wastes less than its largest record)."""
    page_bytes = store.environment.stat()["psize"]
    with store.environment.begin() as transaction, transaction.cursor(store.databases[name]) as cursor:
        # LMDB keeps each node two-byte aligned.
        sizes = [record_overhead_bytes + len(key) + len(value) + (len(key) + len(value)) % 2 for key, value in cursor]
    return math.ceil(sum(sizes) / (page_bytes - page_header_bytes - max(sizes)))


def test_compacting_keeps_every_record_and_the_state_hash_and_fills_the_pages(tmp_path: Path) -> None:
    store = _fragmented_store(tmp_path / "state")
    try:
        records = stored_records(store)
        with store.read() as transaction:
            state_hash = transaction.state_hash()
        pages_before = _leaf_pages(store, "accounts")
        assert pages_before > 1.3 * _full_leaf_pages(store, "accounts")  # the premise: pages are far from full

        compacted = {item.name: item for item in store.compact()}

        assert set(compacted) == {name for name in store.databases}
        assert compacted["accounts"].entries == accounts_count
        assert compacted["accounts"].pages_after < compacted["accounts"].pages_before
        assert _leaf_pages(store, "accounts") <= _full_leaf_pages(store, "accounts")
        assert stored_records(store) == records
        with store.read() as transaction:
            assert transaction.state_hash() == state_hash
            assert transaction.recompute_state_hash() == state_hash
    finally:
        store.close()
    reopened = LedgerStore(tmp_path / "state", map_size_bytes=map_size_bytes, readonly=True)
    try:
        assert stored_records(reopened) == records
    finally:
        reopened.close()


def test_compacting_only_the_named_database_leaves_the_others_alone(tmp_path: Path) -> None:
    store = _fragmented_store(tmp_path / "state")
    try:
        history_pages = _leaf_pages(store, "history")
        compacted = store.compact(("accounts",))
        assert [item.name for item in compacted] == ["accounts"]
        assert _leaf_pages(store, "history") == history_pages
        with pytest.raises(ValueError, match="no database named 'acounts'"):
            store.compact(("acounts",))
    finally:
        store.close()


def test_a_compaction_that_fails_leaves_the_database_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _fragmented_store(tmp_path / "state")
    try:
        records = stored_records(store)
        pages_before = _leaf_pages(store, "accounts")
        append_all = storage.state._append_all
        calls = []

        def restore_loses_a_record(target, source, name):
            calls.append(name)
            if len(calls) == 2:  # the copy back from the scratch database: drop the last record
                everything = list(source.iternext())
                consumed, added = target.putmulti(everything[:-1], append=True)
                return added
            return append_all(target, source, name)

        monkeypatch.setattr(storage.state, "_append_all", restore_loses_a_record)
        with pytest.raises(StorageCorrupted, match="compacting 'accounts' did not reproduce its 20000 records"):
            store.compact(("accounts",))
        assert stored_records(store) == records
        assert _leaf_pages(store, "accounts") == pages_before
    finally:
        store.close()


def test_a_state_copied_for_a_snapshot_install_holds_its_records_in_full_pages(tmp_path: Path) -> None:
    # LMDB's own compact copy (what a snapshot carries) keeps each page as it was, half empty or not; the
    # install appends the records to a new environment, which fills each page.
    source = _fragmented_store(tmp_path / "source")
    try:
        with source.read() as reader:
            copied = write_environment_in_full_pages(reader, tmp_path / "copy", map_size_bytes=map_size_bytes)
        records = stored_records(source)
        assert copied == len(records)
        target = LedgerStore(tmp_path / "target", map_size_bytes=map_size_bytes, sync=False)
        target.replace_with(tmp_path / "copy")
        try:
            assert stored_records(target) == records
            assert _leaf_pages(target, "accounts") <= _full_leaf_pages(target, "accounts")
            assert _leaf_pages(target, "accounts") < _leaf_pages(source, "accounts")
        finally:
            target.close()
    finally:
        source.close()


def test_tonle_node_compact_rewrites_a_nodes_state_and_prints_the_pages(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cluster = LocalCluster.create(tmp_path / "network", validators=1, institutions=0)
    node = next(iter(cluster.nodes.values()))
    assert main(["node", "compact", "--config", str(node.config)]) == 1
    assert "no node state under" in capsys.readouterr().err

    fragmented = _fragmented_store(node.data_dir / "state")
    records = stored_records(fragmented)
    fragmented.close()
    assert main(["node", "compact", "--config", str(node.config), "--database", "accounts"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [item["name"] for item in document["databases"]] == ["accounts"]
    assert document["databases"][0]["entries"] == accounts_count
    assert document["pages_after"] < document["pages_before"]
    reopened = open_store(node.data_dir, map_size_bytes=map_size_bytes, sync=False)
    try:
        assert stored_records(reopened) == records
    finally:
        reopened.close()
