"""What training code receives: declared features only, no identifier, no undeclared column."""

from __future__ import annotations

import pytest

from insitu.data import DataSchema, SiteDataset
from tests.data.conftest import make_patients


@pytest.fixture
def dataset(workspace, patients_csv, schema_file):
    ds = SiteDataset.from_file(workspace, patients_csv, DataSchema.load(schema_file))
    with workspace.ledger() as ledger:
        registry_grants = [(f"RAWID-{p:04d}-Q", "training", "granted") for p in range(60)]
        from insitu.data import ConsentRegistry, Pseudonymizer

        ConsentRegistry(ledger, Pseudonymizer(workspace.secret("pseudonym"))).change_many(
            registry_grants
        )
    return ds


def test_training_code_receives_only_declared_features(dataset):
    data = dataset.for_round(round_number=1)
    assert data.feature_names == [
        "age",
        "lab_value",
        "sex=F",
        "sex=M",
        "ward=A",
        "ward=B",
        "ward=C",
    ]
    assert data.features.shape == (240, 7)
    assert data.features.dtype.name == "float32"
    assert set(data.labels.tolist()) <= {0, 1}
    # Scaled by the declared ranges, not by local statistics.
    assert data.features[:, :2].min() >= 0.0
    assert data.features[:, :2].max() <= 1.0


def test_dropped_identifier_and_undeclared_columns_are_absent_from_the_release(dataset):
    frame = dataset.prepared.frame
    for column in ("name", "ssn", "notes"):
        assert column not in frame.columns
    text = frame.to_csv()
    raw = make_patients()
    for column in ("patient_id", "name", "email", "ssn", "notes"):
        for value in raw[column].unique()[:60]:
            assert value not in text, (column, value)
    assert frame["patient_id"].str.startswith("p_").all()
    assert frame["email"].str.startswith("p_").all()


def test_generalization_is_applied_before_release(dataset):
    frame = dataset.prepared.frame
    assert set(frame["age"].unique()) <= {0.0, 20.0, 40.0, 60.0, 80.0}
    assert frame["zip"].str.len().max() == 2


def test_undeclared_columns_are_reported(dataset):
    assert dataset.prepared.report.undeclared == ["notes"]
    assert dataset.prepared.report.dropped == ["name", "ssn"]
