"""Schema-driven encoding: log scaling and declared bins are functions of the schema only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from insitu.data import DataSchema, FeatureEncoder
from insitu.errors import SchemaError


def _schema(**features: object) -> DataSchema:
    doc = {
        "dataset": {"name": "t", "label": "y", "positive": "1"},
        "features": {
            "numeric": ["age", "gain"],
            "categorical": [],
            "ranges": {"age": [0, 100], "gain": [0, 99999]},
            **features,
        },
        "consent": {"required": False, "legal_basis": "test"},
    }
    return DataSchema.from_dict(doc)


def test_log_transform_spreads_heavy_tailed_amounts():
    encoder = FeatureEncoder.for_schema(_schema(transforms={"gain": "log"}))
    frame = pd.DataFrame({"age": [1, 1, 1], "gain": [0, 1000, 99999], "y": ["0", "1", "1"]})
    gain = encoder.encode(frame)[:, 1]
    assert gain[0] == 0.0
    assert gain[2] == pytest.approx(1.0)
    # Linearly, 1000 of 99999 would sit at 0.01; on the log scale at about 0.6.
    assert gain[1] == pytest.approx(np.log1p(1000) / np.log1p(99999), rel=1e-6)


def test_bins_add_one_indicator_per_interval():
    encoder = FeatureEncoder.for_schema(_schema(bins={"age": [25, 35]}))
    assert encoder.names == ["age", "gain", "age<25", "age[25,35)", "age>=35"]
    frame = pd.DataFrame({"age": [10, 25, 34.9, 35, 90], "gain": [0] * 5, "y": ["0"] * 5})
    onehot = encoder.encode(frame)[:, 2:]
    assert onehot.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=30))
def test_encoding_stays_in_unit_interval_with_one_bin_set(values):
    encoder = FeatureEncoder.for_schema(
        _schema(transforms={"gain": "log"}, bins={"age": [20, 40, 60]})
    )
    frame = pd.DataFrame({"age": values, "gain": values, "y": ["0"] * len(values)})
    encoded = encoder.encode(frame)
    assert encoded.shape == (len(values), len(encoder.names))
    assert np.all((encoded >= 0) & (encoded <= 1))
    assert np.all(encoded[:, 2:].sum(axis=1) == 1)


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ({"transforms": {"gain": "sqrt"}}, "unknown"),
        ({"transforms": {"nope": "log"}}, "not numeric"),
        ({"transforms": {"age": "log"}, "ranges": {"gain": [0, 1]}}, "needs features.ranges.age"),
        ({"bins": {"age": [30, 20]}}, "strictly increasing"),
        ({"bins": {"age": []}}, "strictly increasing"),
    ],
)
def test_bad_transforms_and_bins_are_refused(features, message):
    with pytest.raises(SchemaError, match=message):
        _schema(**features)


def test_bin_columns_do_not_depend_on_the_order_of_the_bins_table():
    # A schema read back from canonical JSON (a model card) has its keys sorted.
    one = _schema(bins={"gain": [10.0], "age": [30.0]})
    two = _schema(bins={"age": [30.0], "gain": [10.0]})
    frame = pd.DataFrame({"age": [20, 40], "gain": [5, 50], "y": ["0", "1"]})
    first, second = FeatureEncoder.for_schema(one), FeatureEncoder.for_schema(two)
    assert first.names == second.names
    assert np.array_equal(first.encode(frame), second.encode(frame))
