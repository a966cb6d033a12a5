"""The identifier detector on the real Adult data (../shared/data/adult.csv)."""

from __future__ import annotations

from pathlib import Path

import pytest

from insitu.data import DataSchema, inspect_table, read_table, scan_frame
from insitu.datasets import builtin_schema

ADULT = Path(__file__).resolve().parents[3] / "shared" / "data" / "adult.csv"


@pytest.fixture(scope="module")
def adult():
    if not ADULT.exists():  # pragma: no cover - CI and developers have ../shared
        pytest.skip("../shared/data/adult.csv is not beside the checkout")
    return read_table(ADULT)


def test_ordinary_adult_columns_are_not_flagged(adult):
    findings = scan_frame(adult)
    assert {c: f.kinds for c, f in findings.items() if f.suspicious} == {}


def test_planted_identifiers_are_found_in_an_adult_column(adult):
    planted = adult.copy()
    plants = {
        100: "maria.lopez@example.com",
        2000: "4539 1488 0343 6467",  # a Luhn-valid test card number
        5000: "+1 (415) 555-0198",
        9000: "j.smith@uni-example.edu",
        12000: "5555-5555-5555-4444",
        20000: "+44 20 7946 0958",
    }
    for row, value in plants.items():
        planted.loc[row, "occupation"] = value
    finding = scan_frame(planted)["occupation"]
    assert finding.kinds == {"email address": 2, "card number": 2, "phone number": 2}
    others = {c: f.kinds for c, f in scan_frame(planted).items() if f.suspicious}
    assert set(others) == {"occupation"}


def test_inspect_warns_when_an_identifier_like_column_is_a_feature(adult):
    planted = adult.copy()
    planted.insert(0, "record_id", [f"adult-{i:05d}" for i in range(1, len(adult) + 1)])
    planted.loc[42, "occupation"] = "someone@example.org"
    report = inspect_table(planted, DataSchema.load(builtin_schema("adult")), source="adult.csv")
    assert len(report.warnings) == 1
    assert "'occupation' is declared a feature but holds 1 email address" in report.warnings[0]
    # The declared identifier is unique per row, but it is treated, so no warning.
    assert "record_id" in report.findings
