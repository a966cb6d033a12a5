"""What the dashboard shows, read from the workspace (ledger, slots, drift state, config).

Every figure comes from a record the site keeps anyway: the ledger (privacy spending,
federated rounds, events, verified on every view), the A/B slots (installed versions,
their signatures checked), the drift monitor's saved state, and the live server's own
figures through ``metrics_source``. Nothing here writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from insitu.drift import DriftMonitor, drift_status
from insitu.errors import InsituError
from insitu.workspace import Workspace

__all__ = ["MetricsSource", "site_view"]

logger = logging.getLogger(__name__)

#: Returns the live server's figures: ``request_rate`` (requests/s), ``latency_p50_ms``,
#: ``latency_p95_ms``, ``requests_total``, ``models`` ([{"name", "version"}]); any may
#: be missing.
MetricsSource = Callable[[], Mapping[str, Any]]

RECENT = 15
_LIVE_KEYS = (
    "request_rate",
    "latency_p50_ms",
    "latency_p95_ms",
    "requests_total",
    "models",
    "error",
)


def _models(workspace: Workspace) -> list[dict[str, Any]]:
    from insitu.update import UpdateClient

    if not (workspace.update_dir / "config.json").is_file():
        return []
    try:
        client = UpdateClient(
            workspace.update_dir,
            device_key=workspace.encryption_key(),
            local_publisher=workspace.signing_public_key,
        )
    except InsituError as exc:
        return [
            {
                "role": "",
                "name": "?",
                "version": "?",
                "slot": "",
                "installed": "",
                "local": False,
                "signature": f"{type(exc).__name__}: {exc}",
                "ok": False,
            }
        ]
    rows: list[dict[str, Any]] = []
    for role, info in (("active", client.slots.active()), ("previous", client.slots.previous())):
        if info is None:
            continue
        row = {
            "role": role,
            "name": info.name,
            "version": info.version,
            "slot": info.slot,
            "installed": info.installed,
            "local": info.version.partition("-")[2].startswith("local"),
        }
        try:
            data = client.slots.read(info)
            from insitu.bundle import Bundle

            client.slot_verifier(info).verify(Bundle.parse(data))
            row["signature"] = "verified"
            row["ok"] = True
        except InsituError as exc:
            row["signature"] = f"{type(exc).__name__}: {exc}"
            row["ok"] = False
        rows.append(row)
    return rows


def _budgets(workspace: Workspace, ledger: Any) -> list[dict[str, Any]]:
    """The site's per-subject budget: the most any subject has spent, and refusals."""
    from insitu.privacy import REFUSED, SPENT, SubjectBudget

    if not ledger.entries(event_type=SPENT, limit=1) and not ledger.entries(
        event_type=REFUSED, limit=1
    ):
        return []
    budget = SubjectBudget.for_workspace(workspace, ledger)
    spent = budget.spent()
    return [
        {
            "dataset": f"any of {budget.subjects():,} subjects",
            "spent": spent,
            "budget": budget.epsilon_budget,
            "left": max(0.0, budget.epsilon_budget - spent),
            "delta": budget.delta,
            "refusals": len(ledger.entries(event_type=REFUSED)),
        }
    ]


def _training(ledger: Any) -> dict[str, Any]:
    """The last federated run: accuracy and epsilon per round (coordinator or site view)."""
    rounds = ledger.entries(event_type="federation.round")
    if rounds:
        run = rounds[-1].payload.get("run")
        mine = [e.payload for e in rounds if e.payload.get("run") == run]
        return {
            "run": run,
            "view": "coordinator",
            "rounds": [
                {
                    "round": p["round"],
                    "accuracy": p.get("central_accuracy")
                    if p.get("central_accuracy") is not None
                    else p.get("accuracy"),
                    "epsilon": p.get("epsilon_run_max"),
                }
                for p in mine
            ],
        }
    site_rounds = ledger.entries(event_type="federation.site_round")
    if site_rounds:
        run = site_rounds[-1].payload.get("run")
        mine = [e.payload for e in site_rounds if e.payload.get("run") == run]
        return {
            "run": run,
            "view": "site",
            "rounds": [
                {"round": p["round"], "accuracy": None, "epsilon": p.get("epsilon_run")}
                for p in mine
            ],
        }
    return {"run": None, "view": None, "rounds": []}


def _summary(payload: Mapping[str, Any]) -> str:
    keep = []
    for key, value in payload.items():
        if isinstance(value, list | dict):
            continue
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        keep.append(f"{key}={text[:40]}")
    return ", ".join(keep[:6])


def _ledger_view(
    workspace: Workspace,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The ledger's verification, recent entries, budgets and training rounds.

    A ledger that cannot be opened (deleted, emptied) shows as a failed verification.
    """
    try:
        ledger_context = workspace.ledger()
    except InsituError as exc:
        failed = {
            "ok": False,
            "entries": None,
            "error": f"{type(exc).__name__}: {exc}",
            "seq": getattr(exc, "seq", None),
        }
        return failed, [], [], {"run": None, "view": None, "rounds": []}
    with ledger_context as ledger:
        try:
            report = ledger.verify()
            verification: dict[str, Any] = {
                "ok": True,
                "entries": report.entries,
                "error": None,
                "seq": None,
            }
        except InsituError as exc:
            verification = {
                "ok": False,
                "entries": None,
                "error": f"{type(exc).__name__}: {exc}",
                "seq": getattr(exc, "seq", None),
            }
        recent = [
            {
                "seq": e.seq,
                "time": e.time,
                "type": e.type,
                "summary": _summary(e.payload),
            }
            for e in ledger.entries(newest_first=True, limit=RECENT)
        ]
        budgets = _budgets(workspace, ledger)
        training = _training(ledger)
    return verification, recent, budgets, training


def site_view(
    workspace: Workspace,
    *,
    metrics_source: MetricsSource | None = None,
    drift_monitor: DriftMonitor | None = None,
) -> dict[str, Any]:
    """Everything the page shows, as plain data (also served as JSON)."""
    if drift_monitor is not None:
        drift_monitor.check()  # saves fresh figures for drift_status to read
    verification, recent, budgets, training = _ledger_view(workspace)
    live: Mapping[str, Any] = {}
    if metrics_source is not None:
        try:
            live = dict(metrics_source())
        except Exception as exc:  # noqa: BLE001 -- the page shows the failure, not a 500
            logger.warning("dashboard: metrics source failed: %s", exc)
            live = {"error": str(exc)}
    try:
        drift = drift_status(workspace)
        drift_error = None
    except InsituError as exc:
        drift, drift_error = [], str(exc)
    return {
        "node": {"name": workspace.config.get("node", "name"), "id": workspace.node_id},
        "models": _models(workspace),
        "server": (
            {key: live.get(key) for key in _LIVE_KEYS} | {"connected": True}
            if live
            else dict.fromkeys(_LIVE_KEYS) | {"connected": False}
        ),
        "drift": drift,
        "drift_error": drift_error,
        "budgets": budgets,
        "ledger": {"verification": verification, "recent": recent},
        "training": training,
    }
