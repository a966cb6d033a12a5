"""Which federated run a report covers, and how that run ended, from the coordinator's ledger.

A report is about one run (``insitu report --run RUN``; by default the latest run that
completed). A run is named by its ``federation.started`` entry and ends in one of four
states, read from the entries that carry its ``run``:

* **completed**: a ``federation.completed`` entry (newer than any ``federation.failed``:
  a failed run resumed from its checkpoint and completed is completed);
* **refused on budget**: a ``federation.failed`` entry whose every lost site was lost to
  its privacy budget (the sites recorded ``privacy.budget_refused``); or no entry at the
  coordinator at all, only the sites' ``privacy.budget_refused`` naming the run (refused
  before it started: the schema inferred from their records had no budget left);
* **failed**: a ``federation.failed`` entry with any other reason;
* **not ended**: neither (the coordinator stopped, or the run is still going).

Only a completed run has a model; the report of any other run says how it ended and
headlines no accuracy or epsilon of a model that does not exist.
"""

from __future__ import annotations

from typing import Any

from insitu.audit import Entry
from insitu.errors import UsageError
from insitu.report._evidence import Evidence, LedgerEvidence

__all__ = ["RunState", "choose_run", "run_state", "runs_of"]

#: How many runs an error line names (the newest), before "and N earlier".
_NAMED = 8
#: The uses of a federated run a site charges (a fine-tune or a drift profile is none).
_RUN_USES = frozenset({"schema-inference", "dp-sgd", "dp-fedavg", "evaluation"})

RunState = dict[str, Any]


def _last_of(coord: LedgerEvidence, event_type: str, run: str) -> Entry | None:
    entries = [e for e in coord.of_type(event_type) if e.payload.get("run") == run]
    return entries[-1] if entries else None


def _refused_before_start(others: list[LedgerEvidence], run: str) -> RunState:
    refusals = {
        le.name: e for le in others for e in le.of_type("privacy.budget_refused")
        if e.payload.get("run") == run and e.payload.get("mechanism") in _RUN_USES
    }  # fmt: skip
    uses = sorted({str(e.payload.get("mechanism")) for e in refusals.values()})
    return {
        "state": "refused on budget",
        "completed": False,
        "text": f"refused on budget before it started: {', '.join(sorted(refusals))} had no "
        f"privacy budget left for its {', '.join(uses)}; no model is the result of this run",
        "sources": [f"{name} #{e.seq} privacy.budget_refused" for name, e in refusals.items()],
    }


def run_state(
    coord: LedgerEvidence, run: str, others: list[LedgerEvidence] | None = None
) -> RunState:
    """How ``run`` ended: ``state``, ``completed``, one line of ``text``, ``sources``.

    ``others``: the sites' ledgers, read for a run the coordinator never started.
    """
    completed = _last_of(coord, "federation.completed", run)
    failed = _last_of(coord, "federation.failed", run)
    started = _last_of(coord, "federation.started", run)
    if started is None and completed is None and failed is None:
        return _refused_before_start(others or [], run)
    planned = (started.payload.get("rounds") if started else None) or "?"
    if completed is not None and (failed is None or completed.seq > failed.seq):
        return {
            "state": "completed",
            "completed": True,
            "text": f"completed ({completed.payload.get('rounds')} rounds)",
            "sources": [f"{coord.name} #{completed.seq} federation.completed"],
        }
    if failed is None:
        return {
            "state": "not ended",
            "completed": False,
            "text": "started, but the ledger records no end (the coordinator stopped, or the "
            "run is still going): no model is the result of this run",
            "sources": [f"{coord.name} #{started.seq} federation.started"] if started else [],
        }
    sites: dict[str, Any] = failed.payload.get("sites") or {}
    where = f"round {failed.payload.get('round')} of {planned}"
    source = [f"{coord.name} #{failed.seq} federation.failed"]
    if sites and all(reason == "budget" for reason in sites.values()):
        return {
            "state": "refused on budget",
            "completed": False,
            "text": f"refused on budget in {where}: {', '.join(sorted(sites))} had no privacy "
            "budget left for it (privacy.budget_refused in their ledgers); no model is the "
            "result of this run",
            "sources": source,
        }
    lost = ", ".join(f"{site} ({reason})" for site, reason in sorted(sites.items()))
    return {
        "state": "failed",
        "completed": False,
        "text": f"failed in {where}{': lost ' + lost if lost else ''}; no model is the result "
        "of this run",
        "sources": source,
    }


def runs_of(
    coord: LedgerEvidence, others: list[LedgerEvidence] | None = None
) -> list[dict[str, Any]]:
    """Every run the coordinator started, and runs its sites refused before it could, by time.

    ``others``: the sites' ledgers (a run refused before it started is only there).
    """
    seen: dict[str, Entry] = {}
    for entry in coord.of_type("federation.started"):
        seen.setdefault(str(entry.payload.get("run")), entry)
    refused: dict[str, Entry] = {}
    for le in others or []:
        for entry in le.of_type("privacy.budget_refused"):
            run = str(entry.payload.get("run"))
            if run not in seen and entry.payload.get("mechanism") in _RUN_USES:
                refused.setdefault(run, entry)
    runs = []
    for run, entry in [*seen.items(), *refused.items()]:
        completed = _last_of(coord, "federation.completed", run)
        runs.append(
            {
                "run": run,
                "time": entry.time,
                "state": run_state(coord, run, others)["state"],
                "central_accuracy": completed.payload.get("central_accuracy")
                if completed
                else None,
                "rounds": entry.payload.get("rounds") if run in seen else None,
            }
        )
    return sorted(runs, key=lambda r: str(r["time"]))


def _named(runs: list[dict[str, Any]]) -> str:
    shown = [f"{r['run']} ({r['state']})" for r in runs[-_NAMED:]]
    earlier = len(runs) - len(shown)
    return ", ".join(shown) + (f" and {earlier} earlier" if earlier else "")


def choose_run(evidence: Evidence, run: str | None) -> tuple[LedgerEvidence, str]:
    """The coordinator and the run a report covers: ``run``, or the latest completed one.

    Raises:
        UsageError: no coordinator among the workspaces, ``run`` is not one of theirs
            (the line names the runs there are), or none completed and no run was named.

    """
    coords = evidence.coordinators
    if not coords:
        raise UsageError(
            "none of these workspaces ran a federation: give the coordinator's workspace "
            "(or the quickstart's --out directory)"
        )
    others = [le for le in evidence.ledgers if le.role != "coordinator"]
    runs = [r for c in coords for r in runs_of(c, others)]
    if run is not None:
        for coord in coords:
            if any(r["run"] == run for r in runs_of(coord, others)):
                return coord, run
        raise UsageError(
            f"--run {run}: no such run in the ledger of {', '.join(c.name for c in coords)}; "
            f"its runs: {_named(runs) or 'none'}"
        )
    for coord in coords:
        completed = coord.of_type("federation.completed")
        if completed:
            return coord, str(completed[-1].payload["run"])
    raise UsageError(
        "none of these workspaces completed a federated run (its runs: "
        f"{_named(runs) or 'none'}): give one to --run to report on it, or the "
        "coordinator's workspace (or the quickstart's --out directory)"
    )
