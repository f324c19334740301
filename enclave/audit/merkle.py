"""RFC 6962 Merkle tree hashing, inclusion and consistency proofs (generation and verification).

Leaf hash = SHA-256(0x00 || leaf), node hash = SHA-256(0x01 || left || right); the split point of
n leaves is the largest power of two smaller than n (RFC 6962 section 2.1). Verification follows
RFC 9162 section 2.1.3.2 / 2.1.4.2, which is the same algorithm written iteratively.
"""
from __future__ import annotations

import hashlib

EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof does not verify, or its parameters are impossible."""


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


def root_from_hashes(hashes: list[bytes]) -> bytes:
    """MTH over already-leaf-hashed entries."""
    n = len(hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return hashes[0]
    k = _split(n)
    return node_hash(root_from_hashes(hashes[:k]), root_from_hashes(hashes[k:]))


class CompactRange:
    """Running root of an append-only tree in O(log n) memory: the perfect subtrees' roots."""

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[tuple[int, bytes]] = []  # (height, hash), heights strictly decreasing

    def append(self, lh: bytes) -> None:
        height, h = 0, lh
        while self._stack and self._stack[-1][0] == height:
            _, left = self._stack.pop()
            h = node_hash(left, h)
            height += 1
        self._stack.append((height, h))
        self.size += 1

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        h = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            h = node_hash(left, h)
        return h


def inclusion_proof(hashes: list[bytes], index: int) -> list[bytes]:
    """PATH(m, D[n]) from RFC 6962 2.1.1 over leaf hashes."""
    n = len(hashes)
    if not 0 <= index < n:
        raise ProofError(f"leaf index {index} outside tree of size {n}")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return inclusion_proof(hashes[:k], index) + [root_from_hashes(hashes[k:])]
    return inclusion_proof(hashes[k:], index - k) + [root_from_hashes(hashes[:k])]


def consistency_proof(hashes: list[bytes], m: int) -> list[bytes]:
    """PROOF(m, D[n]) from RFC 6962 2.1.2 over leaf hashes."""
    n = len(hashes)
    if not 0 < m <= n:
        raise ProofError(f"consistency from size {m} to {n} is undefined")
    return _subproof(hashes, m, True)


def _subproof(hashes: list[bytes], m: int, complete: bool) -> list[bytes]:
    n = len(hashes)
    if m == n:
        return [] if complete else [root_from_hashes(hashes)]
    k = _split(n)
    if m <= k:
        return _subproof(hashes[:k], m, complete) + [root_from_hashes(hashes[k:])]
    return _subproof(hashes[k:], m - k, False) + [root_from_hashes(hashes[:k])]


def verify_inclusion(lh: bytes, index: int, size: int, proof: list[bytes], root: bytes) -> None:
    """Raise ProofError unless `proof` shows leaf hash `lh` at `index` in the tree (size, root)."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} outside tree of size {size}")
    fn, sn, r = index, size - 1, lh
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof too long")
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
    if sn != 0:
        raise ProofError("inclusion proof too short")
    if r != root:
        raise ProofError("inclusion proof does not lead to the signed root")


def verify_consistency(size1: int, size2: int, root1: bytes, root2: bytes, proof: list[bytes]) -> None:
    """Raise ProofError unless tree (size2, root2) is an append-only extension of (size1, root1)."""
    if size1 > size2:
        raise ProofError(f"tree shrank from {size1} to {size2}")
    if size1 == size2:
        if proof or root1 != root2:
            raise ProofError("same size but different roots: the log was rewritten")
        return
    if size1 == 0:
        if proof:
            raise ProofError("consistency proof from the empty tree must be empty")
        return
    if not proof:
        raise ProofError("empty consistency proof")
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # size1 is a power of two: its root is the first node
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof too long")
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
    if sn != 0:
        raise ProofError("consistency proof too short")
    if fr != root1 or sr != root2:
        raise ProofError("consistency proof does not match the signed roots: the log was rewritten")


class Tree:
    """Append-only tree with every perfect subtree's hash cached: O(1) amortised append, proofs in
    O(log^2 n) instead of rehashing all leaves (the RFC 6962 recursion only ever asks for aligned
    perfect subtrees on its left side, so those are cache look-ups)."""

    def __init__(self) -> None:
        self.levels: list[list[bytes]] = [[]]  # levels[h][i] = hash of leaves [i*2^h, (i+1)*2^h)

    @property
    def size(self) -> int:
        return len(self.levels[0])

    def append(self, lh: bytes) -> None:
        self.levels[0].append(lh)
        h = 0
        while len(self.levels[h]) % 2 == 0:
            if len(self.levels) == h + 1:
                self.levels.append([])
            self.levels[h + 1].append(node_hash(self.levels[h][-2], self.levels[h][-1]))
            h += 1

    def _root(self, start: int, end: int) -> bytes:
        n = end - start
        if n == 0:
            return EMPTY_ROOT
        if n & (n - 1) == 0:  # perfect and (by construction of the recursion) aligned
            h = n.bit_length() - 1
            return self.levels[h][start >> h]
        k = _split(n)
        return node_hash(self._root(start, start + k), self._root(start + k, end))

    def root(self, size: int | None = None) -> bytes:
        size = self.size if size is None else size
        if not 0 <= size <= self.size:
            raise ProofError(f"tree size {size} is larger than the log ({self.size})")
        return self._root(0, size)

    def inclusion(self, index: int, size: int) -> list[bytes]:
        if not 0 < size <= self.size or not 0 <= index < size:
            raise ProofError(f"leaf index {index} outside tree of size {size} (log has {self.size})")
        return self._path(index, 0, size)

    def _path(self, m: int, start: int, end: int) -> list[bytes]:
        n = end - start
        if n == 1:
            return []
        k = _split(n)
        if m < k:
            return self._path(m, start, start + k) + [self._root(start + k, end)]
        return self._path(m - k, start + k, end) + [self._root(start, start + k)]

    def consistency(self, m: int, n: int) -> list[bytes]:
        if not 0 < m <= n <= self.size:
            raise ProofError(f"consistency from size {m} to {n} is undefined (log has {self.size})")
        return self._sub(m, 0, n, True)

    def _sub(self, m: int, start: int, end: int, complete: bool) -> list[bytes]:
        n = end - start
        if m == n:
            return [] if complete else [self._root(start, end)]
        k = _split(n)
        if m <= k:
            return self._sub(m, start, start + k, complete) + [self._root(start + k, end)]
        return self._sub(m - k, start + k, end, False) + [self._root(start, start + k)]
