"""The report's sections, read from :class:`~insitu.report._evidence.Evidence` only.

Each function takes the evidence (and the run it reports on) and returns plain data for
the template: figures are copied from ledger payloads, sums and maxima of them at most,
and every figure names the ledger entries it came from (``sources``), so a reader can
check it with ``insitu audit log``. Nothing here reads data files or recomputes a model.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from insitu.audit import Entry
from insitu.report._evidence import Evidence, LedgerEvidence

__all__ = ["build_sections"]

_NOT_RECORDED = None


def _for_run(entries: list[Entry], run: str) -> list[Entry]:
    return [e for e in entries if e.payload.get("run") == run]


def _last(entries: list[Entry]) -> Entry | None:
    return entries[-1] if entries else None


def _ref(le: LedgerEvidence, entries: list[Entry]) -> str:
    if not entries:
        return f"{le.name}: no entry"
    seqs = [e.seq for e in entries]
    if len(seqs) == 1:
        return f"{le.name} #{seqs[0]} {entries[0].type}"
    return f"{le.name} #{min(seqs)}-#{max(seqs)} {entries[0].type} ({len(seqs)})"


def _training(coord: LedgerEvidence, run: str) -> dict[str, Any]:
    started = _last(_for_run(coord.of_type("federation.started"), run))
    completed = _last(_for_run(coord.of_type("federation.completed"), run))
    rounds = _for_run(coord.of_type("federation.round"), run)
    if completed and completed.payload.get("round_entries"):
        # The rounds the model came from: a resumed run records a re-trained round twice.
        linked = set(completed.payload["round_entries"])
        rounds = [e for e in rounds if e.seq in linked]
    config = dict(started.payload) if started else {}
    return {
        "run": run,
        "time": started.time if started else None,
        "completed_time": completed.time if completed else None,
        "config": config,
        "central_accuracy": completed.payload.get("central_accuracy") if completed else None,
        "onnx_sha256": completed.payload.get("onnx_sha256") if completed else None,
        "model_sha256": completed.payload.get("model_sha256") if completed else None,
        "rounds": [
            {
                "round": e.payload["round"],
                "sites_ok": e.payload.get("sites_ok"),
                "failures": e.payload.get("failures"),
                "accuracy": e.payload.get("accuracy"),
                "central_accuracy": e.payload.get("central_accuracy"),
                "epsilon_run_max": e.payload.get("epsilon_run_max", e.payload.get("epsilon_max")),
                "sites_evaluated": e.payload.get("sites_evaluated"),
            }
            for e in rounds
        ],
        "sources": [
            _ref(coord, [started] if started else []),
            _ref(coord, rounds),
            _ref(coord, [completed] if completed else []),
        ],
    }


def _site_privacy(site: LedgerEvidence, run: str) -> dict[str, Any]:
    """The run's epsilon at the site, beside the most any of its subjects spent so far."""
    spent = site.of_type("privacy.spent")
    mine = _for_run(spent, run)
    training = [e for e in mine if e.payload.get("mechanism") in ("dp-sgd", "dp-fedavg")]
    refused = _for_run(site.of_type("privacy.budget_refused"), run)
    last = _last(mine)
    total = max((float(e.payload.get("epsilon_max_after", 0.0)) for e in spent), default=None)
    return {
        "site": site.name,
        "verified": site.verified,
        "epsilon_run": last.payload.get("epsilon_run") if last else None,
        "epsilon_total": total,
        "budget": last.payload.get("budget_epsilon") if last else None,
        "delta": last.payload.get("delta") if last else None,
        "noise_multiplier": training[-1].payload.get("noise_multiplier") if training else None,
        "sample_rate": training[-1].payload.get("sample_rate") if training else None,
        "steps": sum(int(e.payload.get("steps", 0)) for e in training),
        "mechanism": training[-1].payload.get("mechanism") if training else None,
        "mechanisms": sorted({str(e.payload.get("mechanism")) for e in mine}),
        "rounds_charged": len(training),
        "excluded_over_budget": max(
            (int(e.payload.get("excluded_over_budget", 0)) for e in training), default=0
        ),
        "refusals": len(refused),
        "by_round": [
            {
                "round": e.payload.get("round"),
                "epsilon": e.payload.get("epsilon_run"),
                "epsilon_total": e.payload.get("epsilon_max_after"),
            }
            for e in training
        ],
        "sources": [_ref(site, mine)],
    }


def _site_flow(site: LedgerEvidence, run: str) -> dict[str, Any]:
    egress = _for_run(site.of_type("federation.egress"), run)
    kinds = ("model_update", "protocol", "metrics", "envelope", "unclassified")
    sums = {k: sum(int(e.payload.get(f"{k}_bytes", 0)) for e in egress) for k in kinds}
    updates = [e for e in egress if int(e.payload.get("model_update_bytes", 0)) > 0]
    prepared = site.of_type("data.prepared")
    training = [
        e for e in _for_run(site.of_type("federation.site_round"), run) if e.payload.get("rows")
    ]
    consent = [
        e
        for e in site.of_type("data.consent_applied")
        if e.payload.get("role") == "training"
        and e.payload.get("round") in {t.payload.get("round") for t in training}
    ]
    return {
        "site": site.name,
        "recorded": bool(egress),
        "messages": len(egress),
        "model_updates": len(updates),
        "bytes_out": sum(int(e.payload.get("bytes_out", 0)) for e in egress),
        "bytes_in": sum(int(e.payload.get("bytes_in", 0)) for e in egress),
        **{f"{k}_bytes": v for k, v in sums.items()},
        # Raw records leave only as unclassified bytes (see insitu.federated._egress).
        "raw_record_bytes": sums["unclassified"] if egress else None,
        "records_held": sum(int(e.payload.get("rows_out", 0)) for e in prepared),
        "rows_trained_last_round": training[-1].payload.get("rows") if training else None,
        "excluded_without_consent": consent[-1].payload.get("excluded_without_consent")
        if consent
        else None,
        "sources": [_ref(site, egress), _ref(site, prepared)],
    }


def _data_governance(sites: list[LedgerEvidence]) -> list[dict[str, Any]]:
    rows = []
    for site in sites:
        prepared = site.of_type("data.prepared")
        withdrawals = [
            e for e in site.of_type("consent.changed") if e.payload.get("status") == "withdrawn"
        ]
        rows.append(
            {
                "site": site.name,
                "releases": [
                    {
                        "source": e.payload.get("dataset"),
                        "rows_in": e.payload.get("rows_in"),
                        "rows_out": e.payload.get("rows_out"),
                        "dropped": e.payload.get("dropped"),
                        "undeclared": e.payload.get("undeclared"),
                        "pseudonymized": e.payload.get("pseudonymized"),
                        "sealed": e.payload.get("sealed"),
                        "schema_sha256": e.payload.get("schema_sha256"),
                    }
                    for e in prepared
                ],
                "consent_changes": len(site.of_type("consent.changed")),
                "withdrawals": len(withdrawals),
                "sources": [_ref(site, prepared), _ref(site, site.of_type("consent.changed"))],
            }
        )
    return rows


def _audit(evidence: Evidence, coord: LedgerEvidence, run: str) -> dict[str, Any] | None:
    entry = _last(_for_run(coord.of_type("privacy.audit"), run))
    if entry is None:
        return None
    payload = entry.payload
    roc = evidence.artefact(f"{entry.seq}:roc")
    return {
        "members": payload.get("members"),
        "non_members": payload.get("non_members"),
        "epsilon": payload.get("epsilon"),
        "delta": payload.get("delta"),
        "violation": payload.get("violation"),
        "above_bound": payload.get("above_bound"),
        "attacks": payload.get("attacks", []),
        "roc": roc if isinstance(roc, dict) else None,
        "sources": [_ref(coord, [entry])],
    }


def _one_run_audit(coord: LedgerEvidence, run: str) -> dict[str, Any] | None:
    """The white-box one-run audit of this run's mechanism, or the latest of any."""
    audits = coord.of_type("privacy.one_run_audit")
    entry = _last(_for_run(audits, run)) or _last(audits)
    if entry is None:
        return None
    return dict(entry.payload) | {"sources": [_ref(coord, [entry])]}


def _models(coord: LedgerEvidence, sites: list[LedgerEvidence]) -> dict[str, Any]:
    created = coord.of_type("bundle.created")
    published = {e.payload.get("bundle_sha256"): e for e in coord.of_type("repo.published")}
    versions = []
    for entry in created:
        p = entry.payload
        digest = p.get("bundle_sha256")
        installs = []
        for site in sites:
            for e in site.of_type("update.installed"):
                if e.payload.get("bundle_sha256") == digest:
                    installs.append({"site": site.name, "time": e.time, "slot": e.payload["slot"]})
        versions.append(
            {
                "model": p.get("model"),
                "version": p.get("version"),
                "time": entry.time,
                "bundle_id": p.get("bundle_id"),
                "bundle_sha256": digest,
                "encrypted": p.get("encrypted"),
                "recipients": p.get("recipients"),
                "epsilon": p.get("epsilon"),
                "signer": coord.node_id,
                "published": digest in published,
                "targets_version": published[digest].payload.get("targets_version")
                if digest in published
                else None,
                "installs": installs,
            }
        )
    history = []
    for site in sites:
        for e in site.of_type("update."):
            history.append(
                {
                    "site": site.name,
                    "time": e.time,
                    "event": e.type.split(".", 1)[1],
                    "detail": ", ".join(
                        f"{k} {v}"
                        for k, v in e.payload.items()
                        if k in {"version", "kind", "target", "previous", "slot", "reason"}
                        and v is not None
                    ),
                }
            )
    history.sort(key=lambda h: h["time"])
    return {
        "versions": versions,
        "history": history,
        "sources": [_ref(coord, created)] + [_ref(s, s.of_type("update.")) for s in sites],
    }


def _steps(coord: LedgerEvidence, run: str) -> dict[str, dict[str, Any]]:
    steps: dict[str, dict[str, Any]] = {}
    for e in _for_run(coord.of_type("quickstart.step"), run):
        steps[str(e.payload.get("step"))] = dict(e.payload) | {"seq": e.seq}
    return steps


def build_sections(evidence: Evidence) -> dict[str, Any]:
    """Every section's data, for the latest federated run of the first coordinator.

    Raises:
        UsageError: no workspace ran a federation (nothing to report on).

    """
    from insitu.errors import UsageError

    coords = [c for c in evidence.coordinators if c.of_type("federation.completed")]
    if not coords:
        raise UsageError(
            "none of these workspaces completed a federated run: give the coordinator's "
            "workspace (or the quickstart's --out directory)"
        )
    coord = coords[0]
    run = str(coord.of_type("federation.completed")[-1].payload["run"])
    training = _training(coord, run)
    site_names = set(training["config"].get("site_names") or [])
    sites = [s for s in evidence.sites if not site_names or s.name in site_names]
    schema = evidence.artefact(f"schema:{run}")
    privacy = [_site_privacy(s, run) for s in sites]
    flows = [_site_flow(s, run) for s in sites]
    declared = _last(coord.of_type("processing.declared"))
    baseline = _last(_for_run(coord.of_type("federation.baseline"), run))
    by_round: dict[int, dict[str, float]] = defaultdict(dict)
    for p in privacy:
        for point in p["by_round"]:
            by_round[int(point["round"] or 0)][p["site"]] = point["epsilon"]
    return {
        "run": run,
        "coordinator": {"name": coord.name, "node_id": coord.node_id, "verified": coord.verified},
        "training": training,
        "schema": schema,
        "privacy": privacy,
        "flows": flows,
        "governance": _data_governance(sites),
        "audit": _audit(evidence, coord, run),
        "one_run_audit": _one_run_audit(coord, run),
        "models": _models(coord, sites),
        "steps": _steps(coord, run),
        "declared": dict(declared.payload) | {"seq": declared.seq} if declared else None,
        "baseline": dict(baseline.payload) | {"seq": baseline.seq} if baseline else None,
        "epsilon_by_round": {r: by_round[r] for r in sorted(by_round)},
        "runs": [
            {
                "run": e.payload.get("run"),
                "time": e.time,
                "central_accuracy": e.payload.get("central_accuracy"),
                "rounds": e.payload.get("rounds"),
            }
            for e in coord.of_type("federation.completed")
        ],
    }
