"""The quickstart's steps beyond training and shipping: audit, baseline, declaration.

Each step leaves its figures in the coordinator's ledger (and any file it writes has its
SHA-256 there), because the compliance report (``insitu report``) is built from ledgers
and the artefacts they point to, never from this process's memory.

The steps of the main job are a fixed list, :data:`STEPS`; each returns a
:class:`StepResult` with the figures the summary table and the report read (documented
in ``docs/report.md``: ``model_bytes_before``/``model_bytes_after``, ``candidates`` and
``p50_ms`` for optimize; ``p50_ms``, ``requests``, ``predictions`` and ``explanations``
for serve).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from insitu.audit import events
from insitu.data import DataSchema, SiteDataset
from insitu.workspace import Workspace

__all__ = [
    "STEPS",
    "StepResult",
    "audit_membership_of",
    "declare_processing",
    "record_step",
    "site_records",
]

#: The main job, in order.
STEPS = (
    "workspaces",
    "federated training",
    "baseline",
    "privacy audit",
    "optimize",
    "supply chain",
    "serve",
    "ledgers",
    "report",
)

STEP_EVENT = events.QUICKSTART_STEP.name


@dataclass
class StepResult:
    """One step's outcome: ``ok``, ``not run`` or ``failed``, a line, and its figures."""

    step: str
    status: str
    summary: str
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """As recorded and printed."""
        return {
            "step": self.step,
            "status": self.status,
            "summary": self.summary,
            "figures": self.figures,
            "seconds": round(self.seconds, 2),
        }


def record_step(coordinator: Workspace, run_id: str, result: StepResult) -> None:
    """Record a step's outcome in the coordinator's ledger (figures only)."""
    with coordinator.ledger() as ledger:
        events.QUICKSTART_STEP.record(ledger, run=run_id, **result.to_json())


def site_records(
    site: Workspace, schema: DataSchema, part: Literal["train", "test"]
) -> tuple[np.ndarray, np.ndarray, int]:
    """A site's prepared ``train`` or ``test`` records as the model sees them (consent applied)."""
    directory = site.prepared_part(schema.name, part)
    data = SiteDataset.open(site, directory).for_round(role="audit")
    return data.features, data.labels, data.rows


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _onnx_predict(onnx: bytes) -> Any:
    from insitu._ort import create_session

    session = create_session(onnx, intra_op_threads=1)

    def predict(features: np.ndarray) -> np.ndarray:
        out = [
            np.asarray(session.run(None, {"features": features[i : i + 4096]})[0])
            for i in range(0, len(features), 4096)
        ]
        return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)

    return predict


def audit_membership_of(
    coordinator: Workspace,
    *,
    run_id: str,
    model_dir: Path,
    site_homes: list[Path],
    schema: DataSchema,
    epsilon: float,
    delta: float,
) -> tuple[StepResult, StepResult]:
    """Attack the trained model (loss attack) and fit the non-private baseline.

    Members are the sites' training records, non-members their held-out records (each
    record is at exactly one site, in one of the two parts, so the sets are disjoint by
    construction). The auditor here is the data owner: in a deployment each site would
    audit with its own records. The baseline is a centralized, non-private logistic
    regression on the same training records pooled, scored on the same held-out records:
    what the model would reach if privacy cost nothing and the data could be pooled
    (which the sites would never do; simulation only).
    """
    import time

    from sklearn.linear_model import LogisticRegression

    from insitu.attacks import (
        audit_membership,
        record_membership_audit,
        required_non_members,
        write_audit_evidence,
    )

    started = time.perf_counter()
    sites = [Workspace.open(home) for home in site_homes]
    train = [site_records(s, schema, "train") for s in sites]
    test = [site_records(s, schema, "test") for s in sites]
    x_m = np.concatenate([t[0] for t in train])
    y_m = np.concatenate([t[1] for t in train])
    x_n = np.concatenate([t[0] for t in test])
    y_n = np.concatenate([t[1] for t in test])
    onnx = (model_dir / "model.onnx").read_bytes()
    predict = _onnx_predict(onnx)
    fpr = next((f for f in (0.001, 0.01, 0.1) if len(y_n) >= required_non_members(f)), 0.1)
    audit = audit_membership(
        predict,
        (x_m, y_m),
        (x_n, y_n),
        attacks=("loss",),
        fprs=(fpr,),
        epsilon=epsilon,
        delta=delta,
        # Positional ids: the sets are disjoint by construction (see the docstring).
        member_ids=[f"m{i}" for i in range(len(y_m))],
        non_member_ids=[f"n{i}" for i in range(len(y_n))],
        bootstrap=200,
    )
    curve = audit.results[0].summary
    directory = coordinator.report_dir(f"privacy-audit-{run_id}")
    report = {
        "model": model_dir.name,
        "onnx_sha256": hashlib.sha256(onnx).hexdigest(),
        "privacy": "record",
    } | audit.to_json()
    artefacts = write_audit_evidence(coordinator.home, directory, audit, report)
    with coordinator.ledger() as ledger:
        record_membership_audit(ledger, report, run=run_id, artefacts=artefacts)
    point = curve.points[0]
    one_run = _one_run_audit(coordinator, sites[0], run_id, x_m, y_m, epsilon=epsilon, delta=delta)
    audit_result = StepResult(
        "privacy audit",
        "ok",
        f"loss attack on {len(y_m):,} members and {len(y_n):,} non-members: AUC "
        f"{curve.auc:.3f} ({curve.auc_low:.3f}-{curve.auc_high:.3f}); TPR at FPR {fpr:g} "
        f"{point.tpr:.4f}, DP bound {point.bound:.4f}"
        + (" [VIOLATION]" if audit.violation else "")
        + f"; one-run audit of the DP-SGD mechanism: empirical epsilon >= "
        f"{one_run.epsilon_lower_bound:.2f} vs {epsilon:.2f} claimed"
        + (" [FLAGGED]" if one_run.flagged else ""),
        {
            "attack_auc": round(curve.auc, 4),
            "fpr": fpr,
            "tpr": round(point.tpr, 6),
            "bound": None if point.bound is None else round(point.bound, 6),
            "violation": audit.violation,
            "one_run_lower_bound": round(one_run.epsilon_lower_bound, 4),
            "one_run_flagged": one_run.flagged,
        },
        time.perf_counter() - started,
    )

    started = time.perf_counter()
    baseline = LogisticRegression(max_iter=500)
    baseline.fit(x_m, y_m)
    baseline_accuracy = float(baseline.score(x_n, y_n))
    private_accuracy = float(np.mean((predict(x_n).reshape(-1) > 0).astype(np.int64) == y_n))
    figures = {
        "method": "centralized logistic regression, no DP, on the pooled training records",
        "baseline_accuracy": round(baseline_accuracy, 4),
        "private_accuracy": round(private_accuracy, 4),
        "train_rows": len(y_m),
        "test_rows": len(y_n),
    }
    with coordinator.ledger() as ledger:
        events.FEDERATION_BASELINE.record(ledger, run=run_id, **figures)
    baseline_result = StepResult(
        "baseline",
        "ok",
        f"non-private centralized logistic regression {baseline_accuracy:.4f} vs federated "
        f"DP model {private_accuracy:.4f} on the sites' {len(y_n):,} held-out records",
        figures,
        time.perf_counter() - started,
    )
    return audit_result, baseline_result


def _one_run_audit(
    coordinator: Workspace,
    site: Workspace,
    run_id: str,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    epsilon: float,
    delta: float,
) -> Any:
    """The white-box one-run audit of the run's DP-SGD mechanism, recorded for the report.

    The mechanism is the one a site ran (its noise multiplier, sample rate and steps
    over every round, from its ledger), trained on 4,000 of the training records with
    1,000 canaries; the attacker knows every published seed.
    """
    from insitu.attacks import insitu_mechanism, one_run_audit, record_one_run_audit

    with site.ledger() as ledger:
        rounds = [
            e.payload
            for e in ledger.entries(event_type="privacy.spent")
            if e.payload.get("run") == run_id and e.payload["mechanism"] == "dp-sgd"
        ]
    first = rounds[0]
    mechanism = insitu_mechanism(
        noise_multiplier=first["noise_multiplier"],
        sample_rate=first["sample_rate"],
        steps=int(first["steps"]) * len(rounds),
    )
    sample = np.random.default_rng(0).permutation(len(labels))[:4000]
    audit = one_run_audit(
        mechanism,
        features[sample],
        labels[sample].astype(np.float32),
        claimed_epsilon=epsilon,
        delta=delta,
    )
    with coordinator.ledger() as ledger:
        record_one_run_audit(ledger, audit, run=run_id, data="the sites' training records")
    return audit


def declare_processing(coordinator: Workspace, schema: DataSchema, sites: int) -> None:
    """Record the controller's statements of the processing (GDPR Art. 30) in the ledger.

    What no ledger can measure (who the controller is, the subjects, retention) is a
    declaration; the report shows it as declared, beside what the system recorded.
    """
    from insitu.report import declare_processing as record_declaration

    record_declaration(
        coordinator,
        {
            "controller": "insitu quickstart (demonstration; replace with the controller's name)",
            "purposes": [
                f"{schema.consent_purpose}: a model predicting {schema.label} "
                f"({schema.name}) trained where the data lives",
                "evaluation of the model on each site's held-out records",
            ],
            "data_subjects": "adults in the 1994 US census extract (UCI Adult)",
            "legal_basis": schema.legal_basis or "consent of each data subject (per record)",
            "recipients": "none outside the sites: only DP-noised, securely aggregated model "
            "updates reach the coordinator",
            "transfers": "none (every site and the coordinator on this machine)",
            "retention": "prepared records sealed at each site until the site deletes its "
            "workspace; models and ledgers for the life of the system",
        },
        sites=sites,
        schema_sha256=schema.digest(),
    )
