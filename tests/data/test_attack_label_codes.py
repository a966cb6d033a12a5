"""Label codes come from the schema's declared classes, never from the classes a site holds.

The attack: a site whose records lack one class. Numbered by the classes present, its
labels shift (digits 1..9 became codes 0..8), so it trains the shared model to call a
"1" a "0", and its held-out accuracy counts the same wrong codes as right. Numbered by
the declared classes, every site, whatever classes it holds, agrees on what each
output of the model means.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from insitu.data import DataSchema, FeatureEncoder, SiteDataset, array_table, load_schema
from insitu.datasets import write_digits
from insitu.errors import DataFormatError, SchemaError
from insitu.training import ArrayModelFn, train
from insitu.workspace import Workspace

TABLE = {
    "dataset": {"name": "triage", "label": "urgency", "classes": ["low", "medium", "high"]},
    "features": {"numeric": ["age"], "ranges": {"age": [0, 100]}},
    "consent": {"required": False, "legal_basis": "test"},
}


def test_attack_a_table_site_without_a_class_keeps_the_declared_codes() -> None:
    encoder = FeatureEncoder.for_schema(DataSchema.from_dict(TABLE))
    # This site has no "low" record: "medium" and "high" must stay 1 and 2, not 0 and 1.
    frame = pd.DataFrame({"age": [30, 40, 50], "urgency": ["high", "medium", "high"]})
    assert encoder.labels(frame).tolist() == [2, 1, 2]


def test_a_label_outside_the_declared_classes_is_refused_with_the_row() -> None:
    encoder = FeatureEncoder.for_schema(DataSchema.from_dict(TABLE))
    frame = pd.DataFrame({"age": [30, 40], "urgency": ["low", "critical"]})
    with pytest.raises(DataFormatError, match=r"row 2: column 'urgency' = 'critical' is not one"):
        encoder.labels(frame)


def test_declared_classes_are_checked_when_the_schema_is_read() -> None:
    for classes, message in (
        (["only"], "at least 2 classes"),
        (["a", "a"], "each once"),
        ("ab", "lists the label's classes"),
    ):
        doc = TABLE | {"dataset": TABLE["dataset"] | {"classes": classes}}
        with pytest.raises(SchemaError, match=message):
            DataSchema.from_dict(doc)
    binary = TABLE | {"dataset": TABLE["dataset"] | {"classes": ["no", "yes"], "positive": "y"}}
    with pytest.raises(SchemaError, match=r"'y' is not one of dataset\.classes"):
        DataSchema.from_dict(binary)


def test_attack_an_image_site_without_a_class_trains_on_the_declared_codes(
    tmp_path: Path,
) -> None:
    data, schema_path = write_digits(tmp_path / "digits")
    arrays = load_schema(schema_path)
    table = array_table(data, arrays)  # type: ignore[arg-type]
    digit = table.frame["y"].astype(int).to_numpy()
    # The site holds every digit but 0: before, its codes were the digits minus one.
    frame = table.frame[digit != 0].reset_index(drop=True)
    ws, _ = Workspace.init(tmp_path / "site", name="site")
    SiteDataset.from_frame(ws, frame, table.schema, source="digits", k=1, out=tmp_path / "rel")
    site = SiteDataset.open(ws, tmp_path / "rel").for_round(round_number=1)
    expected = np.bincount(digit[digit != 0], minlength=10)
    np.testing.assert_array_equal(np.bincount(site.labels, minlength=10), expected)

    # A model trained there answers in the federation's codes: a "7" is output 7.
    torch.manual_seed(0)
    model = ArrayModelFn((1, 8, 8), 10)(64)
    train(
        model,
        site.features,
        site.labels,
        epochs=8,
        batch_size=32,
        learning_rate=0.5,
        event=None,
        max_grad_norm=1.0,
    )
    with torch.no_grad():
        predicted = model(torch.as_tensor(site.features)).argmax(dim=1).numpy()
    assert (predicted == site.labels).mean() > 0.8
    assert 0 not in set(predicted.tolist())
