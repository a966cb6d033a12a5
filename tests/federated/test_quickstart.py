"""The main job, end to end (a short version: two rounds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from insitu.cli import run

pytestmark = [
    pytest.mark.slow,
    # Ray's leftovers (see conftest._collect_ray_leftovers), never insitu's own.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def invoke_json(capsys, *args):
    code = run([*args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_quickstart_json(tmp_path, capsys):
    summary = invoke_json(capsys, "quickstart", "--out", str(tmp_path / "qs"), "--rounds", "2")
    assert summary["ledgers_verified"] == 6
    assert summary["central_accuracy"] > 0.75
    assert all(0 < eps <= 3.0 for eps in summary["epsilon_by_site"].values())
    assert len(summary["epsilon_by_site"]) == 5
    assert summary["excluded_without_consent"] > 0
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert (Path(summary["model_dir"]) / "model.onnx").exists()
    # Bundled, published, and every site updated, verified and ran it locally.
    assert summary["bundle"]["version"] == "1.0.0"
    assert summary["bundle"]["methods"] == ["full"] * 5
    assert summary["bundle"]["local_accuracy"] > 0.75
