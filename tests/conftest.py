from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import freezegun
import pytest

from insitu.audit import Ledger
from insitu.workspace import Workspace

# pytest-xdist starts its workers with COLUMNS set to the controller's width (80 without a
# terminal); the CLI takes a set COLUMNS as a terminal's width and wraps its tables there.
# The tests read the CLI's output as a pipe gives it, as they do without workers.
os.environ.pop("COLUMNS", None)

# freezegun reads every attribute of every loaded module when it starts; insitu.data loads
# its names on first use (PEP 562), so that read would import pandas under the fake
# datetime, which pandas 3 does not survive (a crash in the garbage collector).
freezegun.configure(extend_ignore_list=["insitu.data"])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with slow tests first, deployments first of all; a file's tests kept in order.

    pytest-xdist hands test files to its workers in this order (``--dist loadfile``): a
    long deployed run started last would leave one worker running alone at the end.
    """
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(
        key=lambda item: (item.path not in slow_files, not item.path.name.startswith("test_deploy"))
    )


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own workspace or passphrase must never leak into a test.
    monkeypatch.delenv("INSITU_HOME", raising=False)
    monkeypatch.delenv("INSITU_PASSPHRASE", raising=False)
    logging.getLogger("insitu").setLevel(logging.WARNING)


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    ws, created = Workspace.init(tmp_path / "ws", name="test-site")
    assert created
    return ws


@pytest.fixture
def ledger(workspace: Workspace) -> Iterator[Ledger]:
    with workspace.ledger() as opened:
        yield opened


def fill(ledger: Ledger, count: int, event_type: str = "test.event") -> None:
    for index in range(count):
        ledger.record(event_type, index=index, accuracy=0.5 + index / 1000)
