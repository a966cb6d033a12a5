"""The layout of a workspace's home, named by Workspace, and homes given as str or PathLike."""

from __future__ import annotations

from pathlib import Path

import pytest

from insitu.workspace import Workspace, resolve_home

# Each path as the code wrote it inline before Workspace named it: the layout on disk
# must not move (existing workspaces, ledgers that cite relative paths).
LAYOUT = [
    (lambda w: w.config_path, "config.toml"),
    (lambda w: w.keys_dir, "keys"),
    (lambda w: w.ledger_path, "ledger.db"),
    (lambda w: w.prepared_dir("adult"), "prepared/adult"),
    (lambda w: w.prepared_part("adult", "train"), "prepared/adult/train"),
    (lambda w: w.prepared_part("adult", "test"), "prepared/adult/test"),
    (lambda w: w.models_dir, "models"),
    (lambda w: w.model_dir("20250101T000000Z-abc123"), "models/20250101T000000Z-abc123"),
    (lambda w: w.run_events_path("r1"), "runs/r1.json"),
    (lambda w: w.finetune_weights_path("adult", "1.0.1"), "finetune/adult/1.0.1.npz"),
    (lambda w: w.federation_dir, "federation"),
    (lambda w: w.site_setup_path, "federation/site.json"),
    (lambda w: w.supernode_log_path, "federation/supernode.log"),
    (lambda w: w.runs_done_dir, "federation/done"),
    (lambda w: w.deployed_run_dir("r1"), "federation/runs/r1"),
    (lambda w: w.flower_app_dir, "federation/app"),
    (lambda w: w.flower_home, "federation/flwr"),
    (lambda w: w.sites_dir, "sites"),
    (lambda w: w.site_home("site-01"), "sites/site-01"),
    (lambda w: w.update_dir, "update"),
    (lambda w: w.privacy_dir, "privacy"),
    (lambda w: w.drift_dir, "drift"),
    (lambda w: w.reports_dir, "reports"),
    (lambda w: w.report_dir("privacy-audit-r1"), "reports/privacy-audit-r1"),
]


@pytest.mark.parametrize(("path_of", "relative"), LAYOUT, ids=[r for _, r in LAYOUT])
def test_the_layout_is_the_one_on_disk(workspace, path_of, relative):
    assert path_of(workspace) == workspace.home / relative
    # The same path before the workspace is opened (a plan, a report, a SuperNode).
    assert path_of(Workspace.layout(workspace.home)) == workspace.home / relative


def test_init_writes_the_files_the_layout_names(workspace):
    assert workspace.config_path.is_file()
    assert workspace.ledger_path.is_file()
    assert workspace.keys_dir.is_dir()


def test_naming_a_path_creates_nothing(tmp_path):
    layout = Workspace.layout(str(tmp_path / "not-yet"))
    assert layout.home == tmp_path / "not-yet"
    assert layout.model_dir("r1") == tmp_path / "not-yet" / "models" / "r1"
    assert not (tmp_path / "not-yet").exists()


class _PathLike:
    """An os.PathLike[str] that is not a Path (what a caller's own type may be)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __fspath__(self) -> str:
        return str(self._path)


@pytest.mark.parametrize("as_home", [str, _PathLike], ids=["str", "PathLike"])
def test_init_and_open_take_a_str_or_pathlike_home(tmp_path, as_home):
    ws, created = Workspace.init(as_home(tmp_path / "ws"), name="site")
    assert created
    assert isinstance(ws.home, Path)
    assert ws.home == tmp_path / "ws"
    again = Workspace.open(as_home(tmp_path / "ws"))
    assert isinstance(again.home, Path)
    assert again.node_id == ws.node_id
    assert again.update_dir == tmp_path / "ws" / "update"
    reopened, created = Workspace.init(as_home(tmp_path / "ws"))
    assert not created
    assert reopened.node_id == ws.node_id


@pytest.mark.parametrize("as_home", [str, _PathLike, Path], ids=["str", "PathLike", "Path"])
def test_resolve_home_returns_a_path(tmp_path, as_home):
    assert resolve_home(as_home(tmp_path / "ws")) == tmp_path / "ws"
    assert isinstance(resolve_home(as_home(tmp_path / "ws")), Path)


def test_resolve_home_expands_the_user_of_a_str(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_home("~/ws") == tmp_path / "ws"
