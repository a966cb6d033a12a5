"""insitu finetune: DP-SGD charged to the site budget, installed only when better."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from insitu.cli import run
from insitu.finetune import finetune, local_start_weights
from insitu.update import UpdateClient
from insitu.update._client import is_local_version
from insitu.workspace._config import load_config, save_config
from tests._adult import N_INPUTS

from ._device import NAME, Device, accuracy_of_active, build_device, prepared_holdout


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Device:
    return build_device(tmp_path_factory.mktemp("template"))


@pytest.fixture
def device(template: Device, tmp_path: Path) -> Device:
    return template.copy(tmp_path)


def _entries(device: Device, event_type: str) -> list[dict]:
    with device.workspace().ledger() as ledger:
        return [e.payload for e in ledger.entries(event_type=event_type)]


def test_finetune_installs_a_better_local_version_and_never_a_worse_one(device: Device) -> None:
    held = prepared_holdout(device)
    before = accuracy_of_active(device, held)
    result = finetune(device.workspace(), NAME, device.data, epsilon=1.0)
    assert result.installed
    assert result.version == "1.0.1-local.1"
    assert is_local_version(result.version)
    # Measured independently, on the active slot as the runtime would load it.
    after = accuracy_of_active(device, held)
    assert after == pytest.approx(result.accuracy_finetuned)
    assert after > before
    assert result.accuracy_installed == pytest.approx(before)
    installed = _entries(device, "finetune.installed")
    assert [e["version"] for e in installed] == ["1.0.1-local.1"]
    assert installed[0]["offered_as_start"] is True
    spent = [e for e in _entries(device, "privacy.spent") if e["mechanism"] == "finetune"]
    assert len(spent) == 1
    assert spent[0]["dataset"] == device.schema.name
    weights = local_start_weights(device.workspace(), NAME)
    assert weights is not None
    assert [w.shape for w in weights] == [(1, N_INPUTS), (1,)]

    # A destructive fine-tuning (huge steps, heavy noise) is worse: it is not installed.
    state = device.state()
    worse = finetune(device.workspace(), NAME, device.data, epsilon=0.05, learning_rate=200.0)
    assert not worse.installed
    assert worse.accuracy_finetuned <= worse.accuracy_installed
    assert device.state() == state
    assert accuracy_of_active(device, held) == pytest.approx(after)
    assert _entries(device, "finetune.rejected")[0]["base_version"] == "1.0.1-local.1"


def test_finetune_refuses_when_the_budget_would_be_exceeded(
    device: Device, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = device.workspace()
    config = load_config(ws.config_path)
    config.sections["privacy"] = {"epsilon_budget": 0.5}
    save_config(ws.config_path, config)
    state = device.state()
    capsys.readouterr()
    code = run(["finetune", NAME, "--data", str(device.data), "--home", str(device.home)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1
    assert "budget" in err
    assert device.state() == state
    refused = _entries(device, "privacy.budget_refused")
    assert refused[0]["mechanism"] == "finetune"
    assert not _entries(device, "finetune.installed")


def _bad_input(device: Device, tmp_path: Path, kind: str) -> Path:
    frame = pd.read_csv(device.data)
    if kind == "columns":
        frame = frame.drop(columns=["age"])
    elif kind == "empty":
        frame = frame.iloc[:0]
    elif kind == "single-class":
        frame = frame[frame[device.schema.label] == "<=50K"]
    path = tmp_path / f"{kind}.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("kind", "words"),
    [("columns", "'age'"), ("empty", "empty"), ("single-class", "single class")],
)
def test_bad_local_data_is_one_line_exit_1_and_nothing_installed(
    device: Device, tmp_path: Path, kind: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _bad_input(device, tmp_path, kind)
    state = device.state()
    spent = _entries(device, "privacy.spent")
    capsys.readouterr()
    code = run(["finetune", NAME, "--data", str(path), "--home", str(device.home)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1, err
    assert words in err
    assert device.state() == state
    assert _entries(device, "privacy.spent") == spent  # nothing charged either


def test_finetune_cli_json_and_a_local_version_verifies_only_with_the_device_key(
    device: Device, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    capsys.readouterr()
    home = str(device.home)
    assert run(["finetune", NAME, "--data", str(device.data), "--home", home, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["installed"] is True
    client: UpdateClient = device.client()
    bundle, _ = client.session()  # a local version verifies with the device's own key
    assert bundle.version == doc["version"]
    without_local_key = UpdateClient(
        device.home / "update", device_key=device.workspace().encryption_key()
    )
    with pytest.raises(Exception, match="publisher"):
        without_local_key.session()


def test_a_local_version_is_not_a_rollback_and_the_next_release_replaces_it(
    device: Device,
) -> None:
    import threading

    from insitu.bundle import bundle_model
    from insitu.training import build_model, export_onnx
    from insitu.update import open_directory_repository
    from insitu.update._serve import make_server
    from insitu.workspace import Workspace

    assert finetune(device.workspace(), NAME, device.data).installed
    server = make_server(device.base / "repository", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        update_dir = device.home / "update"
        url = f"http://127.0.0.1:{server.server_address[1]}"
        UpdateClient.enroll(
            update_dir, root=(update_dir / "root.json").read_bytes(), url=url, model=NAME
        )
        ws = device.workspace()
        with ws.ledger() as ledger:
            client = UpdateClient(
                update_dir,
                device_key=ws.encryption_key(),
                ledger=ledger,
                local_publisher=ws.signing_public_key,
            )
            # The repository still offers 1.0.0: older than 1.0.1-local.1, not a rollback.
            assert client.update()["status"] == "local"
            coordinator = Workspace.open(device.base / "coordinator")
            blob, _ = bundle_model(
                coordinator,
                export_onnx(build_model("logistic", N_INPUTS), N_INPUTS),
                name=NAME,
                version="1.0.1",
                recipients=[ws.encryption_public_key],
            )
            with coordinator.ledger() as coordinator_ledger:
                open_directory_repository(device.base / "repository").publish(
                    blob,
                    channels=["stable"],
                    devices=[],
                    publisher_key=coordinator.encryption_key(),
                    max_deltas=0,
                    ledger=coordinator_ledger,
                )
            assert client.update()["installed"] == "1.0.1"
    finally:
        server.shutdown()
        server.server_close()


def test_local_version_names_are_only_made_on_devices() -> None:
    assert is_local_version("1.0.1-local.3")
    assert not is_local_version("1.0.1")
    assert not is_local_version("1.0.1-rc.1")
