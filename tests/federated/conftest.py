from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from insitu.datasets import builtin_schema

ADULT = Path(__file__).resolve().parents[3] / "shared" / "data" / "adult.csv"


@pytest.fixture(scope="session")
def adult() -> pd.DataFrame:
    from insitu.data import read_table
    from insitu.datasets import builtin_data

    # The copy insitu carries (with record ids); ../shared holds the same rows.
    frame = read_table(builtin_data("adult"))
    return frame.drop(columns=["record_id", "fnlwgt"])


@pytest.fixture(autouse=True)
def _collect_ray_leftovers() -> Iterator[None]:
    """Collect what Ray leaves behind inside the test that made it.

    ray.shutdown() (called by Flower's simulation) stops Ray's node processes
    asynchronously and leaves files to /dev/null open: their objects raise
    ResourceWarnings when collected. They are Ray's, not insitu's, so they are collected
    and ignored here rather than turned into errors in whichever test runs next.
    """
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture
def schema_file(tmp_path: Path) -> Path:
    """The carried Adult schema, with a stated legal basis instead of per-record consent."""
    text = builtin_schema("adult").read_text()
    text = text.replace(
        "required = true", 'required = false\nlegal_basis = "GDPR art. 6(1)(f), test"'
    )
    path = tmp_path / "adult.schema.toml"
    path.write_text(text)
    return path
