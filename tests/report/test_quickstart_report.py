"""The main job end to end (a small quickstart), and its report checked against the ledgers."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

from insitu.report import build_report, collect_evidence, render_html
from insitu.workspace import Workspace

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _sites(out: Path) -> list[Workspace]:
    return [Workspace.open(p) for p in sorted((out / "coordinator" / "sites").iterdir())]


def test_every_step_ran_or_says_it_did_not(quickstart):
    _, summary = quickstart
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == [
        "workspaces",
        "federated training",
        "baseline",
        "privacy audit",
        "optimize",
        "supply chain",
        "serve",
        "ledgers",
        "report",
    ]
    assert {s["status"] for s in steps.values()} == {"ok"}
    # Optimized (auto) and measured; the shipped model is the chosen candidate.
    optimized = steps["optimize"]["figures"]
    assert optimized["chosen"] in {c["name"] for c in optimized["candidates"]}
    assert summary["model_bytes_after"] == optimized["model_bytes_after"]
    # Every site served it on loopback: one-row predictions and an explanation each.
    served = steps["serve"]["figures"]
    assert served["requests"] == 3 * 40
    assert served["explanations"] == 3
    assert served["predictions_correct"] / served["requests"] > 0.6
    assert summary["p50_ms"] == served["p50_ms"] > 0
    assert summary["ledgers_verified"] == [4, 4]
    assert all(0 < eps <= 3.0 for eps in summary["epsilon_by_site"].values())
    assert len(summary["epsilon_by_site"]) == 3
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert (Path(summary["model_dir"]) / "model.onnx").exists()
    # Bundled, published, and every site updated, verified and ran it locally.
    assert summary["bundle"]["version"] == "1.0.0"
    assert summary["bundle"]["methods"] == ["full"] * 3
    assert summary["bundle"]["local_accuracy"] > 0.6
    assert 0.6 < summary["baseline_accuracy"] <= 1
    assert 0.3 < summary["attack_auc"] < 0.7
    assert Path(summary["report"]).is_file()


def test_no_raw_data_crossed_a_site_boundary(quickstart):
    out, summary = quickstart
    for site in _sites(out):
        with site.ledger() as ledger:
            egress = [
                e.payload
                for e in ledger.entries(event_type="federation.egress")
                if e.payload["run"] == summary["run"]
            ]
        # SecAgg+ (4 stages) every round, and the evaluation at the final round only.
        assert len(egress) == 4 * 2 + 1
        assert all(p["unclassified_bytes"] == 0 for p in egress)
        updates = [p for p in egress if p["model_update_bytes"] > 0]
        assert [p["stage"] for p in updates] == ["collect_masked_vectors"] * 2
        for p in egress:
            parts = sum(
                p[f"{k}_bytes"] for k in ("model_update", "protocol", "metrics", "envelope")
            )
            assert parts == p["bytes_out"]


def test_the_report_holds_the_figures_the_ledgers_hold(quickstart):
    out, summary = quickstart
    report = build_report([out])
    assert report.evidence.verified
    page = html.unescape(Path(summary["report"]).read_text())
    coordinator = Workspace.open(out / "coordinator")
    with coordinator.ledger() as ledger:
        audit = ledger.entries(event_type="privacy.audit")[-1].payload
        baseline = ledger.entries(event_type="federation.baseline")[-1].payload
    attack = audit["attacks"][0]
    assert report.summary["attack_auc"] == attack["auc"]
    assert f"{attack['auc']:.3f} ({attack['auc_ci'][0]:.3f}-{attack['auc_ci'][1]:.3f})" in page
    assert report.summary["baseline_accuracy"] == baseline["baseline_accuracy"]
    assert f"{100 * baseline['baseline_accuracy']:.2f}%" in page
    assert f"{100 * baseline['private_accuracy']:.2f}%" in page
    for site, flow in zip(_sites(out), report.sections["flows"], strict=True):
        with site.ledger() as ledger:
            spent = max(
                e.payload["epsilon_max_after"] for e in ledger.entries(event_type="privacy.spent")
            )
            sent = sum(
                e.payload["bytes_out"] for e in ledger.entries(event_type="federation.egress")
            )
        assert f"{spent:,.3f}" in page
        assert flow["site"] == site.name
        assert flow["bytes_out"] == sent
        assert flow["raw_record_bytes"] == 0
    assert "none (0 bytes)" in page
    assert "Evidence verified" in page
    assert "UNVERIFIED" not in page
    # Self-contained: nothing to load (namespaces of inline SVG are names, not requests).
    assert re.search(r"(src|href)=\"(https?:)?//|url\((?!#)|@import", page) is None
    assert "<metadata>" not in page
    assert page.count("<svg") >= 4


def test_the_report_regenerates_identically_from_the_same_evidence(quickstart):
    out, _ = quickstart
    first, second = build_report([out]), build_report([out])
    assert first.to_json() == second.to_json()
    assert (
        render_html(first).split("generated")[1][30:]
        == render_html(second).split("generated")[1][30:]
    )


def test_report_pdf_with_local_chromium(quickstart, tmp_path):
    import shutil

    from insitu.cli import run

    if shutil.which("chromium") is None and not Path("/usr/bin/chromium").exists():
        pytest.skip("no local chromium")
    out, _ = quickstart
    pdf = tmp_path / "report.pdf"
    assert run(["report", str(out), "--format", "pdf", "--out", str(pdf)]) == 0
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert collect_evidence([out]).verified
