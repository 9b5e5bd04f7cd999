"""The RFC 9162 Merkle tree against the RFC's recursive definitions, exhaustively for small
trees, and every proof against tampering."""

from __future__ import annotations

import hashlib

import pytest

from pear_mqtt.history.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
    verify_range,
)

N = 40


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(d: list[bytes]) -> bytes:
    """RFC 9162 2.1.1, literally."""
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = _k(len(d))
    return hashlib.sha256(b"\x01" + mth(d[:k]) + mth(d[k:])).digest()


def path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    return [*path(m, d[:k]), mth(d[k:])] if m < k else [*path(m - k, d[k:]), mth(d[:k])]


def subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [mth(d)]
    k = _k(n)
    if m <= k:
        return [*subproof(m, d[:k], b), mth(d[k:])]
    return [*subproof(m - k, d[k:], False), mth(d[:k])]


ENTRIES = [f"entry {i}".encode() for i in range(N)]


@pytest.fixture(scope="module")
def tree() -> MerkleTree:
    return MerkleTree([leaf_hash(e) for e in ENTRIES])


def test_roots_match_the_rfc_for_every_size(tree: MerkleTree) -> None:
    assert MerkleTree().root() == EMPTY_ROOT == mth([])
    for n in range(N + 1):
        assert tree.root(n) == mth(ENTRIES[:n]), n


def test_inclusion_proofs_match_the_rfc_and_verify(tree: MerkleTree) -> None:
    for n in range(1, N + 1):
        root = tree.root(n)
        for i in range(n):
            proof = tree.inclusion_proof(i, n)
            assert proof == path(i, ENTRIES[:n]), (i, n)
            leaf = leaf_hash(ENTRIES[i])
            assert verify_inclusion(leaf=leaf, index=i, size=n, proof=proof, root=root)
            # the wrong leaf, index, size or root never verifies
            assert not verify_inclusion(leaf=leaf_hash(b"forged"), index=i, size=n,
                                        proof=proof, root=root)
            if n > 1:
                assert not verify_inclusion(leaf=leaf, index=(i + 1) % n, size=n, proof=proof,
                                            root=root)
            assert not verify_inclusion(leaf=leaf, index=i, size=n, proof=proof,
                                        root=tree.root(n - 1) if n > 1 else EMPTY_ROOT)


def test_consistency_proofs_match_the_rfc_and_verify(tree: MerkleTree) -> None:
    for n in range(1, N + 1):
        for m in range(1, n + 1):
            proof = tree.consistency_proof(m, n)
            assert proof == subproof(m, ENTRIES[:n], True), (m, n)
            assert verify_consistency(old_size=m, new_size=n, old_root=tree.root(m),
                                      new_root=tree.root(n), proof=proof)
            if m < n:
                # a rewritten old history (a fork) does not verify
                forked = MerkleTree([leaf_hash(b"rewritten")]
                                    + [leaf_hash(e) for e in ENTRIES[1:m]])
                assert not verify_consistency(old_size=m, new_size=n, old_root=forked.root(),
                                              new_root=tree.root(n), proof=proof)


def test_range_proofs_verify_and_refuse_tampering(tree: MerkleTree) -> None:
    leaves = [leaf_hash(e) for e in ENTRIES]
    for n in range(1, N + 1):
        root = tree.root(n)
        for start in range(n):
            for end in range(start + 1, n + 1):
                proof = tree.range_proof(start, end, n)
                got = leaves[start:end]
                assert verify_range(leaves=got, start=start, size=n, proof=proof, root=root)
                assert len(proof) <= 2 * max(1, n.bit_length())
                if end - start > 1:  # reordered
                    swapped = [got[1], got[0], *got[2:]]
                    assert not verify_range(leaves=swapped, start=start, size=n, proof=proof,
                                            root=root)
                    # a truncated range passed off as the whole one
                    assert not verify_range(leaves=got[:-1], start=start, size=n, proof=proof,
                                            root=root)
                forged = [leaf_hash(b"forged"), *got[1:]]
                assert not verify_range(leaves=forged, start=start, size=n, proof=proof,
                                        root=root)


def test_bad_arguments_are_refused(tree: MerkleTree) -> None:
    with pytest.raises(ValueError, match="not within"):
        tree.root(N + 1)
    with pytest.raises(ValueError):
        tree.inclusion_proof(N, N)
    with pytest.raises(ValueError):
        tree.range_proof(3, 3)
    with pytest.raises(ValueError, match="32 bytes"):
        MerkleTree().append(b"short")
    assert node_hash(b"a" * 32, b"b" * 32) != node_hash(b"b" * 32, b"a" * 32)


@pytest.mark.parametrize("cut", [0, 1, 5, 16, 33])
def test_extending_in_runs_gives_the_tree_of_appending_one_by_one(cut: int) -> None:
    leaves = [leaf_hash(b"e%d" % i) for i in range(N + 30)]
    tree = MerkleTree(leaves[:cut])
    at, step = cut, 1
    while at < len(leaves):
        tree.extend(leaves[at:at + step])
        at += step
        step = step % 7 + 1
    one_by_one = MerkleTree(leaves)
    for size in range(len(leaves) + 1):
        assert tree.root(size) == one_by_one.root(size) == mth(
            [b"e%d" % i for i in range(size)])
    assert tree.leaves(3, 9) == b"".join(leaves[3:9])
    with pytest.raises(ValueError):
        tree.extend([b"short"])


@pytest.mark.parametrize("start", [1, 2, 5, 8, 13, 32])
def test_a_tree_from_the_frontier_of_a_dropped_prefix_has_the_full_trees_roots(
        start: int) -> None:
    leaves = [leaf_hash(e) for e in ENTRIES]
    full = MerkleTree(leaves)
    proof = full.range_proof(start, N, N)
    frontier = proof[:bin(start).count("1")]  # the subtrees left of the range, largest first
    tree = MerkleTree.from_frontier(start, frontier)
    assert tree.size == tree.start == start
    tree.extend(leaves[start:start + 3])
    for leaf in leaves[start + 3:]:
        tree.append(leaf)
    for size in range(start, N + 1):
        assert tree.root(size) == full.root(size)
    assert tree.range_proof(start, N) == full.range_proof(start, N)
    with pytest.raises(IndexError):
        tree.leaf(start - 1)
    with pytest.raises(ValueError):
        MerkleTree.from_frontier(start, frontier[1:])
