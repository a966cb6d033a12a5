"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and proof verification.

Why not ``pymerkle``: the ledger must update its tree in the *same SQLite transaction*
as the entry it appends, so that a crash can never leave the two apart, and it must do
so in O(log n) per append. pymerkle keeps its own copy of the leaves in its own storage
(memory or a separate SQLite file) and recomputes subtree roots from them; using it
would mean two stores to keep in step. What the ledger needs is small (a frontier of
perfect subtree roots, the PATH and PROOF functions of RFC 6962 section 2.1, and the
verification algorithms of RFC 9162 sections 2.1.3.2 and 2.1.4.2), and the tests
cross-check every root and proof against pymerkle on random trees.

Hashing (RFC 6962 section 2.1): ``leaf = SHA-256(0x00 || data)`` and
``node = SHA-256(0x01 || left || right)``; here ``data`` is an entry's 32-byte hash.

Invariants of :class:`Frontier`: ``len(roots)`` equals the number of bits set in
``size``; ``roots[i]`` is the root of the i-th perfect subtree in the binary
decomposition of ``size``, largest (leftmost) first; folding them from the right gives
the RFC 6962 tree head of all ``size`` leaves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from insitu.errors import ProofError

__all__ = [
    "EMPTY_ROOT",
    "Frontier",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_of",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
#: The tree head of the empty tree: SHA-256 of the empty string (RFC 6962 section 2.1).
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """Hash of a leaf holding ``data``."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash of an interior node."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 Merkle tree hash of a list of *leaf hashes*."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = _split(n)
    return node_hash(root_of(leaves[:k]), root_of(leaves[k:]))


@dataclass
class Frontier:
    """The roots of the perfect subtrees of a growing tree: O(log n) state, O(1) append.

    See the module docstring for the invariants.
    """

    size: int = 0
    roots: list[bytes] = field(default_factory=list)

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash at the right edge of the tree."""
        node = leaf
        size = self.size
        # Each trailing 1-bit of the old size is a perfect subtree of the same height as
        # the one being carried: merge them, as in binary addition.
        while size & 1:
            node = node_hash(self.roots.pop(), node)
            size >>= 1
        self.roots.append(node)
        self.size += 1

    def root(self) -> bytes:
        """The tree head of all leaves appended so far."""
        if not self.roots:
            return EMPTY_ROOT
        node = self.roots[-1]
        for left in reversed(self.roots[:-1]):
            node = node_hash(left, node)
        return node

    def to_bytes(self) -> bytes:
        """Serialize the roots (the size is stored beside them)."""
        return b"".join(self.roots)

    @classmethod
    def from_bytes(cls, size: int, blob: bytes) -> Frontier:
        """Rebuild a frontier; refuses a blob that cannot belong to ``size``."""
        if size < 0 or len(blob) != HASH_SIZE * size.bit_count():
            raise ValueError(f"frontier of {len(blob)} bytes cannot describe {size} leaves")
        roots = [blob[i : i + HASH_SIZE] for i in range(0, len(blob), HASH_SIZE)]
        return cls(size=size, roots=roots)


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 6962 section 2.1.1: the audit path of leaf ``index`` (0-based)."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ValueError(f"leaf index {index} is outside a tree of {n} leaves")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return [*inclusion_proof(index, leaves[:k]), root_of(leaves[k:])]
    return [*inclusion_proof(index - k, leaves[k:]), root_of(leaves[:k])]


def consistency_proof(old_size: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 6962 section 2.1.2: tree of ``old_size`` leaves is a prefix."""
    n = len(leaves)
    if not 0 < old_size <= n:
        raise ValueError(f"cannot prove consistency from size {old_size} to size {n}")
    return _subproof(old_size, leaves, complete=True)


def _subproof(m: int, leaves: Sequence[bytes], *, complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [root_of(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaves[:k], complete=complete), root_of(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], complete=False), root_of(leaves[:k])]


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 section 2.1.3.2: check that leaf hash ``leaf`` sits at ``index``.

    Raises:
        ProofError: the proof does not lead from the leaf to ``root``.

    """
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of {size} leaves")
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is deep")
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
    if sn != 0 or r != root:
        raise ProofError(f"inclusion proof for leaf {index} does not match the signed root")


def verify_consistency(  # noqa: PLR0912 -- RFC 9162 2.1.4.2, step by step
    old_size: int, old_root: bytes, new_size: int, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 section 2.1.4.2: check that the old tree is a prefix of the new one.

    Raises:
        ProofError: the proof does not show the old tree inside the new one.

    """
    if not 0 < old_size <= new_size:
        raise ProofError(f"cannot prove consistency from size {old_size} to size {new_size}")
    if old_size == new_size:
        if proof or old_root != new_root:
            raise ProofError("heads of equal size must have equal roots and an empty proof")
        return
    if not proof:
        raise ProofError("consistency proof is empty")
    path = list(proof)
    # When the old tree is a perfect subtree, its root is the implicit first element.
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than the tree is deep")
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
    if sn != 0 or fr != old_root or sr != new_root:
        raise ProofError(
            f"consistency proof from size {old_size} to {new_size} does not match the heads"
        )
