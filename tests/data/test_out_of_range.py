"""Values outside the declared ranges are counted and reported, never clipped silently.

The encoder clips a numeric feature to its declared range (a model never sees a value
beyond it). Narrowing the ranges of a 50,000-row table once left 37% of its rows outside
them without a word; now ``inspect``, ``prepare`` (its report and ``data.prepared``) and
each training round (``federation.site_round``) count them per column.
"""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pandas as pd

from insitu.cli import run
from insitu.data import (
    DataSchema,
    FeatureEncoder,
    Pseudonymizer,
    SiteDataset,
    inspect_table,
    out_of_range,
    prepare,
)
from tests.data.conftest import SCHEMA, make_patients


def _schema() -> DataSchema:
    return DataSchema.from_dict(tomllib.loads(SCHEMA))


def _patients_outside() -> pd.DataFrame:
    frame = make_patients()
    frame.loc[:9, "lab_value"] = "12.5"  # declared [0, 10]: 10 rows above
    frame.loc[20:22, "age"] = "-3"  # declared [0, 100]: 3 rows below
    return frame


def test_out_of_range_counts_each_column_outside_its_declared_range():
    schema = _schema()
    assert out_of_range(_patients_outside(), schema) == {"age": 3, "lab_value": 10}
    assert out_of_range(make_patients(), schema) == {}


def test_inspect_counts_and_warns_per_column():
    report = inspect_table(_patients_outside(), _schema(), source="patients.csv")
    assert report.out_of_range == {"age": 3, "lab_value": 10}
    lab = [w for w in report.warnings if "'lab_value'" in w]
    assert lab == [
        "column 'lab_value': 10 of 240 values (4.2%) lie outside its declared range [0, 10] "
        "and are clipped to it: widen features.ranges.lab_value or correct the data"
    ]


def test_prepare_reports_the_count_that_the_encoder_then_clips(workspace):
    frame = _patients_outside()
    prepared = prepare(
        frame, _schema(), Pseudonymizer(workspace.secret("pseudonym")), source="p", k=1
    )
    assert prepared.report.out_of_range == {"age": 3, "lab_value": 10}
    encoded = FeatureEncoder.for_schema(_schema(), prepared.frame).encode(prepared.frame)
    assert float(np.max(encoded[:, 1])) == 1.0  # lab_value clipped to the top of its range


def test_the_site_ledger_records_the_count_at_preparation(workspace):
    SiteDataset.from_frame(workspace, _patients_outside(), _schema(), source="p.csv", k=1)
    with workspace.ledger() as ledger:
        (entry,) = list(ledger.entries(event_type="data.prepared"))
    assert entry.payload["out_of_range"] == {"age": 3, "lab_value": 10}


def test_inspect_and_prepare_commands_say_it(tmp_path, capsys):
    home = str(tmp_path / "ws")
    assert run(["init", "--home", home]) == 0
    data = tmp_path / "patients.csv"
    _patients_outside().to_csv(data, index=False)
    schema = tmp_path / "patients.schema.toml"
    schema.write_text(SCHEMA)
    capsys.readouterr()
    assert run(["data", "inspect", str(data), "-s", str(schema), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["outside_declared_range"] == {"age": 3, "lab_value": 10}
    out_dir = str(tmp_path / "release")
    code = run(
        [
            "data",
            "prepare",
            str(data),
            "-s",
            str(schema),
            "-o",
            out_dir,
            "--home",
            home,
            "--suppress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0
    assert "column 'lab_value': 10 of" in err
    assert "widen features.ranges.lab_value" in err
