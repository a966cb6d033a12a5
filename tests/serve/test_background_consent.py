"""Explanations read the site's own prepared records, with consent applied."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from insitu.data import DataSchema, SiteDataset, read_table
from insitu.errors import InvalidInputError
from insitu.serve import site_background
from insitu.workspace import Workspace
from tests.data.conftest import SCHEMA, make_patients


def test_a_release_left_empty_by_consent_says_so_not_prepare_first(
    workspace: Workspace, tmp_path: Path
) -> None:
    # The release exists; nobody consented to explanations: the answer names consent.
    (tmp_path / "patients.csv").write_text(make_patients().to_csv(index=False))
    schema = DataSchema.from_dict(tomllib.loads(SCHEMA))
    SiteDataset.from_frame(
        workspace,
        read_table(tmp_path / "patients.csv"),
        schema,
        source="patients.csv",
        k=1,
        out=workspace.prepared_dir("readmission"),
    )
    with pytest.raises(InvalidInputError, match=r"consent left 0 rows.*'insitu consent'"):
        site_background(workspace)("readmission")


def test_no_release_is_no_background(workspace: Workspace) -> None:
    assert site_background(workspace)("readmission") is None
