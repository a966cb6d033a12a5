"""The report's "Performance per group of persons", read from ``evaluation.groups`` only."""

from __future__ import annotations

import html
import math
import re

import pytest

from insitu.audit import events
from insitu.report import LedgerEvidence, build_report, render_html
from insitu.report._groups import annex_text, group_section


def _evidence(workspace, **payload) -> LedgerEvidence:
    fields = {
        "run": "r1",
        "round": 2,
        "privacy": "record",
        "attributes": ["sex"],
        "sites": ["site-01", "site-02"],
        "sites_missing": [],
        "noise_std": 0.0,
        "epsilon": 0.5,
        "delta": 1e-5,
        "min_size": 100,
        "max_gap": 0.05,
        "groups": {
            "sex": {
                "Female": {"tp": 20.0, "fp": 10.0, "tn": 870.0, "fn": 100.0},  # 0.89
                "Male": {"tp": 300.0, "fp": 100.0, "tn": 1300.0, "fn": 300.0},  # 0.80
                "(other)": {"tp": 1.0, "fp": 0.0, "tn": 2.0, "fn": 0.5},
            }
        },
    }
    with workspace.ledger() as ledger:
        events.EVALUATION_GROUPS.record(ledger, **(fields | payload))
        entries = ledger.entries()
    return LedgerEvidence(workspace.home, "coordinator", "n", "coordinator", entries, True)


def _wilson(successes: float, n: float, z: float = 1.959963984540054) -> tuple[float, float]:
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return center - half, center + half


def test_without_noise_the_interval_is_wilsons_and_the_gap_is_flagged(workspace):
    section = group_section(_evidence(workspace), "r1")
    (sex,) = section["attributes"]
    rows = {r["value"]: r for r in sex["rows"]}
    assert list(rows) == ["Female", "Male"]  # values outside the vocabulary: too few, hidden
    female = rows["Female"]
    assert female["count"] == 1000
    assert female["accuracy"]["value"] == pytest.approx(0.89)
    assert (female["accuracy"]["low"], female["accuracy"]["high"]) == pytest.approx(
        _wilson(890, 1000)
    )
    assert female["fnr"]["value"] == pytest.approx(100 / 120)
    assert female["fpr"]["value"] == pytest.approx(10 / 880)
    gap = sex["gap"]
    assert gap["value"] == pytest.approx(0.09)
    assert gap["flagged"]
    assert gap["decisive"]
    assert gap["between"] == ["Female", "Male"]
    assert "FLAGGED: beyond the threshold of 5.0" in annex_text(section)


def test_noise_widens_the_interval_and_small_groups_are_suppressed(workspace):
    exact = group_section(_evidence(workspace), "r1")
    noisy = group_section(_evidence(workspace, run="r2", noise_std=20.0), "r2")
    female_noisy = noisy["attributes"][0]["rows"][0]["accuracy"]
    female_exact = exact["attributes"][0]["rows"][0]["accuracy"]
    assert female_noisy["low"] < female_exact["low"] < female_exact["high"] < female_noisy["high"]
    # A group below min_size: reported as suppressed, never as figures.
    small = {"Female": {"tp": 1.0, "fp": 2.0, "tn": 50.0, "fn": 3.0}}
    section = group_section(
        _evidence(workspace, run="r3", groups={"sex": small}, max_gap=0.5), "r3"
    )
    (row,) = section["attributes"][0]["rows"]
    assert row["suppressed"]
    assert row["accuracy"] is None
    assert row["accuracy_text"] == "suppressed"
    assert section["attributes"][0]["gap"] is None
    assert "1 group(s) suppressed (fewer than 100 subjects)" in annex_text(section)


def test_no_declared_attribute_or_no_site_evaluation_says_not_measured(workspace):
    assert "is not measured (the data schema declares no sensitive" in annex_text(None)
    site = group_section(_evidence(workspace, run="r4", privacy="site", sites=[], groups={}), "r4")
    assert not site["measured"]
    assert "site-level privacy releases no site evaluation" in annex_text(site)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_quickstart_report_shows_performance_per_group_of_persons(quickstart):
    out, _ = quickstart
    report = build_report([out])
    section = report.sections["groups"]
    assert section["measured"]
    assert [a["name"] for a in section["attributes"]] == ["sex", "race"]
    text = html.unescape(re.sub(r"<[^>]+>", " ", render_html(report)))
    assert "Performance per group of persons (AI Act Annex IV 3, Art. 10)" in text
    assert re.search(r"Female\s+(suppressed|[\d,]+\s+\d+\.\d% \(\d+\.\d-\d+\.\d\))", text)
    item = re.search(r"3 capabilities and limitations in performance\s+(.*?)\s+section 6", text)
    assert item is not None
    assert "accuracy per group of persons (95% intervals, DP noise included): sex:" in item[1]
    assert "not measured" not in item[1]


def test_figures_of_another_round_than_the_kept_model_say_so(workspace):
    with workspace.ledger() as ledger:
        events.FEDERATION_COMPLETED.record(
            ledger,
            run="r1",
            rounds=2,
            central_accuracy=0.8,
            model_sha256="a" * 64,
            onnx_sha256="b" * 64,
            epsilon_run=1.0,
            delta=1e-5,
            round_entries=[],
            kept_round=1,
            kept_because="round 1 beat round 2 by more than two standard errors",
        )
    section = group_section(_evidence(workspace), "r1")
    assert section["kept_round"] == 1
    assert group_section(_evidence(workspace, run="r2"), "r2")["kept_round"] is None
