"""The ledger's append-only RFC 9162 Merkle tree, kept as complete subtree hashes in the "tree" database."""

from __future__ import annotations

import struct

from consensus import merkle
from storage.state import StateTransaction, StorageCorrupted

_database = "tree"
# A subtree's key is the index of its last leaf, then its level (`u64 || u8`). Appending leaf n creates
# (n, 0), (n, 1), ... so every key written sorts after every key before it, and LMDB, which splits a page
# at its end only when the new key goes last, fills each page before starting the next. Layout 3 keyed
# subtrees by (level, index) and kept the size record last (`\xffsize`): every insert landed in front of
# another key, every page split in half and stayed half full. The size record's one-byte key sorts before
# every nine-byte node key.
_size_key = b"\x00"
_node_key_struct = struct.Struct(">QB")
_u64 = struct.Struct(">Q")


def _node_key(level: int, index: int) -> bytes:
    return _node_key_struct.pack(((index + 1) << level) - 1, level)


class _TransactionSubtrees:
    """The tree's subtrees as seen through one state transaction (checksummed, state-hashed records)."""

    def __init__(self, transaction: StateTransaction) -> None:
        self._transaction = transaction

    def tree_size(self) -> int:
        payload = self._transaction.get(_database, _size_key)
        if payload is None:
            return 0
        if len(payload) != _u64.size:
            raise StorageCorrupted(f"tree size record is {len(payload)} bytes, not {_u64.size}")
        return _u64.unpack(payload)[0]

    def subtree_hash(self, level: int, index: int) -> bytes:
        payload = self._transaction.get(_database, _node_key(level, index))
        # The size record says which subtrees exist: a missing or short one means the data file is damaged.
        if payload is None or len(payload) != merkle.hash_bytes:
            raise StorageCorrupted(f"tree subtree ({level}, {index}) is missing or damaged")
        return payload


def append_leaf(transaction: StateTransaction, leaf_data: bytes) -> int:
    """Add a leaf and return its index: one size write, one leaf write and one per completed parent."""
    leaf_index = append_leaf_at(transaction, leaf_data, tree_size(transaction))
    write_size(transaction, leaf_index + 1)
    return leaf_index


class _KnownSize(_TransactionSubtrees):
    def __init__(self, transaction: StateTransaction, size: int) -> None:
        super().__init__(transaction)
        self._size = size

    def tree_size(self) -> int:
        return self._size


def append_leaf_at(transaction: StateTransaction, leaf_data: bytes, size: int) -> int:
    """Add a leaf to a tree the caller knows has `size` leaves, without writing the size: the apply adds
    many leaves per batch and writes the size once (`write_size`), saving a read and a write per leaf."""
    created = merkle.appended_subtrees(_KnownSize(transaction, size), merkle.leaf_hash(leaf_data))
    for level, index, value in created:
        transaction.insert(_database, _node_key(level, index), value)
    return created[0][1]


def write_size(transaction: StateTransaction, size: int) -> None:
    transaction.put(_database, _size_key, _u64.pack(size))


def tree_size(transaction: StateTransaction) -> int:
    return _TransactionSubtrees(transaction).tree_size()


def root(transaction: StateTransaction, size: int | None = None) -> bytes:
    """The tree's root hash now, or at any past size."""
    return merkle.tree_root(_TransactionSubtrees(transaction), size)


def leaf_hash(transaction: StateTransaction, leaf_index: int) -> bytes:
    return merkle.stored_leaf_hash(_TransactionSubtrees(transaction), leaf_index)


def inclusion_proof(transaction: StateTransaction, leaf_index: int, size: int) -> list[bytes]:
    return merkle.inclusion_proof(_TransactionSubtrees(transaction), leaf_index, size)


def consistency_proof(transaction: StateTransaction, old_size: int, new_size: int) -> list[bytes]:
    return merkle.consistency_proof(_TransactionSubtrees(transaction), old_size, new_size)
