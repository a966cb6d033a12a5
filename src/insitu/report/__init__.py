"""The compliance report: built only from ledgers and the artefacts they point to.

:func:`write_report` (``insitu report``) verifies every ledger of the workspaces given,
checks each artefact a ledger entry points to against the SHA-256 that entry holds, and
renders a record of processing activities (GDPR Art. 30), the EU AI Act Annex IV items
the system can fill, the data-flow map of each site's boundary, the privacy figures,
model versions and installs, and plots, as one self-contained HTML page or a PDF. Tampered
evidence is refused, or marked UNVERIFIED in red on request. See ``docs/report.md``.

Layer 8: reads ledgers (``insitu.audit``), workspaces and schemas (``insitu.data``);
imports nothing that trains or serves.
"""

from __future__ import annotations

from insitu.report._evidence import (
    ArtefactCheck,
    Evidence,
    LedgerEvidence,
    collect_evidence,
    find_workspaces,
)
from insitu.report._render import Report, build_report, render_html, render_pdf, write_report

__all__ = [
    "ArtefactCheck",
    "Evidence",
    "LedgerEvidence",
    "Report",
    "build_report",
    "collect_evidence",
    "find_workspaces",
    "render_html",
    "render_pdf",
    "write_report",
]
