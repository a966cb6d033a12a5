"""Tampering with any ledger or artefact after the run: the report refuses, audit verify fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from insitu.cli import run
from tests.audit._tamper import raw

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _edit_payload(ledger: Path, event_type: str, key: str, value: object) -> None:
    conn = raw(ledger)
    seq, payload = conn.execute(
        "SELECT seq, payload FROM entries WHERE type = ? ORDER BY seq DESC LIMIT 1", (event_type,)
    ).fetchone()
    body = json.loads(payload)
    body[key] = value
    conn.execute(
        "UPDATE entries SET payload = ? WHERE seq = ?",
        (json.dumps(body, separators=(",", ":"), sort_keys=True), seq),
    )
    conn.close()


@pytest.mark.parametrize(
    ("workspace", "event_type", "key", "value"),
    [
        # A site lowers the epsilon it spent; the coordinator polishes the attack's result.
        ("coordinator/sites/site-02", "privacy.spent", "epsilon_max_after", 0.5),
        ("coordinator", "federation.baseline", "private_accuracy", 0.99),
    ],
)
def test_edited_ledger_refuses_the_report_and_fails_audit_verify(
    tampered_copy, tmp_path, capsys, workspace, event_type, key, value
):
    _edit_payload(tampered_copy / workspace / "ledger.db", event_type, key, value)
    out = tmp_path / "report.html"
    assert run(["report", str(tampered_copy), "--out", str(out)]) == 1
    assert not out.exists()
    assert "does not verify" in capsys.readouterr().err
    assert run(["audit", "verify", "--home", str(tampered_copy / workspace)]) == 1

    # On request it is written, marked unverified in red, and still exits 1.
    assert run(["report", str(tampered_copy), "--out", str(out), "--allow-unverified"]) == 1
    page = out.read_text()
    assert 'class="banner bad">UNVERIFIED' in page
    assert "FAILED:" in page
    assert "Evidence verified" not in page


def test_replaced_artefact_refuses_the_report(tampered_copy, tmp_path, capsys):
    roc = next((tampered_copy / "coordinator" / "reports").glob("privacy-audit-*/roc.json"))
    curve = json.loads(roc.read_text())
    curve["tpr"] = [0.0 for _ in curve["tpr"]]  # an attack that never succeeds
    roc.write_text(json.dumps(curve))
    out = tmp_path / "report.html"
    assert run(["report", str(tampered_copy), "--out", str(out)]) == 1
    assert "roc.json" in capsys.readouterr().err
    assert not out.exists()
    assert run(["report", str(tampered_copy), "--out", str(out), "--allow-unverified"]) == 1
    assert "DIFFERS" in out.read_text()


def test_report_of_a_directory_without_workspaces_is_refused(tmp_path, capsys):
    assert run(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "holds no insitu workspace" in capsys.readouterr().err
