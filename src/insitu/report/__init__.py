"""The compliance report: built only from ledgers and the artefacts they point to.

:func:`write_report` (``insitu report``) verifies every ledger of the workspaces given,
checks each artefact a ledger entry points to against the SHA-256 that entry holds, and
renders a record of processing activities (GDPR Art. 30), the EU AI Act Annex IV items
the system can fill, the data-flow map of each site's boundary, the privacy figures,
model versions and installs, and plots, as one self-contained HTML page or a PDF. Tampered
evidence is refused, or marked UNVERIFIED in red on request. A report covers one federated
run (``run=``; by default the latest completed one) and the artefacts the ledgers link to
it; a run that did not complete is reported as such, with no headline figure.
:func:`declare_processing` (``insitu report declare``) records the controller's Art. 30
declaration that the report reads. See ``docs/report.md``.

Layer 8: reads ledgers (``insitu.audit``), workspaces and schemas (``insitu.data``),
and writes one event of its own (``processing.declared``); imports nothing that trains or
serves.
"""

from __future__ import annotations

from insitu.report._declare import (
    ITEMS,
    Declaration,
    declare_processing,
    load_declaration,
)
from insitu.report._evidence import (
    ArtefactCheck,
    Evidence,
    LedgerEvidence,
    collect_evidence,
    find_workspaces,
)
from insitu.report._render import Report, build_report, render_html, render_pdf, write_report

__all__ = [
    "ITEMS",
    "ArtefactCheck",
    "Declaration",
    "Evidence",
    "LedgerEvidence",
    "Report",
    "build_report",
    "collect_evidence",
    "declare_processing",
    "find_workspaces",
    "load_declaration",
    "render_html",
    "render_pdf",
    "write_report",
]
