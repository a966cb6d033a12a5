"""Self-contained proof documents that a verifier checks without the ledger.

An auditor who kept a signed head (``insitu audit head``) asks the node for:

* an **inclusion proof** (``insitu-inclusion-proof/1``): one entry, a signed head, and
  the RFC 6962 audit path from the entry to the head's root. It shows the entry is in
  the log the head commits to, without revealing any other entry.
* a **consistency proof** (``insitu-consistency-proof/1``): the auditor's old head, a
  new head, and the RFC 6962 proof that the old tree is a prefix of the new one. It
  shows the log only grew: nothing the old head covered was changed or removed.

:func:`check_proof` verifies either kind against a pinned public key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from insitu._signer import SigningPublicKey, public_key_from_text, public_key_text
from insitu.audit._ledger import Ledger
from insitu.audit._merkle import leaf_hash, verify_consistency, verify_inclusion
from insitu.audit._records import (
    Entry,
    TreeHead,
    _unhex,
    node_id_for,
    verify_entry_signature,
)
from insitu.errors import (
    BadEntrySignatureError,
    EntryHashMismatchError,
    MalformedLedgerError,
    ProofError,
)

__all__ = [
    "CONSISTENCY_FORMAT",
    "INCLUSION_FORMAT",
    "CheckedProof",
    "check_proof",
    "consistency_document",
    "inclusion_document",
]

INCLUSION_FORMAT = "insitu-inclusion-proof/1"
CONSISTENCY_FORMAT = "insitu-consistency-proof/1"


def _raw(key: SigningPublicKey) -> str:
    return public_key_text(key)


def inclusion_document(ledger: Ledger, seq: int, head: TreeHead | None = None) -> dict[str, Any]:
    """An inclusion proof of entry ``seq`` in ``head`` (default: a fresh head)."""
    head = head or ledger.sign_head()
    entry = ledger.get(seq)
    if entry is None or seq > head.size:
        raise ProofError(f"entry {seq} is not covered by a head of {head.size} entries")
    return {
        "format": INCLUSION_FORMAT,
        "public_key": _raw(ledger.public_key),
        "entry": entry.to_json(),
        "head": head.to_json(),
        "proof": [p.hex() for p in ledger.inclusion_proof(seq, head.size)],
    }


def consistency_document(ledger: Ledger, old_head: TreeHead) -> dict[str, Any]:
    """A proof that the log grew from ``old_head`` to a fresh head."""
    new_head = ledger.sign_head()
    return {
        "format": CONSISTENCY_FORMAT,
        "public_key": _raw(ledger.public_key),
        "old_head": old_head.to_json(),
        "new_head": new_head.to_json(),
        "proof": [p.hex() for p in ledger.consistency_proof(old_head.size, new_head.size)]
        if old_head.size
        else [],
    }


@dataclass(frozen=True, slots=True)
class CheckedProof:
    """What a verified proof document established."""

    kind: str
    node_id: str
    summary: str


def check_proof(doc: Any, public_key: SigningPublicKey | None) -> CheckedProof:
    """Verify a proof document; ``public_key`` pins the node (else the document's key).

    Raises:
        LedgerIntegrityError: a head or entry is not signed by the key, or was edited.
        ProofError: the Merkle proof does not verify.
        MalformedLedgerError: not a proof document.

    """
    if not isinstance(doc, dict) or doc.get("format") not in {INCLUSION_FORMAT, CONSISTENCY_FORMAT}:
        raise MalformedLedgerError("not an insitu proof document (unknown format)")
    try:
        doc_key = public_key_from_text(doc["public_key"])
        proof = [_unhex(p, 32) for p in doc["proof"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedLedgerError(f"malformed proof document ({exc})") from exc
    if public_key is not None and _raw(public_key) != _raw(doc_key):
        raise BadEntrySignatureError("the proof is signed by another key than the one pinned")
    key = public_key or doc_key
    node = node_id_for(key)
    if doc["format"] == INCLUSION_FORMAT:
        entry = Entry.from_json(doc.get("entry"))
        head = TreeHead.from_json(doc.get("head"))
        head.verify_signature(key)
        if entry.computed_hash() != entry.hash:
            raise EntryHashMismatchError(f"entry {entry.seq} was edited", seq=entry.seq)
        if not verify_entry_signature(key, entry.hash, entry.sig) or entry.node != node:
            raise BadEntrySignatureError(
                f"entry {entry.seq} is not signed by this node", seq=entry.seq
            )
        verify_inclusion(leaf_hash(entry.hash), entry.seq - 1, head.size, proof, head.root)
        return CheckedProof(
            "inclusion",
            node,
            f"entry {entry.seq} ({entry.type}) is in the log of {head.size} entries",
        )
    old = TreeHead.from_json(doc.get("old_head"))
    new = TreeHead.from_json(doc.get("new_head"))
    old.verify_signature(key)
    new.verify_signature(key)
    if old.size:
        verify_consistency(old.size, old.root, new.size, new.root, proof)
    return CheckedProof(
        "consistency", node, f"the log grew from {old.size} to {new.size} entries without rewriting"
    )
