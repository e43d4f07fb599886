"""RFC 9162 Merkle trees: published vectors, proofs against the RFC's recursive definitions, tampering."""

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consensus.merkle import (
    MemoryTree,
    ProofRangeError,
    consistency_proof,
    empty_root,
    inclusion_proof,
    leaf_hash,
    stored_leaf_hash,
    tree_root,
    verify_consistency,
    verify_inclusion,
)

# The Certificate Transparency reference leaves and the root of every prefix of them (RFC 6962 test data,
# as published by transparency-dev/merkle): interoperability means agreeing with these exactly.
reference_leaves = [bytes.fromhex(text) for text in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f",
)]
reference_roots = [bytes.fromhex(text) for text in (
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]
reference_inclusion = {
    (0, 8): ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
             "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"],
    (5, 8): ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
             "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
             "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"],
}
reference_consistency = {
    (2, 8): ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"],
    (6, 8): ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
             "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
             "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"],
}


# The RFC's recursive definitions, written out independently of consensus.merkle (hashlib directly). -----


def split(size: int) -> int:
    k = 1
    while k * 2 < size:
        k *= 2
    return k


def naive_root(leaves: list[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = split(len(leaves))
    return hashlib.sha256(b"\x01" + naive_root(leaves[:k]) + naive_root(leaves[k:])).digest()


def naive_path(m: int, leaves: list[bytes]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = split(len(leaves))
    if m < k:
        return naive_path(m, leaves[:k]) + [naive_root(leaves[k:])]
    return naive_path(m - k, leaves[k:]) + [naive_root(leaves[:k])]


def naive_subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if whole else [naive_root(leaves)]
    k = split(n)
    if m <= k:
        return naive_subproof(m, leaves[:k], whole) + [naive_root(leaves[k:])]
    return naive_subproof(m - k, leaves[k:], False) + [naive_root(leaves[:k])]


def build(leaves: list[bytes]) -> MemoryTree:
    tree = MemoryTree()
    for index, leaf in enumerate(leaves):
        assert tree.append(leaf) == index
    return tree


def flipped(proof: list[bytes], position: int) -> list[bytes]:
    changed = list(proof)
    changed[position] = bytes([changed[position][0] ^ 0x01]) + changed[position][1:]
    return changed


def assert_inclusion_is_tamper_evident(leaves: list[bytes], index: int, size: int, path: list[bytes], root: bytes):
    leaf = leaf_hash(leaves[index])
    for position in range(len(path)):
        assert not verify_inclusion(leaf, index, size, flipped(path, position), root)
    if path:
        assert not verify_inclusion(leaf, index, size, path[:-1], root)
        other = index ^ 1 if index ^ 1 < size else index - 1
        assert not verify_inclusion(leaf_hash(leaves[other]), index, size, path, root)
        assert not verify_inclusion(leaf, other, size, path, root)
    assert not verify_inclusion(leaf, index, size, path + [bytes(32)], root)
    assert not verify_inclusion(leaf, index, size, path, hashlib.sha256(root).digest())


def assert_consistency_is_tamper_evident(old: int, new: int, proof: list[bytes], old_root: bytes, new_root: bytes):
    for position in range(len(proof)):
        assert not verify_consistency(old, new, old_root, new_root, flipped(proof, position))
    if proof:
        assert not verify_consistency(old, new, old_root, new_root, proof[:-1])
    assert not verify_consistency(old, new, old_root, new_root, proof + [bytes(32)])
    assert not verify_consistency(old, new, hashlib.sha256(old_root).digest(), new_root, proof)
    assert not verify_consistency(old, new, old_root, hashlib.sha256(new_root).digest(), proof)


def check_tree(leaves: list[bytes], consistency_pairs: list[tuple[int, int]] | None, definitions: bool) -> None:
    """Every root, every inclusion proof, and the given consistency pairs (None: every pair).

    With `definitions`, each proof must also equal the RFC's recursive PATH/PROOF (quadratic, so small trees).
    """
    tree = build(leaves)
    roots = [naive_root(leaves[:size]) for size in range(len(leaves) + 1)]
    for size in range(len(leaves) + 1):
        assert tree_root(tree, size) == roots[size]
    for size in range(1, len(leaves) + 1):
        for index in range(size):
            path = inclusion_proof(tree, index, size)
            assert not definitions or path == naive_path(index, leaves[:size])
            assert verify_inclusion(leaf_hash(leaves[index]), index, size, path, roots[size])
    if consistency_pairs is None:
        consistency_pairs = [(old, new) for new in range(1, len(leaves) + 1) for old in range(1, new + 1)]
    for old, new in consistency_pairs:
        proof = consistency_proof(tree, old, new)
        assert not definitions or proof == naive_subproof(old, leaves[:new], True)
        assert verify_consistency(old, new, roots[old], roots[new], proof)


# Tests ---------------------------------------------------------------------------------------------------


def test_roots_and_proofs_match_the_published_rfc_6962_vectors():
    tree = build(reference_leaves)
    assert empty_root == reference_roots[0]
    assert [tree_root(tree, size) for size in range(9)] == reference_roots
    for (index, size), expected in reference_inclusion.items():
        path = inclusion_proof(tree, index, size)
        assert [item.hex() for item in path] == expected
        assert verify_inclusion(leaf_hash(reference_leaves[index]), index, size, path, reference_roots[size])
    for (old, new), expected in reference_consistency.items():
        proof = consistency_proof(tree, old, new)
        assert [item.hex() for item in proof] == expected
        assert verify_consistency(old, new, reference_roots[old], reference_roots[new], proof)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=24), max_size=70))
def test_every_proof_of_every_size_matches_the_recursive_definition_and_verifies(leaves):
    check_tree(leaves, consistency_pairs=None, definitions=True)


@settings(max_examples=8, deadline=None)
@given(st.integers(min_value=71, max_value=300), st.integers(min_value=0, max_value=2**32))
def test_big_trees_prove_every_leaf_at_every_size_and_sampled_size_pairs(count, seed):
    generator = random.Random(seed)
    leaves = [generator.randbytes(generator.randrange(0, 40)) for _ in range(count)]
    pairs = [(old, new) for new in range(1, count + 1) for old in range(1, new + 1)]
    check_tree(leaves, consistency_pairs=generator.sample(pairs, 600), definitions=False)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=16), min_size=2, max_size=40, unique=True), st.data())
def test_tampered_inclusion_proofs_fail(leaves, data):
    tree = build(leaves)
    size = data.draw(st.integers(min_value=1, max_value=len(leaves)))
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    path = inclusion_proof(tree, index, size)
    assert_inclusion_is_tamper_evident(leaves, index, size, path, tree_root(tree, size))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=16), min_size=2, max_size=40, unique=True), st.data())
def test_tampered_consistency_proofs_fail(leaves, data):
    tree = build(leaves)
    new = data.draw(st.integers(min_value=2, max_value=len(leaves)))
    old = data.draw(st.integers(min_value=1, max_value=new - 1))
    proof = consistency_proof(tree, old, new)
    assert_consistency_is_tamper_evident(old, new, proof, tree_root(tree, old), tree_root(tree, new))


def test_equal_sizes_are_consistent_only_with_an_empty_proof_and_equal_roots():
    tree = build(reference_leaves)
    root = tree_root(tree, 5)
    assert consistency_proof(tree, 5, 5) == []
    assert verify_consistency(5, 5, root, root, [])
    assert not verify_consistency(5, 5, root, tree_root(tree, 6), [])
    assert not verify_consistency(5, 5, root, root, [root])


def test_proofs_with_wrong_shapes_are_refused_not_raised():
    tree = build(reference_leaves)
    path = inclusion_proof(tree, 5, 8)
    leaf = leaf_hash(reference_leaves[5])
    root = reference_roots[8]
    assert verify_inclusion(leaf, 5, 8, path, root)
    assert not verify_inclusion(leaf[:31], 5, 8, path, root)
    assert not verify_inclusion(leaf, 5, 8, [path[0][:31], *path[1:]], root)
    assert verify_inclusion(leaf, 5, 8, tuple(path), root)
    assert not verify_inclusion(leaf, 5, 8, path, root[:31])
    assert not verify_inclusion(leaf, 5, 8, b"".join(path), root)
    assert not verify_inclusion(leaf, 8, 8, path, root)
    assert not verify_inclusion(leaf, -1, 8, path, root)
    assert not verify_inclusion(leaf, True, 8, path, root)
    assert not verify_inclusion(leaf, 5, 2**64, path, root)
    assert not verify_consistency(0, 8, empty_root, root, [])
    assert not verify_consistency(8, 6, root, reference_roots[6], consistency_proof(tree, 6, 8))
    assert not verify_consistency(6, 8, reference_roots[6], root, [])


def test_requests_outside_the_tree_raise_a_range_error():
    tree = build(reference_leaves)
    with pytest.raises(ProofRangeError):
        tree_root(tree, 9)
    with pytest.raises(ProofRangeError):
        tree_root(tree, -1)
    with pytest.raises(ProofRangeError):
        inclusion_proof(tree, 8, 8)
    with pytest.raises(ProofRangeError):
        inclusion_proof(tree, 0, 9)
    with pytest.raises(ProofRangeError):
        inclusion_proof(tree, 0, 0)
    with pytest.raises(ProofRangeError):
        consistency_proof(tree, 0, 8)
    with pytest.raises(ProofRangeError):
        consistency_proof(tree, 6, 5)
    with pytest.raises(ProofRangeError):
        consistency_proof(tree, 2, 9)
    with pytest.raises(ProofRangeError):
        stored_leaf_hash(tree, 8)
    assert stored_leaf_hash(tree, 7) == leaf_hash(reference_leaves[7])

