"""The report's sections, read from :class:`~insitu.report._evidence.Evidence` only.

Each function takes the evidence (and the run it reports on) and returns plain data for
the template: figures are copied from ledger payloads, sums and maxima of them at most,
and every figure names the ledger entries it came from (``sources``), so a reader can
check it with ``insitu audit log``. Nothing here reads data files or recomputes a model.
"""

from __future__ import annotations

import math
from typing import Any

from insitu.audit import Entry
from insitu.report import _plots
from insitu.report._declare import ITEMS
from insitu.report._evidence import Evidence, LedgerEvidence
from insitu.report._evidence import entry_ref as _ref
from insitu.report._groups import group_section
from insitu.report._keys import keys_and_attestation
from insitu.report._linked import models, optimization
from insitu.report._runs import choose_run, run_state, runs_of

__all__ = ["build_sections"]

_NOT_RECORDED = None


def _for_run(entries: list[Entry], run: str) -> list[Entry]:
    return [e for e in entries if e.payload.get("run") == run]


def _last(entries: list[Entry]) -> Entry | None:
    return entries[-1] if entries else None


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
    """The run's epsilon at the site, beside the most any of its subjects spent so far.

    "So far" ends with the run: a later run's spending is not this run's. The epsilon of
    the run is the most any subject spent in it (a held-out subject, charged only for
    the evaluation, spent less than a training one).
    """
    spent = site.of_type("privacy.spent")
    mine = _for_run(spent, run)
    training = [e for e in mine if e.payload.get("mechanism") in ("dp-sgd", "dp-fedavg")]
    refused = _for_run(site.of_type("privacy.budget_refused"), run)
    charges = sorted(mine + refused, key=lambda e: e.seq)
    last = _last(charges)
    end = last.seq if last else None
    total = max(
        (
            float(e.payload.get("epsilon_max_after", 0.0))
            for e in spent
            if end is not None and e.seq <= end
        ),
        default=None,
    )
    return {
        "site": site.name,
        "verified": site.verified,
        "epsilon_run": max((float(e.payload["epsilon_run"]) for e in mine), default=None),
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
        "by_round": _epsilon_by_round(spent, mine),
        "sources": [_ref(site, mine)],
    }


def _epsilon_by_round(spent: list[Entry], mine: list[Entry]) -> list[dict[str, Any]]:
    """After each round of the run: its epsilon so far, and the most spent in total so far.

    Round 0 is before training: what the run cost before its first round (a schema
    inferred from the records), beside what the site's subjects had spent before it.
    """
    if not mine:
        return []
    first = mine[0].seq
    before = max(
        (float(e.payload.get("epsilon_max_after", 0.0)) for e in spent if e.seq < first),
        default=0.0,
    )
    points: dict[int, dict[str, Any]] = {0: {"round": 0, "epsilon": 0.0, "epsilon_total": before}}
    run_eps, total = 0.0, before
    mine_seqs = {e.seq for e in mine}
    for e in spent:
        if e.seq < first or e.seq > mine[-1].seq:
            continue
        total = max(total, float(e.payload.get("epsilon_max_after", 0.0)))
        if e.seq in mine_seqs:
            run_eps = max(run_eps, float(e.payload.get("epsilon_run", 0.0)))
            number = int(e.payload.get("round") or 0)
            points[number] = {"round": number, "epsilon": run_eps, "epsilon_total": total}
    return [points[r] for r in sorted(points)]


def _releases(site: LedgerEvidence, run: str) -> list[Entry] | None:
    """The ``data.prepared`` entries of the releases the run's rounds name at this site.

    None when no round of the run at this site names its releases (it trained no round,
    or its ledger predates the link): then nothing says which records the run held.
    """
    named = {
        str(d)
        for e in _for_run(site.of_type("federation.site_round"), run)
        for d in e.payload.get("releases", [])
    }
    if not named:
        return None
    latest: dict[str, Entry] = {}
    for entry in site.of_type("data.prepared"):
        digest = entry.payload.get("release_sha256")
        if digest in named:
            latest[str(digest)] = entry
    return sorted(latest.values(), key=lambda e: e.seq)


def _site_flow(site: LedgerEvidence, run: str) -> dict[str, Any]:
    egress = _for_run(site.of_type("federation.egress"), run)
    kinds = ("model_update", "protocol", "metrics", "envelope", "unclassified")
    sums = {k: sum(int(e.payload.get(f"{k}_bytes", 0)) for e in egress) for k in kinds}
    updates = [e for e in egress if int(e.payload.get("model_update_bytes", 0)) > 0]
    prepared = _releases(site, run)
    training = [
        e for e in _for_run(site.of_type("federation.site_round"), run) if e.payload.get("rows")
    ]
    # The consent check each round of this run made: the last before the round's entry.
    consent = [
        c
        for t in training[-1:]
        for c in site.of_type("data.consent_applied")[::-1]
        if c.seq < t.seq
        and c.payload.get("role") == "training"
        and c.payload.get("round") == t.payload.get("round")
    ][:1]
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
        # The rows of the releases this run used (training and held-out), not every
        # preparation the site ever made.
        "records_held": None
        if prepared is None
        else sum(int(e.payload.get("rows_out", 0)) for e in prepared),
        "rows_trained_last_round": training[-1].payload.get("rows") if training else None,
        "excluded_without_consent": consent[-1].payload.get("excluded_without_consent")
        if consent
        else None,
        "sources": [_ref(site, egress), _ref(site, prepared or [])],
    }


def _data_governance(sites: list[LedgerEvidence], run: str) -> list[dict[str, Any]]:
    rows = []
    for site in sites:
        prepared = _releases(site, run) or []
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
                        "release_sha256": e.payload.get("release_sha256"),
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


def _steps(coord: LedgerEvidence, run: str) -> dict[str, dict[str, Any]]:
    steps: dict[str, dict[str, Any]] = {}
    for e in _for_run(coord.of_type("quickstart.step"), run):
        steps[str(e.payload.get("step"))] = dict(e.payload) | {"seq": e.seq}
    return steps


def _declared(coord: LedgerEvidence) -> dict[str, Any]:
    """The latest declaration of processing; an item nobody declared is None."""
    entry = _last(coord.of_type("processing.declared"))
    payload: dict[str, Any] = dict(entry.payload) if entry else {}
    items = {k: payload.get(k) or ([] if k == "purposes" else None) for k in ITEMS}
    return items | {"seq": entry.seq if entry else None}


def _array_input(evidence: Evidence, run: str, schema: Any) -> dict[str, Any] | None:
    """What an image or signal run took, from its verified model and schema only; else None.

    The record's shape is the input of the verified ONNX graph (``onnx_sha256`` of
    ``federation.completed``): (batch, C, H, W) is images, (batch, C, L) signals; the
    classes are its output's width. The value range is the one the verified data schema
    declares for every value of a record (the table an array schema becomes, one numeric
    column per value). A table's model takes (batch, features): None. Nothing else is
    read (class names live in ``features.json``, whose digest no ledger entry holds).
    """
    from insitu.bundle import schema_of
    from insitu.errors import InsituError

    onnx = evidence.artefact(f"onnx:{run}")
    if not isinstance(onnx, bytes):
        return None
    try:
        inputs, outputs = schema_of(onnx)
    except InsituError:
        return None
    shape = list(inputs[0]["shape"][1:]) if inputs else []
    if len(shape) not in (2, 3) or not all(isinstance(v, int) and v > 0 for v in shape):
        return None
    width = outputs[0]["shape"][-1] if outputs and outputs[0]["shape"] else None
    values = math.prod(shape)
    numeric = list(getattr(schema, "numeric", []))
    ranges = {tuple(schema.ranges.get(c, ())) for c in numeric} if schema is not None else set()
    return {
        "kind": "images" if len(shape) == 3 else "signals",
        "shape": shape,
        "channels": shape[0],
        "size": " x ".join(str(v) for v in shape[1:]),
        "record_values": values,
        "value_range": list(next(iter(ranges))) if len(ranges) == 1 else None,
        "classes": (int(width) if width > 1 else 2) if isinstance(width, int) else None,
        "label": getattr(schema, "label", None),
        "subject": getattr(schema, "subject", None),
        # The verified schema has one numeric column per value of a record, nothing else.
        "consistent": schema is not None
        and len(numeric) == values
        and not list(getattr(schema, "categorical", [])),
        # No figure per class is recorded: releasing one would be a new, DP-charged use.
        "per_class_accuracy": None,
    }


def _drift(
    sites: list[LedgerEvidence], devices: list[LedgerEvidence], run: str, versions: set[Any]
) -> dict[str, Any]:
    """The run's drift reference releases and what the monitors recorded of its versions.

    Releases: each site's ``drift.profile_released`` that names the run (charged to its
    subjects, as its ``privacy.spent`` shows). Monitoring: ``drift.detected`` and
    ``drift.cleared`` of the model versions built from the run, wherever they served;
    a statistic is flagged when its last transition is a detection.
    """
    releases = [
        (site, e) for site in sites for e in _for_run(site.of_type("drift.profile_released"), run)
    ]
    transitions = [
        (le, e)
        for le in devices
        for e in le.of_type("drift.")
        if e.type in ("drift.detected", "drift.cleared")
        and (e.payload.get("model"), e.payload.get("version")) in versions
    ]
    last: dict[tuple[str, str, str, str], Entry] = {}
    for le, e in transitions:
        p = e.payload
        last[(le.name, str(p.get("model")), str(p.get("version")), str(p.get("feature")))] = e
    latest = [
        {"site": key[0], "model": key[1], "version": key[2], "feature": key[3]}
        | {k: e.payload.get(k) for k in ("psi", "p_value", "rows", "psi_threshold")}
        | {"flagged": e.type == "drift.detected"}
        for key, e in sorted(last.items())
    ]
    return {
        "releases": [
            {"site": site.name, "seq": e.seq}
            | {
                k: e.payload.get(k)
                for k in ("histograms", "epsilon", "noise_std", "excluded_over_budget")
            }
            for site, e in releases
        ],
        "events": [
            {"site": le.name, "seq": e.seq, "time": e.time, "event": e.type}
            | {
                k: e.payload.get(k)
                for k in ("model", "version", "feature", "psi", "p_value", "rows", "psi_threshold")
            }
            for le, e in transitions
        ],
        "flagged": [f for f in latest if f["flagged"]],
        # Drawn here, as the section is the only one an array run adds (figures: payloads).
        "plot": _plots.drift_plot(latest),
        "sources": [
            *(_ref(site, [e for s, e in releases if s is site]) for site in sites),
            *(
                _ref(le, [e for d, e in transitions if d is le])
                for le in devices
                if any(d is le for d, _ in transitions)
            ),
        ],
    }


def build_sections(evidence: Evidence, run: str | None = None) -> dict[str, Any]:
    """Every section's data, for ``run`` (default: the latest completed run).

    Raises:
        UsageError: no workspace ran a federation, ``run`` is not one of the
            coordinator's (the line names its runs), or none completed and no run was named.

    """
    coord, run = choose_run(evidence, run)
    training = _training(coord, run)
    site_names = set(training["config"].get("site_names") or [])
    sites = [s for s in evidence.sites if not site_names or s.name in site_names]
    # Sites and devices: whoever installed or fine-tuned a bundle of this run.
    devices = [le for le in evidence.ledgers if le.role != "coordinator"]
    steps = _steps(coord, run)
    optimized = optimization(evidence, coord, run, training["onnx_sha256"])
    if "optimize" not in steps and optimized is not None:
        steps["optimize"] = optimized  # insitu optimize run on its own
    schema = evidence.artefact(f"schema:{run}")
    privacy = [_site_privacy(s, run) for s in sites]
    flows = [_site_flow(s, run) for s in sites]
    baseline = _last(_for_run(coord.of_type("federation.baseline"), run))
    linked = models(coord, devices, run)
    versions = {(v.get("model"), v.get("version")) for v in linked["versions"]}
    return {
        "run": run,
        "status": run_state(coord, run, devices),
        "coordinator": {"name": coord.name, "node_id": coord.node_id, "verified": coord.verified},
        "training": training,
        "schema": schema,
        "privacy": privacy,
        "flows": flows,
        "governance": _data_governance(sites, run),
        "audit": _audit(evidence, coord, run),
        "one_run_audit": _one_run_audit(coord, run),
        "groups": group_section(coord, run),
        "models": linked,
        # An image or signal run's input, from its verified model and schema (else None).
        "arrays": _array_input(evidence, run, schema),
        "drift": _drift(sites, devices, run, versions),
        "steps": steps,
        "declared": _declared(coord),
        "baseline": dict(baseline.payload) | {"seq": baseline.seq} if baseline else None,
        # Per site: this run's epsilon after each round, beside the most spent in total.
        "epsilon_by_round": {p["site"]: p["by_round"] for p in privacy if p["by_round"]},
        "runs": runs_of(coord, devices),
        # Where each node's keys live, and which sites and devices attested (section 2).
        "keys": keys_and_attestation(evidence, run),
    }
