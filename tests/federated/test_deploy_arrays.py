"""A deployed federation on images: the CNN over ``insitu federate server`` and ``site``.

The plan carries the run's input (kind, shape, value range, classes: typed, read back
field by field), the server builds the CNN of that shape, and each site prepares its
own ``.npz`` under the array schema and trains on it as a table's rows. A site whose
records have another shape than the run's refuses the run: one line, exit 1, and the
others finish without it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from insitu.cli import run
from insitu.data import ArraySchema
from insitu.datasets import write_digits
from insitu.errors import FederationError
from insitu.federated import FederationConfig
from insitu.federated._apps import site_client
from insitu.federated._certs import FederationCerts, make_certs
from insitu.federated._plan import ArrayInput, RunPlan, SharedPlan, SiteSetup, refusals_dir
from insitu.workspace import Workspace

from .test_deploy import INSITU, free_port, one_error_line
from .test_deploy_faults import _finish, _server

SITES = ("hospital-a", "hospital-b", "hospital-c")


def _digits_input(shape: tuple[int, ...] = (1, 8, 8)) -> ArrayInput:
    return ArrayInput("images", shape, (0.0, 16.0), tuple("0123456789"), "0" * 64)


def _shared(shape: tuple[int, ...] = (1, 8, 8)) -> SharedPlan:
    return SharedPlan(
        run_id="r",
        config=FederationConfig(sites=3, model="cnn"),
        dataset="digits",
        schema_sha256="1" * 64,
        n_features=int(np.prod(shape)),
        site_noise_multiplier=0.0,
        array_input=_digits_input(shape),
    )


def test_an_array_runs_plan_carries_its_input_typed(tmp_path: Path) -> None:
    shared = _shared()
    back = SharedPlan.loads(shared.dumps())
    assert back == shared
    assert back.array_input is not None
    assert back.array_input.shape == (1, 8, 8)  # a tuple again, not JSON's list
    plan = RunPlan(
        shared=shared,
        home=tmp_path,
        run_dir=tmp_path / "run",
        feature_names=("x_0",),
        schema_source={},
        sites_registered=SITES,
        array_schema_source={"arrays": {"shape": [1, 8, 8]}},
    )
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_json()))
    assert RunPlan.read(tmp_path) == plan
    bad = shared.to_json() | {"input": _digits_input().to_json() | {"shape": [1, "8", 8]}}
    with pytest.raises(FederationError, match="input shape"):
        SharedPlan.from_json(bad)
    flat = shared.to_json() | {"input": _digits_input().to_json() | {"shape": [64]}}
    with pytest.raises(FederationError, match=r"input is images of shape \[64\]"):
        SharedPlan.from_json(flat)


def test_attack_a_run_id_that_is_a_path_is_refused_before_a_site_names_a_file() -> None:
    # Sites name their markers, refusals and privacy events after the run id.
    planted = _shared().to_json() | {"run_id": "../../.ssh/authorized_keys"}
    with pytest.raises(FederationError, match="is not a run id"):
        SharedPlan.from_json(planted)


def test_a_site_refuses_a_run_whose_records_have_another_shape(tmp_path: Path) -> None:
    ws, _ = Workspace.init(tmp_path / "site", name="site")
    setup = SiteSetup(
        "hospital-c", "digits", "1" * 64, tmp_path / "train", tmp_path / "test", _digits_input()
    )
    ws.site_setup_path.parent.mkdir(exist_ok=True)
    ws.site_setup_path.write_text(json.dumps(setup.to_json()))
    context = SimpleNamespace(
        node_config={"insitu-home": str(ws.home)}, run_config={"insitu": _shared((3, 8, 8)).dumps()}
    )
    expected = (
        r"run r takes records of shape \(3, 8, 8\) \(C, H, W\), this site prepared .*\(1, 8, 8\)"
    )
    with pytest.raises(FederationError, match=expected):
        site_client(context)  # type: ignore[arg-type]
    # The ClientApp leaves why for the site's own process, which stops saying it.
    assert "(1, 8, 8)" in (refusals_dir(ws.home) / "r").read_text()


def test_a_cnn_over_a_table_schema_is_refused_before_anything_starts(
    tmp_path: Path, schema_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = make_certs(tmp_path / "certs", sites=list(SITES))
    ws, _ = Workspace.init(tmp_path / "srv", name="srv")
    command = ["federate", "server", "--home", str(ws.home), "-s", str(schema_file)]
    code = run([*command, "--certs", str(certs.directory), "--model", "cnn"])
    assert code == 2
    assert "--model cnn takes array data" in one_error_line(capsys.readouterr().err)
    assert not (ws.home / "federation").exists()  # nothing written, nothing started


def _sites(
    tmp_path: Path, schema: Path, certs: FederationCerts, address: str, data: dict[str, Path]
) -> dict[str, subprocess.Popen[bytes]]:
    return {
        name: subprocess.Popen(
            [
                INSITU,
                "federate",
                "site",
                "--home",
                str(tmp_path / name),
                "--data",
                str(data[name]),
                "-s",
                str(schema if name != "hospital-c" else tmp_path / "wide.schema.toml"),
                "--ca",
                str(certs.ca),
                "--key",
                str(certs.site_key(name)),
                "--server",
                address,
                "--retries",
                "6",
                "--once",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name in SITES
    }


def _split_digits(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """The digits schema, and each site's .npz: hospital-c's records have two channels."""
    npz, schema = write_digits(tmp_path / "digits")
    with np.load(npz) as digits:
        x, y = digits["x"], digits["y"]
    data = {}
    for index, name in enumerate(SITES):
        part = slice(index * 600, (index + 1) * 600)
        records = x[part] if name != "hospital-c" else np.repeat(x[part], 2, axis=1)
        data[name] = tmp_path / f"{name}.npz"
        np.savez(data[name], x=records, y=y[part])
    wide = schema.read_text().replace("shape = [1, 8, 8]", "shape = [2, 8, 8]")
    (tmp_path / "wide.schema.toml").write_text(wide)
    return schema, data


@pytest.mark.slow
def test_three_sites_train_the_cnn_on_digits_and_a_site_of_another_shape_refuses(
    tmp_path: Path,
) -> None:
    schema, data = _split_digits(tmp_path)
    certs = make_certs(tmp_path / "certs", sites=list(SITES))
    address = f"127.0.0.1:{free_port()}"
    Workspace.init(tmp_path / "server", name="server")
    server = _server(
        tmp_path, schema, certs, address, "--model", "cnn", "--rounds", "1", "--epsilon", "8"
    )
    procs = _sites(tmp_path, schema, certs, address, data)
    try:
        out, err = server.communicate(timeout=600)
        assert server.returncode == 0, err.decode()[-3000:]
        results = {name: p.communicate(timeout=120) for name, p in procs.items()}
    finally:
        _finish(server, *procs.values())

    # The site of another shape refused, in one line, and stopped with exit 1.
    assert procs["hospital-c"].returncode == 1
    line = one_error_line(results["hospital-c"][1].decode())
    assert "takes records of shape (1, 8, 8) (C, H, W)" in line
    assert "prepared records of shape (2, 8, 8)" in line
    with Workspace.open(tmp_path / "hospital-c").ledger() as ledger:
        assert not ledger.entries(event_type="privacy.spent")

    # The others trained the CNN through SecAgg+, as a table's sites do.
    result = json.loads(out)
    (only,) = result["rounds"]
    assert (only["sites_ok"], only["sites_evaluated"]) == (2, 2)
    assert set(only["missing"]) == {"hospital-c"}
    assert only["accuracy"] is not None
    with Workspace.open(tmp_path / "server").ledger() as ledger:
        kinds = [e.type for e in ledger.entries() if e.type.startswith("federation.")]
        assert kinds == [
            "federation.sites_registered",
            "federation.started",
            "federation.round",
            "federation.checkpointed",
            "federation.completed",
        ]
        (started,) = ledger.entries(event_type="federation.started")
        assert started.payload["model"] == "cnn"
        ledger.verify()
    for name in ("hospital-a", "hospital-b"):
        assert procs[name].returncode == 0, results[name][1].decode()[-2000:]
        with Workspace.open(tmp_path / name).ledger() as ledger:
            spent = [e.payload["mechanism"] for e in ledger.entries(event_type="privacy.spent")]
            assert spent == ["dp-sgd", "evaluation"]
            assert len(ledger.entries(event_type="federation.site_round")) == 1
            assert len(ledger.entries(event_type="federation.egress")) > 0
            ledger.verify()

    # The model takes raw 8x8 images and answers in the declared classes.
    model_dir = Path(result["model_dir"])
    features = json.loads((model_dir / "features.json").read_text())
    assert features["input"]["shape"] == [1, 8, 8]
    assert ArraySchema.from_dict(features["array_schema"]).label_names == tuple("0123456789")
    session = ort.InferenceSession(str(model_dir / "model.onnx"))
    with np.load(data["hospital-a"]) as digits:
        images = digits["x"][:32].astype(np.float32)
    (scores,) = session.run(None, {"features": images})
    assert scores.shape == (32, 10)
