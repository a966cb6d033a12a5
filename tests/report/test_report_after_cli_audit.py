"""An audit made with ``insitu privacy audit`` (not the quickstart) reaches the report.

It used to be written by the command line without its run, and the report filters the
audit by run: an audit made by hand never appeared. The domain now records it, linked to
the run that trained the audited model.
"""

from __future__ import annotations

import json

import pytest

from insitu.cli import run
from insitu.data import read_table
from insitu.datasets import builtin_data
from insitu.workspace import Workspace

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def test_a_report_after_insitu_privacy_audit_shows_that_audit(tmp_path, capsys):
    home = tmp_path / "coordinator"
    frame = read_table(builtin_data("adult")).iloc[:6000].drop(columns=["record_id"])
    data = tmp_path / "adult.csv"
    frame.to_csv(data, index=False)
    frame.iloc[:1500].to_csv(tmp_path / "members.csv", index=False)
    frame.iloc[4500:].to_csv(tmp_path / "non-members.csv", index=False)
    assert run(["init", "--home", str(home)]) == 0
    capsys.readouterr()
    code = run(
        ["federate", "simulate", "--data", str(data), "--label", "income", "--sites", "3",
         "--rounds", "1", "--batch-size", "64", "--home", str(home), "--json"]
    )  # fmt: skip
    trained = json.loads(capsys.readouterr().out)
    assert code == 0
    code = run(
        ["privacy", "audit", trained["model_dir"], "--members", str(tmp_path / "members.csv"),
         "--non-members", str(tmp_path / "non-members.csv"), "--fpr", "0.01", "--home", str(home),
         "--json"]
    )  # fmt: skip
    audit = json.loads(capsys.readouterr().out)
    assert code == 0
    with Workspace.open(home).ledger() as ledger:
        (entry,) = ledger.entries(event_type="privacy.audit")
    assert entry.payload["run"] == trained["run_id"]
    report = tmp_path / "report.html"
    assert run(["report", str(home), "--out", str(report)]) == 0
    page = report.read_text()
    auc = audit["attacks"][0]["auc"]
    assert f"{auc:.3f} (" in page
    assert "No membership-inference audit recorded" not in page
