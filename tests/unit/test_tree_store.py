"""The Merkle tree in real LMDB: same answers as the in-memory reference, in the state hash, all or nothing."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consensus import merkle
from storage import tree
from storage.state import LedgerStore, StorageCorrupted

map_size_bytes = 64 << 20


def open_store(path) -> LedgerStore:
    return LedgerStore(path, map_size_bytes=map_size_bytes, sync=False)


def append_batches(store: LedgerStore, batches: list[list[bytes]]) -> list[int]:
    indexes = []
    for batch in batches:
        with store.write() as transaction:
            indexes += [tree.append_leaf(transaction, leaf) for leaf in batch]
    return indexes


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.binary(max_size=40), max_size=12), max_size=12))
def test_lmdb_tree_answers_exactly_like_the_memory_tree_after_reopening(tmp_path_factory, batches):
    """Leaves appended over several transactions give the same roots (now and past) and proofs as the reference."""
    path = tmp_path_factory.mktemp("tree")
    reference = merkle.MemoryTree()
    leaves = [leaf for batch in batches for leaf in batch]
    expected_indexes = [reference.append(leaf) for leaf in leaves]
    store = open_store(path)
    assert append_batches(store, batches) == expected_indexes
    store.close()
    store = open_store(path)
    with store.read() as transaction:
        size = tree.tree_size(transaction)
        assert size == len(leaves)
        assert tree.root(transaction) == merkle.tree_root(reference)
        for past in range(size + 1):
            assert tree.root(transaction, past) == merkle.tree_root(reference, past)
        for new in range(1, size + 1):
            for index in range(new):
                assert tree.inclusion_proof(transaction, index, new) == merkle.inclusion_proof(reference, index, new)
            for old in range(1, new + 1):
                assert tree.consistency_proof(transaction, old, new) == merkle.consistency_proof(reference, old, new)
        for index, leaf in enumerate(leaves):
            assert tree.leaf_hash(transaction, index) == merkle.leaf_hash(leaf)
    store.close()


def test_an_empty_tree_has_the_empty_root(tmp_path):
    store = open_store(tmp_path)
    with store.read() as transaction:
        assert tree.tree_size(transaction) == 0
        assert tree.root(transaction) == merkle.empty_root


def test_appends_write_one_record_per_leaf_and_per_completed_subtree(tmp_path):
    """Amortised O(1): after n appends the database holds 2n - popcount(n) subtrees plus the size record."""
    store = open_store(tmp_path)
    count = 1000
    append_batches(store, [[index.to_bytes(4, "big") for index in range(count)]])
    with store.read() as transaction:
        records = list(transaction.items("tree"))
    assert len(records) == 2 * count - bin(count).count("1") + 1


def test_tree_records_are_state_and_move_the_state_hash(tmp_path):
    store = open_store(tmp_path)
    before = store.summary().state_hash
    append_batches(store, [[b"first", b"second"]])
    with store.read() as transaction:
        after = transaction.state_hash()
        assert after != before
        assert transaction.recompute_state_hash() == after


def test_an_aborted_transaction_leaves_no_leaf_behind(tmp_path):
    store = open_store(tmp_path)
    append_batches(store, [[b"kept"]])
    with pytest.raises(RuntimeError, match="apply failed"):
        with store.write() as transaction:
            tree.append_leaf(transaction, b"lost")
            raise RuntimeError("apply failed")
    with store.read() as transaction:
        assert tree.tree_size(transaction) == 1
        assert tree.root(transaction) == merkle.leaf_hash(b"kept")


def test_a_full_tree_refuses_another_leaf_and_writes_nothing(tmp_path):
    store = open_store(tmp_path)
    with store.write() as transaction:
        tree.write_size(transaction, merkle.tree_size_max)
    with pytest.raises(merkle.TreeFull):
        with store.write() as transaction:
            tree.append_leaf(transaction, b"one too many")
    with store.read() as transaction:
        assert tree.tree_size(transaction) == merkle.tree_size_max
        assert len(list(transaction.items("tree"))) == 1  # the size record alone


def test_subtrees_are_written_in_key_order_so_the_tree_pages_fill(tmp_path):
    """Each transaction's subtrees sort after every record before them, so LMDB splits pages at their end and
    leaves them full. Keyed by (level, index) with the size record last (layout 3), each insert landed in
    front of another key, pages split in half, and this tree took 233 leaf pages where full ones need 116."""
    store = open_store(tmp_path)
    append_batches(store, [[number.to_bytes(4, "big") for number in range(start, start + 20)] for start in range(0, 4000, 20)])
    with store.environment.begin() as raw:
        statistics = raw.stat(store.databases["tree"])
    record_bytes = 9 + 32 + 8 + 8 + 2  # key, hash, seal, LMDB node header, page slot
    full_pages = statistics["entries"] * record_bytes / (4096 - 16)
    assert statistics["entries"] == 2 * 4000 - bin(4000).count("1") + 1  # complete subtrees, and the size
    assert statistics["leaf_pages"] <= full_pages / 0.9


def test_a_missing_subtree_record_is_reported_as_corruption(tmp_path):
    store = open_store(tmp_path)
    append_batches(store, [[b"a", b"b", b"c"]])
    with store.environment.begin(write=True) as raw:
        assert raw.delete(struct.pack(">QB", 1, 1), db=store.databases["tree"])  # (level 1, index 0) ends at leaf 1
    with store.read() as transaction:
        with pytest.raises(StorageCorrupted, match=r"subtree \(1, 0\)"):
            tree.root(transaction)


def test_a_flipped_bit_in_a_subtree_hash_is_caught_by_the_record_checksum(tmp_path):
    store = open_store(tmp_path)
    append_batches(store, [[b"a", b"b"]])
    key = struct.pack(">QB", 1, 0)  # leaf 1: last leaf 1, level 0
    with store.environment.begin(write=True) as raw:
        stored = bytearray(raw.get(key, db=store.databases["tree"]))
        stored[0] ^= 0x01
        raw.put(key, bytes(stored), db=store.databases["tree"])
    with store.read() as transaction:
        with pytest.raises(StorageCorrupted):
            tree.inclusion_proof(transaction, 0, 2)


def test_requests_beyond_the_stored_tree_raise_a_range_error(tmp_path):
    store = open_store(tmp_path)
    append_batches(store, [[b"a", b"b", b"c"]])
    with store.read() as transaction:
        with pytest.raises(merkle.ProofRangeError):
            tree.root(transaction, 4)
        with pytest.raises(merkle.ProofRangeError):
            tree.inclusion_proof(transaction, 0, 4)
        with pytest.raises(merkle.ProofRangeError):
            tree.consistency_proof(transaction, 2, 4)
        with pytest.raises(merkle.ProofRangeError):
            tree.leaf_hash(transaction, 3)
