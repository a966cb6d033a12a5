"""Images in a simulated federation: digits across 3 sites, a CNN, DP-SGD, as for tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from insitu.cli import run
from insitu.datasets import builtin_data, builtin_schema, write_digits
from insitu.errors import UsageError
from insitu.federated import FederationConfig, simulate
from insitu.workspace import Workspace

CONFIG = FederationConfig(sites=3, rounds=1, privacy="record", secure_aggregation=False)


def batchnorm_net(n_features: int) -> nn.Module:
    """A user's image module with BatchNorm (module level: picklable)."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10)
    )


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_digits(tmp_path_factory.mktemp("digits"))


def test_batchnorm_user_module_is_refused_before_any_site_starts(
    workspace: Workspace, digits: tuple[Path, Path]
) -> None:
    with pytest.raises(UsageError, match=r"\(BatchNorm2d\) cannot be trained with DP-SGD"):
        simulate(workspace, digits[0], CONFIG, schema=digits[1], model_fn=batchnorm_net)
    assert not (workspace.home / "sites").exists()


def test_cnn_on_a_table_is_refused(workspace: Workspace) -> None:
    config = FederationConfig(sites=3, rounds=1, model="cnn", secure_aggregation=False)
    with pytest.raises(UsageError, match=r"--model cnn takes array data"):
        simulate(workspace, builtin_data("adult"), config, schema=builtin_schema("adult"))


def test_a_table_schema_for_array_data_is_refused(
    workspace: Workspace, digits: tuple[Path, Path]
) -> None:
    with pytest.raises(UsageError, match=r"holds arrays, but the schema 'adult-income'"):
        simulate(workspace, digits[0], CONFIG, schema=builtin_schema("adult"))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_digits_cnn_trained_with_dp_across_three_sites_from_the_command_line(
    tmp_path: Path, digits: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "coord"
    assert run(["init", "--home", str(home)]) == 0
    capsys.readouterr()
    code = run(
        [
            "federate", "simulate", "--home", str(home), "--data", str(digits[0]),
            "-s", str(digits[1]), "--model", "cnn", "--sites", "3", "--rounds", "2",
            "--epsilon", "8", "--batch-size", "64", "--learning-rate", "2",
            "--server-optimizer", "fedavg", "--no-secure-aggregation", "--json",
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["private"]
    assert 0 < result["epsilon_run"] <= 8.0
    assert result["central_accuracy"] > 0.2  # ten classes: chance is 0.1
    model_dir = Path(result["model_dir"])
    features = json.loads((model_dir / "features.json").read_text())
    assert features["input"]["shape"] == [1, 8, 8]
    import onnx

    graph = onnx.load_from_string((model_dir / "model.onnx").read_bytes()).graph
    dims = [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [1, 8, 8]
    assert graph.output[0].name == "logits"
    ws = Workspace.open(home)
    with ws.ledger() as ledger:
        completed = [e.payload for e in ledger.entries(event_type="federation.completed")]
    assert completed[-1]["epsilon_run"] == pytest.approx(result["epsilon_run"])
    for site in result["sites"]:
        site_ws = Workspace.open(home / "sites" / site["site"])
        with site_ws.ledger() as ledger:
            spent = [e.payload for e in ledger.entries(event_type="privacy.spent")]
        assert {p["mechanism"] for p in spent} >= {"dp-sgd"}
    from insitu._ort import create_session

    session = create_session((model_dir / "model.onnx").read_bytes(), intra_op_threads=1)
    images = np.load(digits[0])["x"][:4].astype(np.float32)
    assert session.run(None, {"features": images})[0].shape == (4, 10)
    _served_predicts_and_explains_one_digit(tmp_path, model_dir, images[0])


def _served_predicts_and_explains_one_digit(
    tmp_path: Path, model_dir: Path, image: np.ndarray
) -> None:
    """The CLI-trained model, bundled, installed on a device, served: one digit over HTTP."""
    import io

    import httpx

    from insitu.serve import running
    from tests.serve.conftest import make_site

    site = make_site(tmp_path / "device", (model_dir / "model.onnx").read_bytes(), name="digits")
    buffer = io.BytesIO()
    np.save(buffer, image[None])
    npy = {"content-type": "application/x-npy"}
    with (
        running(site.workspace) as srv,
        httpx.Client(base_url=srv.url, headers=srv.headers, timeout=60) as http,
    ):
        predicted = http.post("/v1/models/digits/predict", content=buffer.getvalue(), headers=npy)
        assert predicted.status_code == 200, predicted.text
        explained = http.post("/v1/models/digits/explain", content=buffer.getvalue(), headers=npy)
        assert explained.status_code == 200, explained.text
        assert np.array(explained.json()["attributions"]).shape == (8, 8)
        heat_map = http.post(
            "/v1/models/digits/explain?format=png", content=buffer.getvalue(), headers=npy
        )
        assert heat_map.status_code == 200, heat_map.text
        assert heat_map.content[:8] == b"\x89PNG\r\n\x1a\n"
