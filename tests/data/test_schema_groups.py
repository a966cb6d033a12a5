"""Sensitive attributes in the schema (``[groups]``): declared, defaulted, refused in one line."""

from __future__ import annotations

import tomllib

import pytest

from insitu.data import DataSchema
from insitu.datasets import builtin_schema
from insitu.errors import SchemaError

BASE = """
[dataset]
label = "y"
[features]
numeric = ["a"]
categorical = ["sex", "b"]
[features.categories]
sex = ["Female", "Male"]
[consent]
required = false
legal_basis = "GDPR art. 6(1)(e)"
"""


def load(text: str) -> DataSchema:
    return DataSchema.from_dict(tomllib.loads(text))


def test_the_adult_schema_declares_sex_and_race_with_a_minimum_size_and_a_gap():
    schema = DataSchema.load(builtin_schema("adult"))
    assert schema.sensitive == ("sex", "race")
    assert schema.group_min_size == 100
    assert schema.group_max_gap == 0.05


def test_without_groups_nothing_is_sensitive_and_the_defaults_hold():
    schema = load(BASE)
    assert schema.sensitive == ()
    assert (schema.group_min_size, schema.group_max_gap) == (100, 0.05)
    declared = load(BASE + '[groups]\nsensitive = ["sex"]\nmin_size = 20\nmax_gap = 0.1\n')
    assert (declared.sensitive, declared.group_min_size, declared.group_max_gap) == (
        ("sex",),
        20,
        0.1,
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[groups]\nsensitive = ["a"]\n', "'a', which is not a categorical feature with declared"),
        ('[groups]\nsensitive = ["b"]\n', r"declare it in .*features.categories.b"),
        ('[groups]\nsensitive = ["zip"]\n', "'zip', which is not a categorical feature"),
        ('[groups]\nsensitive = "sex"\n', "groups.sensitive must be a list of column names"),
        ("[groups]\nmin_size = 0\n", "groups.min_size must be a whole number of at least 1"),
        ("[groups]\nmin_size = 2.5\n", "groups.min_size must be a whole number"),
        ("[groups]\nmax_gap = 0\n", "groups.max_gap must be a number above 0 and at most 1"),
        ("[groups]\nmax_gap = 5\n", "groups.max_gap must be a number above 0 and at most 1"),
        ("[groups]\nmax_gap = true\n", "groups.max_gap must be a number"),
        ("[groups]\nsensitve = []\n", "unknown key groups.sensitve"),
    ],
)
def test_a_bad_groups_declaration_is_refused_in_one_line(extra, message):
    with pytest.raises(SchemaError, match=message) as caught:
        load(BASE + extra)
    assert "\n" not in str(caught.value)


def test_a_bad_groups_declaration_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.schema.toml"
    path.write_text(BASE + "[groups]\nmin_size = -1\n", encoding="utf-8")
    with pytest.raises(SchemaError, match=r"bad.schema.toml: groups.min_size"):
        DataSchema.load(path)
