"""A report covers one run: the quickstart's, a later one, and one refused on budget.

The coordinator of a (copied) small quickstart runs two more federations on the same
sites: one that completes (later, without a bundle), and one whose every site refuses
round 1 on budget. Then ``insitu optimize``, ``insitu privacy audit`` and ``insitu
finetune`` run on their own, as a user would, outside the quickstart. Each report must
be about its run: its figures, its records, its bundles, nothing of the others'.
"""

from __future__ import annotations

import gc
import html
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from insitu.cli import run
from insitu.data import DataSchema, SiteDataset, read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.errors import RoundFailedError
from insitu.federated import FederationConfig, simulate
from insitu.finetune import finetune
from insitu.report import build_report, render_html
from insitu.workspace import Workspace

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@dataclass
class Runs:
    out: Path
    coordinator: Path
    quickstart: dict[str, Any]  # the quickstart's summary: its run's figures
    later: str
    refused: str
    later_accuracy: float | None
    audit: dict[str, Any]  # insitu privacy audit --json, of the later run
    optimized: dict[str, Any]  # insitu optimize --json, of the later run
    finetune: dict[str, Any]  # insitu finetune at site-01, of the quickstart's bundle


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _schema() -> DataSchema:
    doc = DataSchema.load(builtin_schema("adult")).source
    doc["consent"] = {"required": False, "legal_basis": "GDPR art. 6(1)(e), test"}
    return DataSchema.from_dict(doc)


@pytest.fixture(scope="module")
def runs(quickstart, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    source, summary = quickstart
    tmp = tmp_path_factory.mktemp("runs")
    out = tmp / "demo"
    shutil.copytree(source, out)
    home = out / "coordinator"
    coordinator = Workspace.open(home)
    frame = read_table(builtin_data("adult"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        warnings.simplefilter("ignore", pytest.PytestUnraisableExceptionWarning)
        config = FederationConfig(sites=3, rounds=1, epsilon=1.0, batch_size=64)
        later = simulate(coordinator, frame.iloc[:3000], config, schema=_schema())
        # site-01 fine-tunes the quickstart's bundle on its own (consented) records.
        local = tmp / "local.csv"
        frame.sample(n=3000, random_state=0).to_csv(local, index=False)  # the quickstart's
        tuned = finetune(
            Workspace.open(home / "sites" / "site-01"),
            summary["bundle"]["name"],
            local,
            schema_path=builtin_schema("adult"),
        )
        for site in sorted((home / "sites").iterdir()):
            Workspace.open(site).with_config("privacy", epsilon_budget=0.5)  # spent more
        with pytest.raises(RoundFailedError, match="budget"):
            simulate(coordinator, frame.iloc[:3000], config, schema=_schema())
        gc.collect()
    with coordinator.ledger() as ledger:
        (failed,) = ledger.entries(event_type="federation.failed")
    public = frame.iloc[20000:22000]
    public.iloc[:1000].to_csv(tmp / "calibration.csv", index=False)
    public.iloc[1000:].to_csv(tmp / "non-members.csv", index=False)
    frame.iloc[:1000].to_csv(tmp / "members.csv", index=False)
    return Runs(
        out=out,
        coordinator=home,
        quickstart=summary,
        later=later.run_id,
        refused=str(failed.payload["run"]),
        later_accuracy=later.central_accuracy,
        audit={},
        optimized={},
        finetune=tuned.to_json(),
    )


def _standalone(runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    """``insitu privacy audit`` and ``insitu optimize`` of the later run, by hand."""
    if runs.audit:
        return
    tmp, home = runs.out.parent, str(runs.coordinator)
    model = str(runs.coordinator / "models" / runs.later)
    code, out, err = _cli(
        capsys, "privacy", "audit", model, "--members", str(tmp / "members.csv"),
        "--non-members", str(tmp / "non-members.csv"), "--fpr", "0.01", "--home", home, "--json",
    )  # fmt: skip
    assert code == 0, err
    runs.audit = json.loads(out)
    code, out, err = _cli(
        capsys, "optimize", model, "--calibration", str(tmp / "calibration.csv"),
        "--eval", str(tmp / "non-members.csv"), "-o", str(tmp / "optimized"), "--home", home,
        "--json",
    )  # fmt: skip
    assert code == 0, err
    runs.optimized = json.loads(out)


def test_a_run_refused_on_budget_says_so_and_headlines_nothing(runs, capsys, tmp_path):
    page_path = tmp_path / "refused.html"
    code, out, err = _cli(
        capsys, "report", str(runs.out), "--run", runs.refused, "--out", str(page_path), "--json"
    )
    assert code == 0, err
    shown = json.loads(out)
    assert shown["run"] == runs.refused
    assert shown["status"] == "refused on budget"
    summary = shown["summary"]
    for key in ("private_accuracy", "baseline_accuracy", "epsilon_max", "attack_auc"):
        assert summary[key] is None, key
    assert summary["epsilon_by_site"] == {}
    page = html.unescape(page_path.read_text())
    assert "refused on budget in round 1 of 1" in page
    assert "headlines no" in page
    assert "accuracy, federated with DP" not in page  # no headline card
    assert "No bundle was built from this run's model." in page
    report = build_report([runs.out], run=runs.refused)
    assert all(p["refusals"] >= 1 for p in report.sections["privacy"])


def test_an_earlier_runs_report_shows_that_runs_figures_after_later_runs(runs):
    q = runs.quickstart
    earlier = build_report([runs.out], run=q["run"])
    s = earlier.sections
    assert s["status"]["state"] == "completed"
    assert earlier.summary["private_accuracy"] == q["private_accuracy"]
    assert earlier.summary["epsilon_by_site"] == pytest.approx(q["epsilon_by_site"], abs=1e-6)
    assert earlier.summary["attack_auc"] == pytest.approx(q["attack_auc"], abs=1e-4)
    # "Most spent so far" ends with the run: the later runs' spending is not counted.
    assert {p["site"]: p["epsilon_total"] for p in s["privacy"]} == pytest.approx(
        q["epsilon_spent_max_by_site"]
    )
    assert [v["version"] for v in s["models"]["versions"]] == [q["bundle"]["version"]]
    # The default is the latest completed run: the later one, which has no bundle.
    latest = build_report([runs.out])
    assert latest.sections["run"] == runs.later
    assert latest.summary["private_accuracy"] == pytest.approx(runs.later_accuracy, abs=1e-4)
    assert latest.sections["models"]["versions"] == []
    later_total = {p["site"]: p["epsilon_total"] for p in latest.sections["privacy"]}
    assert all(later_total[site] >= spent for site, spent in q["epsilon_spent_max_by_site"].items())


def test_records_held_are_the_rows_of_the_releases_the_run_used(runs):
    report = build_report([runs.out], run=runs.later)
    schema = _schema()
    for flow in report.sections["flows"]:
        ws = Workspace.open(runs.coordinator / "sites" / flow["site"])
        # The sealed releases on disk are the refused run's: the same split of the same
        # rows as the later run's (each run prepares the site's records again).
        held = sum(
            SiteDataset.open(ws, ws.prepared_part(schema.name, part)).prepared.report.rows_out
            for part in ("train", "test")
        )
        with ws.ledger() as ledger:
            every = sum(e.payload["rows_out"] for e in ledger.entries(event_type="data.prepared"))
        assert flow["records_held"] == held
        assert every > held  # three runs prepared here: the old sum overstated it
    # The quickstart's run used the first two releases each site prepared.
    earlier = build_report([runs.out], run=runs.quickstart["run"])
    for flow in earlier.sections["flows"]:
        ws = Workspace.open(runs.coordinator / "sites" / flow["site"])
        with ws.ledger() as ledger:
            first = ledger.entries(event_type="data.prepared")[:2]
        assert flow["records_held"] == sum(e.payload["rows_out"] for e in first)


def test_an_unknown_run_is_one_line_naming_the_runs(runs, capsys, tmp_path):
    page = tmp_path / "nothing.html"
    code, _, err = _cli(capsys, "report", str(runs.out), "--run", "no-such-run", "-o", str(page))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert "--run no-such-run: no such run" in lines[0]
    for name, state in (
        (runs.quickstart["run"], "completed"),
        (runs.later, "completed"),
        (runs.refused, "refused on budget"),
    ):
        assert f"{name} ({state})" in lines[0]
    assert not page.exists()


def test_standalone_audit_and_optimize_reach_the_report_of_their_run(runs, capsys):
    _standalone(runs, capsys)
    report = build_report([runs.out], run=runs.later)
    assert report.summary["attack_auc"] == runs.audit["attacks"][0]["auc"]
    chosen = runs.optimized["chosen"]
    (candidate,) = [c for c in runs.optimized["candidates"] if c["name"] == chosen]
    model = runs.coordinator / "models" / runs.later / "model.onnx"
    assert report.summary["model_bytes_before"] == len(model.read_bytes())
    assert report.summary["model_bytes_after"] == candidate["size_bytes"]
    page = html.unescape(render_html(report))
    assert f"{runs.audit['attacks'][0]['auc']:.3f} (" in page
    assert f"{len(model.read_bytes()):,} / {candidate['size_bytes']:,} bytes" in page
    # Nothing of it is the quickstart run's, which keeps its own optimization and audit.
    earlier = build_report([runs.out], run=runs.quickstart["run"])
    assert earlier.summary["attack_auc"] == pytest.approx(runs.quickstart["attack_auc"], abs=1e-4)
    assert earlier.summary["model_bytes_after"] == runs.quickstart["model_bytes_after"]


def test_the_declared_processing_reaches_the_report(tampered_copy, capsys, tmp_path):
    home = str(tampered_copy / "coordinator")
    argv = ["report", "declare", "--controller", "Ward 7 Hospital", "--transfers", ""]
    code, out, err = _cli(capsys, *argv, "--home", home)
    assert code == 0, err
    assert "declared: processing.declared #" in out
    code, out, _ = _cli(capsys, *argv, "--home", home)
    assert "unchanged" in out
    with Workspace.open(tampered_copy / "coordinator").ledger() as ledger:
        declared = ledger.entries(event_type="processing.declared")
    assert len(declared) == 2  # the quickstart's, and this one once
    page = html.unescape(render_html(build_report([tampered_copy])))
    assert '<td class="declared">Ward 7 Hospital</td>' in page
    # The quickstart's other items stand; the one withdrawn reads "not declared".
    assert declared[0].payload["retention"] in page
    art30 = page[page.index('id="art30"') : page.index('id="flow"')]
    assert 'transfers to third countries</th><td class="declared">not declared' in art30


def test_a_standalone_finetune_reaches_the_report_of_the_run_it_came_from(runs):
    tuned = runs.finetune
    report = build_report([runs.out], run=runs.quickstart["run"])
    (row,) = report.sections["models"]["finetunes"]
    assert row["site"] == "site-01"
    assert (row["model"], row["base_version"]) == (tuned["model"], tuned["base_version"])
    assert row["installed"] is tuned["installed"]
    assert row["accuracy_finetuned"] == pytest.approx(tuned["accuracy_finetuned"])
    assert row["epsilon"] == tuned["epsilon"]
    page = html.unescape(render_html(report))
    assert f"{100 * tuned['accuracy_finetuned']:.2f}%" in page
    later = build_report([runs.out], run=runs.later)
    assert later.sections["models"]["finetunes"] == []
