"""How an audit reaches the ledger, and the evidence files a report checks it against.

One writer per event (``privacy.audit``, ``privacy.inversion``) for every caller: the
``insitu privacy`` commands and the quickstart. An audit is linked to the run that
trained the model (``run``, read from the model directory's record or found in the
ledger by the model's ONNX digest), so ``insitu report`` shows it beside that run's
figures, whoever ran it. The files written beside it (``audit.json``, ``roc.json``) are
named with their SHA-256 in the entry, and the report refuses them if they changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from insitu._atomic import atomic_write_text
from insitu.attacks._membership import MembershipAudit
from insitu.audit import Entry, Ledger, events

__all__ = ["record_inversion", "record_membership_audit", "run_of_model", "write_audit_evidence"]


def run_of_model(ledger: Ledger, onnx_sha256: str) -> str | None:
    """The federated run of this ledger whose model has this ONNX digest, if any."""
    for entry in ledger.entries(event_type=events.FEDERATION_COMPLETED.name, newest_first=True):
        if entry.payload.get("onnx_sha256") == onnx_sha256:
            return str(entry.payload.get("run"))
    return None


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_audit_evidence(
    home: Path, directory: Path, audit: MembershipAudit, report: Mapping[str, Any]
) -> dict[str, Any]:
    """Write ``audit.json`` and the first attack's ROC (``roc.json``) into ``directory``.

    Returns the entry's ``artefacts`` (paths relative to ``home``, SHA-256 of each);
    empty when ``directory`` is not inside ``home`` (a report can check only files of
    the workspace).
    """
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "audit.json", json.dumps(report, indent=2, sort_keys=True))
    curve = audit.results[0].summary
    # A few hundred points of the ROC curve, log-spaced in FPR: figures, never scores.
    grid = np.unique(np.concatenate([np.geomspace(1e-4, 1.0, 200), [0.0]]))
    tpr = np.interp(grid, curve.fpr_curve, curve.tpr_curve)
    atomic_write_text(
        directory / "roc.json",
        json.dumps({"attack": audit.results[0].attack, "fpr": grid.tolist(), "tpr": tpr.tolist()}),
    )
    try:
        relative = directory.resolve().relative_to(home.resolve())
    except ValueError:
        return {}
    return {
        name: {
            "path": str(relative / f"{name}.json"),
            "sha256": _digest(directory / f"{name}.json"),
        }
        for name in ("audit", "roc")
    }


def record_membership_audit(
    ledger: Ledger,
    report: Mapping[str, Any],
    *,
    run: str | None,
    artefacts: Mapping[str, Any] | None = None,
) -> Entry:
    """Record a membership-inference audit (``privacy.audit``), linked to its run.

    Without ``run``, the run is looked up in ``ledger`` by the model's ONNX digest.
    """
    if run is None and report.get("onnx_sha256"):
        run = run_of_model(ledger, str(report["onnx_sha256"]))
    payload = {k: v for k, v in report.items() if k not in {"plot", "run"}}
    if artefacts:
        payload["artefacts"] = dict(artefacts)
    return events.PRIVACY_AUDIT.record(ledger, run=run, **payload)


def record_inversion(ledger: Ledger, report: Mapping[str, Any]) -> Entry:
    """Record a gradient-inversion demonstration (``privacy.inversion``)."""
    return events.PRIVACY_INVERSION.record(
        ledger, **{k: v for k, v in report.items() if k != "plot"}
    )
