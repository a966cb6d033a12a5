from __future__ import annotations

import gc
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from insitu.cli import run


@pytest.fixture(autouse=True)
def _collect_ray_leftovers() -> Iterator[None]:
    """Ray's leftovers from the simulation, collected here (see tests/federated/conftest)."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One small quickstart for the whole package: 3 sites, 2 rounds, 3,000 rows.

    Session-scoped, not package-scoped: a pytest-xdist worker runs this package's files
    between others', and a package fixture would be built again each time it came back.
    """
    import contextlib
    import io

    out = tmp_path_factory.mktemp("qs") / "demo"
    buffer = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        warnings.simplefilter("ignore", pytest.PytestUnraisableExceptionWarning)
        with contextlib.redirect_stdout(buffer):
            code = run(
                [
                    *("quickstart", "--out", str(out), "--sites", "3", "--rounds", "2"),
                    *("--rows", "3000", "--json"),
                ]
            )
        gc.collect()
    assert code == 0, buffer.getvalue()[-2000:]
    return out, json.loads(buffer.getvalue())


@pytest.fixture
def tampered_copy(quickstart, tmp_path: Path) -> Path:
    """A copy of the quickstart's output that a test may alter."""
    out, _ = quickstart
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    return copy
