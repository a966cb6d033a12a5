"""The audit ledger: append-only, hash-chained, signed, with Merkle tree heads.

The spine of insitu: every other part records what it did here, and reports read only
from here. Start with :class:`Ledger` (usually through
:meth:`insitu.workspace.Workspace.ledger`).

Layer 2: imports only the leaves (``insitu.errors``, ``insitu._clock``, ``_canonical``,
``_atomic``, ``_pii``). Every package above may import it.
"""

from __future__ import annotations

from insitu.audit._export import (
    EXPORT_FORMAT,
    ExportVerification,
    export_ledger,
    verify_export,
)
from insitu.audit._ledger import EVENT_TYPE_PATTERN, Ledger
from insitu.audit._merkle import verify_consistency, verify_inclusion
from insitu.audit._proofs import (
    CONSISTENCY_FORMAT,
    INCLUSION_FORMAT,
    CheckedProof,
    check_proof,
    consistency_document,
    inclusion_document,
)
from insitu.audit._records import Entry, TreeHead, node_id_for
from insitu.audit._verify import VerificationReport, verify_entries

__all__ = [
    "CONSISTENCY_FORMAT",
    "EVENT_TYPE_PATTERN",
    "EXPORT_FORMAT",
    "INCLUSION_FORMAT",
    "CheckedProof",
    "Entry",
    "ExportVerification",
    "Ledger",
    "TreeHead",
    "VerificationReport",
    "check_proof",
    "consistency_document",
    "export_ledger",
    "inclusion_document",
    "node_id_for",
    "verify_consistency",
    "verify_entries",
    "verify_export",
    "verify_inclusion",
]
