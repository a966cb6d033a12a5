"""The report's refusals without a federated run: evidence that does not verify, a PDF
printer that fails. The coordinator's ledger is written here through the vocabulary
(as the quickstart's would be), so no simulation runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from insitu.audit import events
from insitu.cli import run
from insitu.errors import ReportError, UnverifiedEvidenceError
from insitu.report import render_pdf, write_report
from insitu.workspace import Workspace

RUN = "20240501T120000Z-abc123"


def _coordinator_after_a_run(home: Path) -> Path:
    """A coordinator whose ledger records a completed run and the model it wrote."""
    ws, _ = Workspace.init(home, name="coordinator")
    model = ws.home / "models" / RUN / "model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"the federated model's ONNX bytes")
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    with ws.ledger() as ledger:
        events.FEDERATION_STARTED.record(
            ledger, run=RUN, dataset="adult", schema_sha256="0" * 64, site_names=[]
        )
        events.FEDERATION_COMPLETED.record(
            ledger,
            run=RUN,
            rounds=2,
            central_accuracy=0.81,
            model_sha256=digest,
            onnx_sha256=digest,
            epsilon_run=3.0,
            delta=1e-5,
            round_entries=[],
        )
    return model


def test_a_model_replaced_after_the_run_refuses_the_report(tmp_path):
    model = _coordinator_after_a_run(tmp_path / "coordinator")
    model.write_bytes(b"another model, swapped in after training")
    out = tmp_path / "report.html"
    with pytest.raises(
        UnverifiedEvidenceError, match=r"does not verify .*model\.onnx.* no report written"
    ):
        write_report([tmp_path / "coordinator"], out)
    assert not out.exists()


def test_the_cli_refuses_the_report_in_one_line(tmp_path, capsys):
    model = _coordinator_after_a_run(tmp_path / "coordinator")
    model.unlink()
    out = tmp_path / "report.html"
    code = run(["report", str(tmp_path / "coordinator"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == UnverifiedEvidenceError.exit_code == 1
    (line,) = err.strip().splitlines()
    assert "the evidence does not verify" in line
    assert not out.exists()


def test_a_chromium_that_cannot_start_is_named(tmp_path):
    out = tmp_path / "report.pdf"
    with pytest.raises(ReportError, match=r"Chromium could not print the report .* --format html"):
        render_pdf("<p>report</p>", out, chromium=tmp_path / "no-such-chromium")
    assert not out.exists()


def test_a_chromium_that_prints_nothing_is_named(tmp_path):
    # A broken install: the launcher runs, fails, and writes no PDF.
    broken = tmp_path / "chromium"
    broken.write_text("#!/bin/sh\necho 'cannot open display' >&2\nexit 1\n")
    broken.chmod(0o755)
    out = tmp_path / "report.pdf"
    with pytest.raises(ReportError, match=r"did not write the PDF \(exit 1: cannot open display\)"):
        render_pdf("<p>report</p>", out, chromium=broken)
    assert not out.exists()
