"""``insitu serve``, ``predict`` and ``explain`` on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from insitu.cli import run
from tests.serve.conftest import Site


def invoke(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--host", "0.0.0.0"], "refusing to listen on 0.0.0.0"),
        (["--host", "192.0.2.4", "--expose"], "needs --tls-cert and --tls-key"),
        (
            [
                "--host",
                "0.0.0.0",
                "--expose",
                "--tls-cert",
                "/nonexistent.pem",
                "--tls-key",
                "/nonexistent.key",
            ],
            "does not exist",
        ),
        (["--host", "models.example"], "not an IP address"),
    ],
)
def test_serve_refuses_a_non_loopback_bind_without_expose_and_tls(
    site: Site, capsys: pytest.CaptureFixture[str], options: list[str], words: str
) -> None:
    code, _, err = invoke(capsys, "serve", "--home", str(site.workspace.home), *options)
    assert code == 2
    assert words in err
    assert len(err.strip().splitlines()) == 1 or "error:" in err


def test_predict_command_streams_a_file(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = np.random.default_rng(3).random((300, 8))
    pd.DataFrame(rows).to_csv(tmp_path / "in.csv", index=False)
    code, out, err = invoke(
        capsys,
        "predict",
        "mlp",
        str(tmp_path / "in.csv"),
        "-o",
        str(tmp_path / "out.csv"),
        "--chunk-rows",
        "64",
        "--home",
        str(site.workspace.home),
        "--json",
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["rows"] == 300
    assert doc["chunks"] == 5
    assert doc["version"] == "1.0.0"
    assert len(pd.read_csv(tmp_path / "out.csv")) == 300


def test_predict_command_bad_input_is_one_line_exit_1(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pd.DataFrame(np.zeros((4, 3))).to_csv(tmp_path / "narrow.csv", index=False)
    code, _, err = invoke(
        capsys,
        "predict",
        "mlp",
        str(tmp_path / "narrow.csv"),
        "-o",
        str(tmp_path / "o.csv"),
        "--home",
        str(site.workspace.home),
    )
    assert code == 1
    assert "axis 1 must have 8 values" in err
    assert not (tmp_path / "o.csv").exists()


def test_explain_without_local_data_says_what_to_do(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pd.DataFrame(np.zeros((2, 8))).to_csv(tmp_path / "rows.csv", index=False)
    code, _, err = invoke(
        capsys, "explain", "mlp", str(tmp_path / "rows.csv"), "--home", str(site.workspace.home)
    )
    assert code == 1
    assert "no prepared data for 'mlp'" in err
