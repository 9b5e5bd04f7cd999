"""RFC 9162 (Certificate Transparency v2) Merkle trees over a log's entries: the tree head,
inclusion, consistency and range proofs, and their verifiers. Format and rationale:
docs/HISTORY.md."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

__all__ = ["EMPTY_ROOT", "MerkleTree", "leaf_hash", "leaf_hashes", "node_hash",
           "verify_consistency", "verify_inclusion", "verify_range"]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
_LEAF, _NODE = b"\x00", b"\x01"


def leaf_hash(entry: bytes | memoryview) -> bytes:
    """The hash of one entry as a leaf: SHA-256(0x00 || entry)."""
    return hashlib.sha256(_LEAF + entry).digest()


def leaf_hashes(entries: Iterable[bytes | memoryview]) -> list[bytes]:
    """:func:`leaf_hash` of each entry (bytes, or a view of a received payload), in order."""
    sha256, prefix = hashlib.sha256, _LEAF
    return [sha256(prefix + entry).digest() for entry in entries]


def node_hash(left: bytes, right: bytes) -> bytes:
    """The hash of an inner node: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(_NODE + left + right).digest()


def _subtree_hash(leaves: Sequence[bytes]) -> bytes:
    """MTH of ``leaves`` (leaf hashes, at least one), a level at a time: the odd last node of
    a level moves up as it is, which builds RFC 9162's tree (split at the largest power of
    two) from the bottom."""
    level = list(leaves)
    sha256, prefix = hashlib.sha256, _NODE
    while len(level) > 1:
        odd = level[-1:] if len(level) & 1 else []
        level = [sha256(prefix + left + right).digest()
                 for left, right in zip(level[0::2], level[1::2], strict=False)]
        level += odd
    return level[0]


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2): where RFC 9162 splits a tree."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """The leaf hashes of a log and the hashes of its complete subtrees.

    ``_levels[h]`` holds, 32 bytes each, the hash of every complete subtree of ``2**h``
    leaves in order, so the root of any prefix and every proof cost O(log n) hashes. Appending
    is amortised O(1). Memory: about 64 bytes per leaf.
    """

    def __init__(self, leaves: Sequence[bytes] = ()) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        self._start = 0
        for leaf in leaves:
            self.append(leaf)

    @classmethod
    def from_frontier(cls, start: int, frontier: Sequence[bytes]) -> MerkleTree:
        """A tree whose first ``start`` leaves are not known, only the hashes of the
        complete subtrees that tile them (largest first: ``frontier``, one per bit set in
        ``start``, as the left part of a range proof from ``start`` gives them). Leaves go
        on from ``start``; every root and proof that needs nothing inside the first
        ``start`` leaves is the full tree's."""
        bits = [h for h in range(start.bit_length() - 1, -1, -1) if start >> h & 1]
        if len(frontier) != len(bits) or any(len(x) != HASH_SIZE for x in frontier):
            raise ValueError(f"a tree from {start} needs {len(bits)} subtree hashes")
        tree = cls()
        tree._levels = [bytearray((start >> h) * HASH_SIZE)
                        for h in range(max(1, start.bit_length()))]
        for h, node in zip(bits, frontier, strict=True):
            tree._levels[h][-HASH_SIZE:] = node
        tree._size = tree._start = start
        return tree

    @property
    def size(self) -> int:
        return self._size

    @property
    def start(self) -> int:
        """The first leaf this tree knows (0 unless made :meth:`from_frontier`)."""
        return self._start

    def append(self, leaf: bytes) -> int:
        """Add a leaf hash; returns its index."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"a leaf hash has {HASH_SIZE} bytes, not {len(leaf)}")
        index = self._size
        self._levels[0] += leaf
        self._size += 1
        n, h = self._size, 0
        while n % 2 == 0:  # the newest subtree of 2**(h+1) leaves is complete
            level = self._levels[h]
            if h + 1 == len(self._levels):
                self._levels.append(bytearray())
            self._levels[h + 1] += node_hash(bytes(level[-2 * HASH_SIZE:-HASH_SIZE]),
                                             bytes(level[-HASH_SIZE:]))
            n //= 2
            h += 1
        return index

    def extend(self, leaves: Sequence[bytes]) -> None:
        """Add leaf hashes in order: :meth:`append` for many, a level at a time."""
        if leaves and set(map(len, leaves)) != {HASH_SIZE}:
            raise ValueError(f"a leaf hash has {HASH_SIZE} bytes")
        lo = self._size
        self._levels[0] += b"".join(leaves)
        self._size += len(leaves)
        hi, h = self._size, 0
        sha256 = hashlib.sha256
        while hi // 2 > lo // 2:
            # The subtrees of 2**(h+1) leaves the new leaves completed, from their children.
            level = self._levels[h]
            if h + 1 == len(self._levels):
                self._levels.append(bytearray())
            self._levels[h + 1] += b"".join(
                sha256(_NODE + level[j * 2 * HASH_SIZE:(j + 1) * 2 * HASH_SIZE]).digest()
                for j in range(lo // 2, hi // 2))
            lo, hi, h = lo // 2, hi // 2, h + 1

    def leaf(self, index: int) -> bytes:
        if not self._start <= index < self._size:
            raise IndexError(f"leaf {index} of a tree of {self._size}")
        return bytes(self._levels[0][index * HASH_SIZE:(index + 1) * HASH_SIZE])

    def leaves(self, start: int, end: int) -> bytes:
        """The leaf hashes of [start, end), concatenated."""
        if not self._start <= start <= end <= self._size:
            raise IndexError(f"leaves [{start}, {end}) of a tree of {self._size} from "
                             f"{self._start}")
        return bytes(self._levels[0][start * HASH_SIZE:end * HASH_SIZE])

    def root(self, size: int | None = None) -> bytes:
        """The tree head hash of the first ``size`` leaves (all by default)."""
        n = self._size if size is None else self._check_size(size)
        return EMPTY_ROOT if n == 0 else self._hash(0, n)

    def _check_size(self, size: int) -> int:
        if not 0 <= size <= self._size:
            raise ValueError(f"tree size {size} is not within 0..{self._size}")
        return size

    def _hash(self, lo: int, hi: int) -> bytes:
        """MTH of leaves [lo, hi): a stored complete subtree, or split as RFC 9162 does."""
        n = hi - lo
        if n & (n - 1) == 0 and lo % n == 0:
            h = n.bit_length() - 1
            i = lo >> h
            return bytes(self._levels[h][i * HASH_SIZE:(i + 1) * HASH_SIZE])
        k = _split(n)
        return node_hash(self._hash(lo, lo + k), self._hash(lo + k, hi))

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """The audit path of leaf ``index`` in the tree of ``size`` leaves (RFC 9162 PATH)."""
        n = self._size if size is None else self._check_size(size)
        if not 0 <= index < n:
            raise ValueError(f"leaf {index} is not in a tree of {n}")
        path: list[bytes] = []
        lo, hi = 0, n
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                path.append(self._hash(lo + k, hi))
                hi = lo + k
            else:
                path.append(self._hash(lo, lo + k))
                lo += k
        path.reverse()
        return path

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """That the tree of ``new_size`` leaves extends the one of ``old_size`` (RFC 9162)."""
        n = self._size if new_size is None else self._check_size(new_size)
        if not 0 < old_size <= n:
            raise ValueError(f"old size {old_size} is not within 1..{n}")
        return self._subproof(old_size, 0, n, True)

    def _subproof(self, m: int, lo: int, hi: int, whole: bool) -> list[bytes]:
        n = hi - lo
        if m == n:
            return [] if whole else [self._hash(lo, hi)]
        k = _split(n)
        if m <= k:
            return [*self._subproof(m, lo, lo + k, whole), self._hash(lo + k, hi)]
        return [*self._subproof(m - k, lo + k, hi, False), self._hash(lo, lo + k)]

    def range_proof(self, start: int, end: int, size: int | None = None) -> list[bytes]:
        """The hashes that, with leaves [start, end), give the root of ``size`` leaves: one per
        maximal subtree outside the range, left to right (at most ~2 log2 n)."""
        n = self._size if size is None else self._check_size(size)
        if not 0 <= start < end <= n:
            raise ValueError(f"range [{start}, {end}) is not a non-empty part of 0..{n}")
        out: list[bytes] = []
        self._range(0, n, start, end, out)
        return out

    def _range(self, lo: int, hi: int, start: int, end: int, out: list[bytes]) -> None:
        if hi <= start or lo >= end:
            out.append(self._hash(lo, hi))
        elif not (start <= lo and hi <= end):
            k = _split(hi - lo)
            self._range(lo, lo + k, start, end, out)
            self._range(lo + k, hi, start, end, out)


def verify_inclusion(*, leaf: bytes, index: int, size: int, proof: Sequence[bytes],
                     root: bytes) -> bool:
    """Whether ``leaf`` (a leaf hash) is leaf ``index`` of the tree of ``size`` with ``root``
    (RFC 9162, 2.1.3.2)."""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(*, old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """Whether the tree of ``new_size`` with ``new_root`` extends the one of ``old_size``
    with ``old_root`` (RFC 9162, 2.1.4.2)."""
    if not 0 < old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    if not path:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


def verify_range(*, leaves: Sequence[bytes], start: int, size: int, proof: Sequence[bytes],
                 root: bytes) -> bool:
    """Whether ``leaves`` (leaf hashes) are exactly leaves [start, start + len) of the tree
    of ``size`` with ``root``, given :meth:`MerkleTree.range_proof`'s hashes."""
    end = start + len(leaves)
    if not leaves or not 0 <= start < end <= size:
        return False
    hashes = iter(proof)
    missing = object()

    def walk(lo: int, hi: int) -> bytes | None:
        if hi <= start or lo >= end:
            got = next(hashes, missing)
            return got if isinstance(got, bytes) else None
        if start <= lo and hi <= end:
            return _subtree_hash(leaves[lo - start:hi - start])
        k = _split(hi - lo)
        left = walk(lo, lo + k)
        right = walk(lo + k, hi) if left is not None else None
        return None if left is None or right is None else node_hash(left, right)

    computed = walk(0, size)
    return computed is not None and next(hashes, missing) is missing and computed == root
