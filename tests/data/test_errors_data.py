"""The data layer's refusals, each provoked with the bad input a site could really hold.

A data file that cannot be read, values its schema does not allow, a release directory
that is missing or damaged (:class:`DataFormatError`), and a data set too large to seal
(:class:`DataError`): each named, with the fix, and nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from insitu._sealed import MAX_SEALED_BYTES, write_sealed
from insitu.cli import run
from insitu.data import DataSchema, Pseudonymizer, load_prepared, prepare, read_table
from insitu.data import write_prepared as seal_release
from insitu.errors import DataError, DataFormatError
from tests.data.conftest import make_patients

KEY = bytes(range(32))


def _release(workspace, schema_file: Path, directory: Path) -> Path:
    """A sealed release of the synthetic patients; returns its manifest."""
    prepared = prepare(
        make_patients(),
        DataSchema.load(schema_file),
        Pseudonymizer(workspace.secret("pseudonym")),
        source="patients.csv",
    )
    return seal_release(directory, prepared, workspace.secret("data"))


# -- files that cannot be read -------------------------------------------------------


def test_a_missing_data_file_is_named(tmp_path):
    with pytest.raises(DataFormatError, match=r"data file .*patients\.csv does not exist"):
        read_table(tmp_path / "patients.csv")


def test_a_spreadsheet_is_not_read_as_data(tmp_path):
    sheet = tmp_path / "patients.xlsx"
    sheet.write_bytes(b"PK\x03\x04 a spreadsheet")
    with pytest.raises(DataFormatError, match=r"unknown data format; use \.csv"):
        read_table(sheet)


def test_a_truncated_parquet_file_cannot_be_read(tmp_path):
    whole = tmp_path / "whole.parquet"
    make_patients(rows=20).to_parquet(whole)
    cut = tmp_path / "patients.parquet"
    cut.write_bytes(whole.read_bytes()[:200])  # a copy interrupted halfway
    with pytest.raises(DataFormatError, match=r"cannot read .*patients\.parquet"):
        read_table(cut)


def test_a_file_with_a_header_and_no_rows_is_refused(tmp_path):
    empty = tmp_path / "patients.csv"
    make_patients().head(0).to_csv(empty, index=False)
    with pytest.raises(DataFormatError, match="holds no rows"):
        read_table(empty)


def test_the_cli_names_an_unreadable_file_in_one_line(tmp_path, capsys, schema_file):
    sheet = tmp_path / "patients.xlsx"
    sheet.write_bytes(b"PK\x03\x04 a spreadsheet")
    code = run(["data", "inspect", str(sheet), "--schema", str(schema_file)])
    err = capsys.readouterr().err
    assert code == DataFormatError.exit_code == 1
    (line,) = err.strip().splitlines()
    assert "patients.xlsx: unknown data format" in line
    assert "Traceback" not in err


# -- values the schema does not allow ------------------------------------------------


def _prepare(frame: pd.DataFrame, schema_file: Path) -> None:
    prepare(frame, DataSchema.load(schema_file), Pseudonymizer(KEY), source="patients.csv")


def test_a_word_in_a_banded_column_is_named(schema_file):
    frame = make_patients()
    frame.loc[5, "age"] = "unknown"  # age is generalized with band:20
    with pytest.raises(DataFormatError, match=r"column 'age': 'unknown' is not a number \(band"):
        _prepare(frame, schema_file)


def test_a_non_number_in_a_numeric_feature_is_named_with_the_fix(schema_file):
    frame = make_patients()
    frame.loc[[3, 9], "lab_value"] = "<0.1"  # a lab's "below detection limit"
    with pytest.raises(
        DataFormatError,
        match=r"numeric feature 'lab_value' holds 2 .* \(e\.g\. '<0\.1'\).* declare the column",
    ):
        _prepare(frame, schema_file)


def test_records_without_a_label_are_refused(schema_file):
    frame = make_patients()
    frame.loc[[1, 2, 3], "readmitted"] = None
    with pytest.raises(DataFormatError, match="label 'readmitted' is missing in 3 rows"):
        _prepare(frame, schema_file)


# -- release directories that are missing or damaged ---------------------------------


def test_a_directory_without_a_release_says_to_prepare_first(workspace, tmp_path):
    with pytest.raises(DataFormatError, match="holds no prepared data; run 'insitu data prepare'"):
        load_prepared(tmp_path / "release", workspace.secret("data"))


def test_a_damaged_manifest_is_named(workspace, schema_file, tmp_path):
    manifest = _release(workspace, schema_file, tmp_path / "release")
    manifest.write_text(manifest.read_text()[:40])  # a disk that filled up mid-write
    with pytest.raises(DataFormatError, match=r"manifest\.json is damaged"):
        load_prepared(tmp_path / "release", workspace.secret("data"))


def test_a_release_of_an_older_format_must_be_prepared_again(workspace, schema_file, tmp_path):
    manifest = _release(workspace, schema_file, tmp_path / "release")
    document = json.loads(manifest.read_text())
    document["format"] = "insitu-prepared/1"
    manifest.write_text(json.dumps(document))
    with pytest.raises(DataFormatError, match=r"prepared by an older insitu .* prepare the data"):
        load_prepared(tmp_path / "release", workspace.secret("data"))


# -- a data set too large to seal ----------------------------------------------------


def test_a_data_set_too_large_for_a_sealed_cache_is_refused_before_writing(tmp_path):
    # bytes(n) is zero pages the kernel maps lazily: the size check runs, no 2 GiB is used.
    too_large = bytes(MAX_SEALED_BYTES + 1)
    with pytest.raises(DataError, match=r"more than a sealed cache holds .*; split the data set"):
        write_sealed(tmp_path / "cache.sealed", too_large, KEY, context="prepared-data")
    assert list(tmp_path.iterdir()) == []
