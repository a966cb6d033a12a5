"""Consent: opt-in, per purpose, effective at the time a round starts."""

from __future__ import annotations

import time

import numpy as np
import pytest

from insitu._clock import utc_now
from insitu.data import ConsentRegistry, DataSchema, Pseudonymizer, SiteDataset
from insitu.errors import ConsentError


@pytest.fixture
def site(workspace, patients_csv, schema_file):
    ds = SiteDataset.from_file(workspace, patients_csv, DataSchema.load(schema_file))
    ledger = workspace.ledger()
    registry = ConsentRegistry(ledger, Pseudonymizer(workspace.secret("pseudonym")))
    registry.change_many([(f"RAWID-{p:04d}-Q", "training", "granted") for p in range(60)])
    yield ds, registry
    ledger.close()


def test_withdrawing_consent_removes_exactly_that_subjects_records_from_the_next_round(site):
    ds, registry = site
    first = ds.for_round(round_number=1)
    assert first.rows == 240
    assert first.excluded_without_consent == 0

    registry.change("RAWID-0013-Q", "training", "withdrawn")
    second = ds.for_round(round_number=2)

    frame = ds.prepared.frame
    token = registry.token("RAWID-0013-Q")
    expected = frame[frame["patient_id"] != token]
    assert second.rows == len(expected) == 236
    assert second.excluded_without_consent == 4
    np.testing.assert_array_equal(second.features, ds.encoder.encode(expected))
    np.testing.assert_array_equal(second.labels, ds.encoder.labels(expected))


def test_consent_is_evaluated_at_the_time_the_round_starts(site):
    ds, registry = site
    round_start = utc_now()
    time.sleep(0.002)
    registry.change("RAWID-0002-Q", "training", "withdrawn")
    assert ds.for_round(at=round_start).rows == 240
    assert ds.for_round().rows == 236


def test_consent_is_opt_in_and_per_purpose(workspace, patients_csv, schema_file):
    ds = SiteDataset.from_file(workspace, patients_csv, DataSchema.load(schema_file))
    assert ds.for_round().rows == 0
    with workspace.ledger() as ledger:
        registry = ConsentRegistry(ledger, Pseudonymizer(workspace.secret("pseudonym")))
        registry.change("RAWID-0001-Q", "inference-logging", "granted")
        assert ds.for_round().rows == 0
        registry.change("RAWID-0001-Q", "training", "granted")
        assert ds.for_round().rows == 4
        assert registry.summary() == {
            "inference-logging": {"granted": 1, "withdrawn": 0},
            "training": {"granted": 1, "withdrawn": 0},
        }


def test_each_round_records_how_many_were_excluded(site, workspace):
    ds, registry = site
    registry.change("RAWID-0005-Q", "training", "withdrawn")
    ds.for_round(round_number=3)
    with workspace.ledger() as ledger:
        applied = ledger.entries(event_type="data.consent_applied", newest_first=True)[0]
    assert applied.payload["round"] == 3
    assert applied.payload["excluded_without_consent"] == 4
    assert applied.payload["rows"] == 236


def test_a_bad_consent_file_records_nothing(site, tmp_path):
    _, registry = site
    path = tmp_path / "bad.csv"
    path.write_text("subject,purpose,status\nA,training,granted\nB,training,maybe\n")
    before = len(registry.changes())
    with pytest.raises(ConsentError, match="line 3"):
        registry.import_csv(path)
    assert len(registry.changes()) == before
    path.write_text("subject,status\nA,granted\n")
    with pytest.raises(ConsentError, match="missing column"):
        registry.import_csv(path)


def test_no_consent_needed_requires_a_stated_legal_basis(schema_file):
    from insitu.errors import SchemaError

    text = schema_file.read_text() + "\n[consent]\nrequired = false\n"
    schema_file.write_text(text)
    with pytest.raises(SchemaError, match="legal_basis"):
        DataSchema.load(schema_file)
    schema_file.write_text(
        text.replace("required = false", 'required = false\nlegal_basis = "art. 9(2)(j)"')
    )
    assert DataSchema.load(schema_file).legal_basis == "art. 9(2)(j)"
