"""RFC 6962 hashing and proofs, cross-checked against pymerkle on random trees."""

from __future__ import annotations

import hashlib

import pymerkle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from insitu.audit._merkle import (
    EMPTY_ROOT,
    Frontier,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)
from insitu.errors import ProofError


def _data(n: int) -> list[bytes]:
    return [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(n)]


def _pymerkle_tree(data: list[bytes]) -> pymerkle.InmemoryTree:
    tree = pymerkle.InmemoryTree(algorithm="sha256")
    for item in data:
        tree.append_entry(item)
    return tree


def test_empty_tree_root_is_hash_of_empty_string():
    assert root_of([]) == EMPTY_ROOT == Frontier().root()


def test_rfc6962_leaf_and_node_domain_separation():
    # A leaf holding the concatenation of two hashes must not equal their parent node.
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert leaf_hash(a + b) != root_of([a, b])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(min_value=1, max_value=300))
def test_roots_match_pymerkle(n):
    data = _data(n)
    leaves = [leaf_hash(d) for d in data]
    frontier = Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    tree = _pymerkle_tree(data)
    assert frontier.root() == root_of(leaves) == tree.get_root()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=1, max_value=200), data=st.data())
def test_inclusion_proofs_match_pymerkle_and_verify(n, data):
    index = data.draw(st.integers(min_value=0, max_value=n - 1))
    items = _data(n)
    leaves = [leaf_hash(d) for d in items]
    proof = inclusion_proof(index, leaves)
    theirs = _pymerkle_tree(items).prove_inclusion(index + 1, n)
    # pymerkle's serialized path starts with the leaf itself, then the RFC 6962 path.
    assert [leaves[index].hex(), *(p.hex() for p in proof)] == theirs.serialize()["path"]
    verify_inclusion(leaves[index], index, n, proof, root_of(leaves))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=2, max_value=200), data=st.data())
def test_consistency_proofs_verify_for_every_prefix(n, data):
    m = data.draw(st.integers(min_value=1, max_value=n))
    leaves = [leaf_hash(d) for d in _data(n)]
    proof = consistency_proof(m, leaves)
    verify_consistency(m, root_of(leaves[:m]), n, root_of(leaves), proof)
    tree = _pymerkle_tree(_data(n))
    assert tree.get_root(m) == root_of(leaves[:m])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=2, max_value=64), data=st.data())
def test_any_altered_inclusion_proof_is_refused(n, data):
    leaves = [leaf_hash(d) for d in _data(n)]
    index = data.draw(st.integers(min_value=0, max_value=n - 1))
    proof = inclusion_proof(index, leaves)
    root = root_of(leaves)
    if not proof:
        return
    which = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=255))
    forged = list(proof)
    forged[which] = bytes([forged[which][0] ^ (1 + bit % 255)]) + forged[which][1:]
    with pytest.raises(ProofError):
        verify_inclusion(leaves[index], index, n, forged, root)
    # The right proof for the wrong position is refused too.
    with pytest.raises(ProofError):
        verify_inclusion(leaves[index], (index + 1) % n, n, proof, root)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=3, max_value=64), data=st.data())
def test_consistency_with_a_rewritten_prefix_is_refused(n, data):
    leaves = [leaf_hash(d) for d in _data(n)]
    m = data.draw(st.integers(min_value=1, max_value=n - 1))
    old_root = root_of(leaves[:m])
    # The log rewrote one of the old entries: the new head cannot be proven consistent.
    victim = data.draw(st.integers(min_value=0, max_value=m - 1))
    rewritten = list(leaves)
    rewritten[victim] = leaf_hash(b"rewritten")
    proof = consistency_proof(m, rewritten)
    with pytest.raises(ProofError):
        verify_consistency(m, old_root, n, root_of(rewritten), proof)


def test_frontier_round_trips_and_refuses_a_wrong_size():
    frontier = Frontier()
    for leaf in (leaf_hash(d) for d in _data(11)):
        frontier.append(leaf)
    again = Frontier.from_bytes(11, frontier.to_bytes())
    assert again.root() == frontier.root()
    with pytest.raises(ValueError, match="cannot describe"):
        Frontier.from_bytes(12, frontier.to_bytes())
