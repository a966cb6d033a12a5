"""Bad schemas: each error names the column and the fix."""

from __future__ import annotations

import pytest

from insitu.data import DataSchema, SiteDataset
from insitu.errors import SchemaError

BASE = """
[dataset]
label = "y"
[features]
numeric = ["a"]
categorical = ["b"]
[consent]
required = false
legal_basis = "GDPR art. 6(1)(e)"
"""


def load(text: str) -> DataSchema:
    import tomllib

    return DataSchema.from_dict(tomllib.loads(text))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[treatment]\ndrop = ["x"]\nkeep = ["x"]\n', "'x' is both dropped and kept"),
        ('[treatment]\ndrop = ["a"]\n', "'a' is a feature and dropped"),
        ('[treatment]\npseudonymize = ["b"]\n', "'b' is a feature and pseudonymized"),
        ('[identifiers]\ndirect = ["email"]\n', "'email' must be dropped or pseudonymized"),
        ('[identifiers]\ndirect = ["a"]\n', "'a' is a direct identifier"),
        ('[identifiers]\nquasi = ["zip"]\n', "quasi-identifier 'zip' has no declared fate"),
        ('[treatment]\ngeneralize = { a = "band:x" }\n', "'band:x' of column 'a'"),
        ('[treatment]\ngeneralize = { z = "year" }\n', "'z' is generalized but is neither"),
        ("[privacy]\nk = 0\n", "privacy.k"),
        ('[features.categories]\na = ["x"]\n', "'a', which is not categorical"),
        ("[features.ranges]\na = [5, 1]\n", "min < max"),
        ("[extra]\nx = 1\n", "unknown section [extra]"),
    ],
)
def test_bad_schema_is_refused_naming_the_column(extra, message):
    with pytest.raises(SchemaError) as caught:
        load(BASE + extra)
    assert message in str(caught.value)


def test_label_missing():
    with pytest.raises(SchemaError, match="no label column"):
        load(BASE.replace('label = "y"', 'name = "n"'))


def test_label_as_a_feature():
    with pytest.raises(SchemaError, match="'y' is the label and also a feature"):
        load(BASE.replace('numeric = ["a"]', 'numeric = ["a", "y"]'))


def test_subject_cannot_be_dropped():
    text = (
        BASE.replace('label = "y"', 'label = "y"\nsubject = "pid"')
        + '[treatment]\ndrop = ["pid"]\n'
    )
    with pytest.raises(SchemaError, match="subject identifier"):
        load(text)


def test_consent_required_without_a_subject():
    with pytest.raises(SchemaError, match=r"needs dataset\.subject"):
        load(BASE.replace("required = false", "required = true"))


def test_unknown_column_names_the_column(workspace, patients_csv, schema_file):
    schema_file.write_text(
        schema_file.read_text().replace('drop = ["name", "ssn"]', 'drop = ["name", "ssn", "fax"]')
    )
    with pytest.raises(
        SchemaError, match=r"column .fax. is declared in the schema but is not in patients\.csv"
    ):
        SiteDataset.from_file(workspace, patients_csv, DataSchema.load(schema_file))


def test_not_toml_names_the_file(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("[[[")
    with pytest.raises(SchemaError, match=r"s\.toml is not valid TOML"):
        DataSchema.load(path)


def test_the_builtin_adult_schema_is_valid():
    from insitu.datasets import builtin_schema

    schema = DataSchema.load(builtin_schema("adult"))
    assert schema.subject == "record_id"
    assert "fnlwgt" in schema.drop
    assert len(schema.features) == 13
