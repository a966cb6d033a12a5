"""Attack: read personal data out of a schema inferred with ``--label`` (simulation only).

An inferred schema is published (``models/<run>/features.json``, every site's plaintext
``prepared/*/manifest.json``). The attacks plant what an adversary would look for: an
e-mail column, a category one record holds, an extreme value; and the detector is held
to precision on continuous measurements while still catching integer and text ids.
"""

from __future__ import annotations

import json
import secrets

import numpy as np
import pandas as pd
import pytest

from insitu._pii import find_personal_data
from insitu.data import DataSchema, infer_schema, read_table, scan_column, scan_frame
from insitu.data._infer import GRID
from insitu.datasets import builtin_data
from insitu.privacy import epsilon_of

EPSILON, DELTA = 1.0, 1e-6


@pytest.fixture(scope="module")
def adult() -> pd.DataFrame:
    frame = read_table(builtin_data("adult"))
    return frame.sample(3000, random_state=11).reset_index(drop=True)


def test_label_inference_drops_a_planted_email_column_with_one_warning(adult):
    canary = f"canary-{secrets.token_hex(8)}"
    planted = adult.copy()
    planted["email"] = [f"{canary}-{i}@example.org" for i in range(len(planted))]
    result = infer_schema(planted, label="income", name="adult", epsilon=EPSILON, delta=DELTA)

    schema = result.schema
    assert canary not in json.dumps(schema.source)
    assert canary not in json.dumps(result.to_json())
    assert "email" not in schema.features
    assert "email" in schema.direct
    assert "email" in schema.drop
    assert "email addresses" in result.dropped["email"]
    about_email = [w for w in result.warnings if "'email'" in w]
    assert len(about_email) == 1
    assert "declare it an identifier" in about_email[0]
    # The built-in table's record ids are unique per row: dropped too, never the label.
    assert set(result.dropped) == {"email", "record_id"}
    assert schema.label == "income"
    assert schema.positive == ">50K"
    assert "occupation" in schema.categorical
    assert "age" in schema.numeric


def test_a_category_held_by_one_record_never_reaches_the_inferred_vocabulary(adult):
    for _ in range(5):  # fresh secret noise each time
        rare = f"Astronaut-{secrets.token_hex(4)}"
        planted = adult.copy()
        planted.loc[7, "occupation"] = rare
        result = infer_schema(planted, label="income", epsilon=EPSILON, delta=DELTA)
        vocabulary = result.schema.categories["occupation"]
        assert rare not in vocabulary
        assert rare not in json.dumps(result.schema.source)
        # The threshold keeps what many records hold (~400 of 3000 here).
        assert "Prof-specialty" in vocabulary
        assert result.threshold is not None
        assert result.threshold > 1


def test_inferred_ranges_do_not_publish_the_exact_min_and_max(adult):
    planted = adult.copy()
    planted.loc[3, "age"] = "117"
    result = infer_schema(planted, label="income", epsilon=EPSILON, delta=DELTA)
    low, high = result.schema.ranges["age"]
    assert high != 117
    assert high <= 100  # the bin [100, 150) holds one record: below the threshold
    assert (low, high) != (17.0, 117.0)
    for column in result.schema.numeric:
        observed = pd.to_numeric(planted[column])
        low, high = result.schema.ranges[column]
        assert low in GRID
        assert high in GRID  # public grid edges, never an observed value
        assert (low, high) != (observed.min(), observed.max())


def test_continuous_float_columns_are_not_taken_for_card_numbers_or_identifiers(tmp_path):
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.make_classification(n_samples=2000, n_features=20, random_state=0)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(20)]).assign(label=y)
    assert {c: f.kinds for c, f in scan_frame(frame).items() if f.suspicious} == {}
    # Read back as text, as `insitu data inspect` reads a CSV.
    frame.to_csv(tmp_path / "synthetic.csv", index=False)
    text = read_table(tmp_path / "synthetic.csv")
    assert {c: f.kinds for c, f in scan_frame(text).items() if f.suspicious} == {}
    result = infer_schema(text, label="label", epsilon=EPSILON, delta=DELTA)
    assert result.dropped == {}
    assert len(result.schema.numeric) == 20
    # The digits of a float are not a card number, whole card numbers still are.
    assert find_personal_data("-0.35484779567118791") is None
    assert find_personal_data("1234567890123.45") is None
    assert find_personal_data("4111111111111111") == "card number"
    cards = pd.Series([4111111111111111.0, 5500000000000004.0] * 30)
    assert scan_column("amount", cards).kinds == {"card number": 2}


def test_an_integer_patient_id_unique_per_row_is_an_identifier():
    datasets = pytest.importorskip("sklearn.datasets")
    frame = datasets.load_breast_cancer(as_frame=True).frame
    frame.insert(0, "patient_id", np.arange(100001, 100001 + len(frame)))
    findings = {c: f.kinds for c, f in scan_frame(frame).items() if f.suspicious}
    assert findings == {"patient_id": {"value unique to its row": len(frame)}}
    result = infer_schema(frame, label="target", epsilon=EPSILON, delta=DELTA)
    assert result.dropped == {"patient_id": "value unique to its row"}
    assert "patient_id" in result.schema.direct
    assert len(result.schema.numeric) == 30
    assert "100001" not in json.dumps(result.schema.source)
    # The same ids as floats, as text, or as text keys, are identifiers all the same.
    for ids in (
        frame["patient_id"].astype(float),
        frame["patient_id"].astype(str),
        "P-" + frame["patient_id"].astype(str),
    ):
        assert scan_column("patient_id", ids).kinds == {"value unique to its row": len(frame)}
    # A whole-number measurement that is merely distinct (a weight) is not a key.
    weights = pd.Series(np.random.default_rng(0).permutation(10**6)[: len(frame)] + 10**4)
    assert not scan_column("fnlwgt", weights).suspicious


@pytest.mark.parametrize(("epsilon", "delta"), [(1.0, 1e-6), (0.3, 1e-5), (4.0, 1e-7)])
def test_the_inference_costs_at_most_the_requested_epsilon(adult, epsilon, delta):
    result = infer_schema(adult, label="income", epsilon=epsilon, delta=delta)
    assert result.event is not None
    assert (result.event.sample_rate, result.event.steps) == (1.0, 1)
    assert epsilon_of([result.event], delta=delta) <= epsilon
    assert json.loads(json.dumps(result.to_json()))["event"] == result.event.to_json()


def test_nothing_data_dependent_released_costs_nothing():
    frame = pd.DataFrame({"record": [f"r-{i:04d}" for i in range(200)], "y": ["no", "yes"] * 100})
    result = infer_schema(frame, label="y", epsilon=EPSILON, delta=DELTA)
    assert result.event is None
    assert result.schema.features == ()
    assert result.schema.positive == "yes"


def test_the_public_variant_drops_identifier_columns_too(adult):
    planted = adult.copy()
    planted["email"] = [f"person{i}@example.org" for i in range(len(planted))]
    schema = DataSchema.infer(planted, label="income")
    assert "@" not in json.dumps(schema.source)
    assert {"email", "record_id"} <= set(schema.drop)
