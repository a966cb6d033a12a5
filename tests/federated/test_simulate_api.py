"""What ``simulate`` takes: data, schema and consent as a ``str``, a path object or in memory.

None of these tests starts Flower's engine: each stops before the first round, either at
a check that names its input, or through ``strategy_spy`` once every site has prepared
its part (the last step before Ray starts).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from insitu.data import read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.errors import SchemaError, UsageError
from insitu.federated import FederationConfig, simulate
from insitu.workspace import Workspace

CONFIG = FederationConfig(sites=3, rounds=1, privacy="none", secure_aggregation=False)


class _PathLike:
    """A path object that is not a ``pathlib.Path`` (``os.PathLike`` is a protocol)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __fspath__(self) -> str:
        return str(self._path)


class _StoppedBeforeRayError(Exception):
    """Raised by the strategy spy: every site has prepared its data, Ray has not started."""


def _stop(_: object) -> None:
    raise _StoppedBeforeRayError


@pytest.fixture(scope="module")
def sample() -> pd.DataFrame:
    """1500 rows of the census data insitu carries (record ids included: the subjects)."""
    return read_table(builtin_data("adult")).sample(1500, random_state=0)


@pytest.fixture
def csv(tmp_path: Path, sample: pd.DataFrame) -> Path:
    path = tmp_path / "adult-sample.csv"
    sample.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("as_given", [str, Path, _PathLike], ids=["str", "Path", "PathLike"])
def test_data_given_as_any_path_is_read_and_named_by_its_file(
    workspace: Workspace, csv: Path, as_given: type
) -> None:
    # Before the fix, a str failed with AttributeError ('str' object has no attribute 'name').
    with pytest.raises(SchemaError, match=r"not in the data adult-sample\.csv"):
        simulate(workspace, as_given(csv), CONFIG, label="no-such-column")


def test_data_given_as_a_frame_is_named_data(workspace: Workspace, sample: pd.DataFrame) -> None:
    with pytest.raises(SchemaError, match=r"not in the data data \(its columns"):
        simulate(workspace, sample, CONFIG, label="no-such-column")


def test_a_schema_given_as_a_str_path_is_loaded(workspace: Workspace, csv: Path) -> None:
    with pytest.raises(UsageError, match=r"differs from the schema's label 'income'"):
        simulate(workspace, str(csv), CONFIG, schema=str(builtin_schema("adult")), label="sex")


def test_a_missing_data_file_is_named(workspace: Workspace, tmp_path: Path) -> None:
    from insitu.errors import DataFormatError

    with pytest.raises(DataFormatError, match=r"absent\.csv does not exist"):
        simulate(workspace, str(tmp_path / "absent.csv"), CONFIG, label="income")


def test_data_schema_and_consent_as_str_paths_reach_every_site(
    workspace: Workspace, csv: Path, sample: pd.DataFrame, tmp_path: Path
) -> None:
    consent = tmp_path / "consent.csv"
    pd.DataFrame(
        {"subject": sample["record_id"], "purpose": "training", "status": "granted"}
    ).to_csv(consent, index=False)

    with pytest.raises(_StoppedBeforeRayError):
        simulate(
            workspace,
            os.fspath(csv),
            CONFIG,
            schema=os.fspath(builtin_schema("adult")),
            consent=os.fspath(consent),
            strategy_spy=_stop,
        )

    for index in range(1, CONFIG.sites + 1):
        site = Workspace.open(workspace.home / "sites" / f"site-{index:02d}")
        with site.ledger() as ledger:
            # Each site imported the whole file (a consent system holds every subject)...
            assert len(ledger.entries(event_type="consent.changed")) == len(sample)
            # ...and prepared its part (train and test) under the schema read from the path.
            prepared = ledger.entries(event_type="data.prepared")
        assert [p.payload["dataset"] for p in prepared] == ["adult-income", "adult-income"]
