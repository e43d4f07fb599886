"""RFC 9162 Merkle tree hashing, inclusion and consistency proofs over a store of complete subtree hashes."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

from consensus.codec import is_integer

hash_bytes = 32
# Sizes and indexes travel as u64 (the storage key, the receipt): a tree holds at most 2^64 - 1 leaves.
tree_size_max = 2**64 - 1
# A tree of at most 2^64 - 1 leaves is at most 64 levels deep, so no proof is longer than this.
proof_hashes_max = 64

# RFC 9162 §2.1.1: the Merkle Tree Hash of the empty list.
empty_root = hashlib.sha256(b"").digest()
_leaf_prefix = b"\x00"
_node_prefix = b"\x01"


class ProofRangeError(ValueError):
    """A leaf index or tree size that the tree cannot answer for (out of range, or not an integer)."""


class TreeFull(RuntimeError):
    """The tree already holds `tree_size_max` leaves; another leaf cannot be given a u64 index."""


class SubtreeStore(Protocol):
    """Where a tree keeps its complete subtrees: (level, index) is the root of leaves [index*2^level, +2^level)."""

    def tree_size(self) -> int: ...

    def subtree_hash(self, level: int, index: int) -> bytes: ...


def leaf_hash(leaf_data: bytes) -> bytes:
    return hashlib.sha256(_leaf_prefix + leaf_data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_node_prefix + left + right).digest()


def _split(size: int) -> int:
    """RFC 9162's k: the largest power of two smaller than `size` (which is at least 2)."""
    return 1 << ((size - 1).bit_length() - 1)


def _range_hash(store: SubtreeStore, start: int, end: int) -> bytes:
    """MTH(D[start:end]) for a range of the RFC recursion, from the complete subtrees it is made of.

    Such a range is a run of complete subtrees of decreasing size (one per set bit of its length), and the
    recursion hashes them right to left, so O(log n) reads answer it whatever the size.
    """
    parts = []
    position = start
    length = end - start
    for level in reversed(range(length.bit_length())):
        if length >> level & 1:
            assert position % (1 << level) == 0, "ranges of the RFC recursion are aligned"
            parts.append(store.subtree_hash(level, position >> level))
            position += 1 << level
    value = parts.pop()
    while parts:
        value = node_hash(parts.pop(), value)
    return value


def _require_size(store: SubtreeStore, size: int, minimum: int) -> int:
    current = store.tree_size()
    if not is_integer(size) or not minimum <= size <= current:
        raise ProofRangeError(f"tree size must be an integer in {minimum}..{current}, got {size!r}")
    return size


def tree_root(store: SubtreeStore, size: int | None = None) -> bytes:
    """MTH of the first `size` leaves (default: all of them); any past size is answered exactly."""
    size = store.tree_size() if size is None else _require_size(store, size, 0)
    if size == 0:
        return empty_root
    return _range_hash(store, 0, size)


def stored_leaf_hash(store: SubtreeStore, leaf_index: int) -> bytes:
    if not is_integer(leaf_index) or not 0 <= leaf_index < store.tree_size():
        raise ProofRangeError(f"leaf index must be in 0..{store.tree_size() - 1}, got {leaf_index!r}")
    return store.subtree_hash(0, leaf_index)


def appended_subtrees(store: SubtreeStore, leaf: bytes) -> list[tuple[int, int, bytes]]:
    """The complete subtrees (level, index, hash) that appending a leaf with hash `leaf` creates, bottom up.

    The new leaf, then every parent it completes: while the node just made is a right child, its left
    sibling is already stored. That is one write per append plus one per completed parent, two on average.
    """
    leaf_index = store.tree_size()
    if leaf_index >= tree_size_max:
        raise TreeFull(f"the tree already holds {tree_size_max} leaves")
    level, index, value = 0, leaf_index, leaf
    created = [(level, index, value)]
    while index & 1:
        value = node_hash(store.subtree_hash(level, index - 1), value)
        level, index = level + 1, index >> 1
        created.append((level, index, value))
    return created


def inclusion_proof(store: SubtreeStore, leaf_index: int, size: int) -> list[bytes]:
    """PATH(leaf_index, D[size]) of RFC 9162 §2.1.3.1, nearest the leaf first."""
    size = _require_size(store, size, 1)
    if not is_integer(leaf_index) or not 0 <= leaf_index < size:
        raise ProofRangeError(f"leaf index must be in 0..{size - 1}, got {leaf_index!r}")
    path = []
    start, end = 0, size
    while end - start > 1:
        middle = start + _split(end - start)
        if leaf_index < middle:
            path.append(_range_hash(store, middle, end))
            end = middle
        else:
            path.append(_range_hash(store, start, middle))
            start = middle
    path.reverse()
    return path


def consistency_proof(store: SubtreeStore, old_size: int, new_size: int) -> list[bytes]:
    """PROOF(old_size, D[new_size]) of RFC 9162 §2.1.4.1; empty when the sizes are equal.

    RFC 9162 defines the proof for 0 < old < new. An equal pair has the empty proof (the roots must simply
    match); an empty old tree has no proof, since it commits to nothing.
    """
    new_size = _require_size(store, new_size, 1)
    if not is_integer(old_size) or not 1 <= old_size <= new_size:
        raise ProofRangeError(f"old tree size must be in 1..{new_size}, got {old_size!r}")
    proof = []
    start, end, remaining, whole = 0, new_size, old_size, True
    while remaining != end - start:
        middle = start + _split(end - start)
        if start + remaining <= middle:
            proof.append(_range_hash(store, middle, end))
            end = middle
        else:
            proof.append(_range_hash(store, start, middle))
            remaining -= middle - start
            start, whole = middle, False
    if not whole:
        proof.append(_range_hash(store, start, end))
    proof.reverse()
    return proof


def _is_hash(value: object) -> bool:
    return type(value) is bytes and len(value) == hash_bytes


def _is_proof(proof: object) -> bool:
    return isinstance(proof, (list, tuple)) and len(proof) <= proof_hashes_max and all(_is_hash(item) for item in proof)


def _is_size(value: object) -> bool:
    return is_integer(value) and 0 <= value <= tree_size_max


def verify_inclusion(leaf: bytes, leaf_index: int, size: int, path: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2: does `path` prove leaf hash `leaf` is leaf `leaf_index` of the tree with `root`?"""
    if not (_is_hash(leaf) and _is_hash(root) and _is_proof(path) and _is_size(leaf_index) and _is_size(size)):
        return False
    if leaf_index >= size:
        return False
    first, second = leaf_index, size - 1
    value = leaf
    for sibling in path:
        if second == 0:
            return False
        if first & 1 or first == second:
            value = node_hash(sibling, value)
            while not first & 1 and first != 0:
                first, second = first >> 1, second >> 1
        else:
            value = node_hash(value, sibling)
        first, second = first >> 1, second >> 1
    return second == 0 and value == root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.4.2: does `proof` show the tree with `new_root` extends the one with `old_root`?"""
    if not (_is_hash(old_root) and _is_hash(new_root) and _is_proof(proof)):
        return False
    if not (_is_size(old_size) and _is_size(new_size) and 1 <= old_size <= new_size):
        return False
    if old_size == new_size:
        return len(proof) == 0 and old_root == new_root
    if len(proof) == 0:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    first, second = old_size - 1, new_size - 1
    while first & 1:
        first, second = first >> 1, second >> 1
    first_value = second_value = path[0]
    for item in path[1:]:
        if second == 0:
            return False
        if first & 1 or first == second:
            first_value = node_hash(item, first_value)
            second_value = node_hash(item, second_value)
            while not first & 1 and first != 0:
                first, second = first >> 1, second >> 1
        else:
            second_value = node_hash(second_value, item)
        first, second = first >> 1, second >> 1
    return first_value == old_root and second_value == new_root and second == 0


class MemoryTree:
    """The same append-only tree held in memory: the reference the LMDB tree is tested against."""

    def __init__(self) -> None:
        self._subtrees: dict[tuple[int, int], bytes] = {}
        self._size = 0

    def tree_size(self) -> int:
        return self._size

    def subtree_hash(self, level: int, index: int) -> bytes:
        return self._subtrees[level, index]

    def append(self, leaf_data: bytes) -> int:
        """Add a leaf and return its index."""
        for level, index, value in appended_subtrees(self, leaf_hash(leaf_data)):
            self._subtrees[level, index] = value
        self._size += 1
        return self._size - 1
