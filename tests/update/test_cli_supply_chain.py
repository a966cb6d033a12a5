"""The supply chain through the ``insitu`` command, over a loopback HTTP repository."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from insitu.cli import run
from insitu.workspace import Workspace
from tests.bundle._models import fine_tune, mlp
from tests.update._http import serving

WIDTHS = [8, 16, 3]


def invoke(capsys, *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def invoke_json(capsys, *args: str):
    code, out, err = invoke(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def setup(tmp_path, capsys):
    publisher, device = str(tmp_path / "publisher"), str(tmp_path / "device")
    for home in (publisher, device):
        assert invoke(capsys, "init", "--home", home)[0] == 0
    base, weights = mlp(WIDTHS)
    (tmp_path / "model.onnx").write_bytes(base)
    (tmp_path / "model2.onnx").write_bytes(fine_tune(WIDTHS, weights, last_layer_only=True))
    # The publisher's ledger records how both were trained (a card may claim an epsilon
    # only for a model whose private training the ledger records).
    with Workspace.open(publisher).ledger() as ledger:
        for run, name in (("r1", "model.onnx"), ("r2", "model2.onnx")):
            ledger.record(
                "federation.completed",
                run=run,
                rounds=1,
                onnx_sha256=hashlib.sha256((tmp_path / name).read_bytes()).hexdigest(),
                epsilon_run=3.0,
                delta=1e-5,
                round_entries=[],
            )
    return tmp_path, publisher, device


def _create(capsys, tmp_path: Path, publisher: str, device: str, model: str, version: str):
    return invoke_json(
        capsys, "bundle", "create", str(tmp_path / model), "--name", "triage",
        "--version", version, "--out", str(tmp_path / f"triage-{version}.insb"),
        "--recipient", f"{device}/keys/encryption.pub.pem", "--metric", "auc=0.91",
        "--epsilon", "3", "--delta", "1e-5", "--home", publisher,
    )  # fmt: skip


def test_bundle_create_inspect_verify(setup, capsys):
    tmp_path, publisher, device = setup
    created = _create(capsys, tmp_path, publisher, device, "model.onnx", "1.0.0")
    provenance = created["card"]["provenance"]
    assert provenance["run"] == "r1"
    assert provenance["run_entry"]["type"] == "federation.completed"
    assert provenance["epsilon_recorded"] == 3.0
    assert created["card"]["provenance"]["node"] == Workspace.open(publisher).node_id
    assert created["payload"]["encrypted"] is True
    assert len(created["payload"]["recipients"]) == 2  # the device and the publisher
    path = str(tmp_path / "triage-1.0.0.insb")
    inspected = invoke_json(capsys, "bundle", "inspect", path)
    assert inspected["verified"] is False
    assert inspected["card"]["privacy"] == {"epsilon": 3.0, "delta": 1e-5, "accountant": "pld"}
    assert inspected["card"]["metrics"] == {"auc": 0.91}
    verified = invoke_json(capsys, "bundle", "verify", path, "--home", publisher)
    assert "decrypted model digest" in verified["verified"]
    code, out, _ = invoke(capsys, "bundle", "inspect", path)
    assert code == 0
    assert "not verified" in out
    with Workspace.open(publisher).ledger() as ledger:
        assert [e.type for e in ledger.entries(event_type="bundle.")] == ["bundle.created"]


def test_bundle_errors_are_one_line_with_the_fix(setup, capsys):
    tmp_path, publisher, device = setup
    code, _, err = invoke(
        capsys, "bundle", "create", str(tmp_path / "model.onnx"), "--version", "1.0.0",
        "--out", str(tmp_path / "x.insb"), "--home", publisher,
    )  # fmt: skip
    assert code == 2
    assert "--recipient" in err
    assert not (tmp_path / "x.insb").exists()
    _create(capsys, tmp_path, publisher, device, "model.onnx", "1.0.0")
    code, _, err = invoke(
        capsys, "bundle", "verify", str(tmp_path / "triage-1.0.0.insb"),
        "--publisher", f"{device}/keys/signing.pub.pem",
    )  # fmt: skip
    assert code == 1
    assert "not a trusted publisher key" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = invoke(capsys, "bundle", "inspect", str(tmp_path / "model.onnx"))
    assert (code, "not an insitu bundle" in err) == (1, True)


def test_publish_serve_update_rollback(setup, capsys):
    tmp_path, publisher, device = setup
    repo = str(tmp_path / "repo")
    init = invoke_json(capsys, "repo", "init", repo, "--home", publisher)
    assert init["roles"]["timestamp"]["version"] == 1
    _create(capsys, tmp_path, publisher, device, "model.onnx", "1.0.0")
    published = invoke_json(
        capsys, "repo", "publish", repo, str(tmp_path / "triage-1.0.0.insb"), "--home", publisher
    )
    assert published["pointers"] == ["channels/stable/triage.json"]
    with serving(Path(repo)) as url:
        enrolled = invoke_json(
            capsys, "update", "enroll", "--root", f"{repo}/public/metadata/1.root.json",
            "--url", url, "--model", "triage", "--home", device,
        )  # fmt: skip
        assert enrolled["channel"] == "stable"
        first = invoke_json(capsys, "update", "--home", device)
        assert (first["installed"], first["method"]) == ("1.0.0", "full")

        _create(capsys, tmp_path, publisher, device, "model2.onnx", "1.1.0")
        code, out, _ = invoke(capsys, "update", "--check", "--home", device)
        assert code == 0
        assert "1.0.0 is up to date" in out
        second = invoke_json(
            capsys, "repo", "publish", repo, str(tmp_path / "triage-1.1.0.insb"),
            "--home", publisher,
        )  # fmt: skip
        assert "1.0.0" in second["deltas"]
        code, out, _ = invoke(capsys, "update", "--check", "--home", device)
        assert "1.1.0 is available" in out
        update = invoke_json(capsys, "update", "--home", device)
        assert (update["installed"], update["method"]) == ("1.1.0", "delta")
        code, out, _ = invoke(capsys, "update", "--home", device)
        assert code == 0
        assert "up to date" in out

    rolled = invoke_json(capsys, "rollback", "--home", device)
    assert (rolled["active"], rolled["was"]) == ("1.0.0", "1.1.0")
    status = invoke_json(capsys, "update", "status", "--home", device)
    assert status["active"]["version"] == "1.0.0"
    assert status["previous"]["version"] == "1.1.0"
    repo_status = invoke_json(capsys, "repo", "status", repo)
    assert repo_status["pointers"] == {"channels/stable/triage.json": "1.1.0"}
    assert (
        invoke_json(capsys, "repo", "timestamp", repo, "--home", publisher)["timestamp_version"]
        == repo_status["roles"]["timestamp"]["version"] + 1
    )

    with Workspace.open(device).ledger() as ledger:
        types = [e.type for e in ledger.entries(event_type="update.")]
    assert types.count("update.installed") == 2
    assert "update.downloaded" in types
    assert types[-1] == "update.rolled_back"
    with Workspace.open(publisher).ledger() as ledger:
        assert len(ledger.entries(event_type="repo.published")) == 2


def test_update_before_enrolling_says_how(setup, capsys):
    _, _, device = setup
    code, _, err = invoke(capsys, "update", "--home", device)
    assert code == 1
    assert "insitu update enroll" in err


def test_tuf_conformance_client_protocol(setup, capsys):
    tmp_path, publisher, device = setup
    repo = str(tmp_path / "repo")
    invoke_json(capsys, "repo", "init", repo, "--home", publisher)
    _create(capsys, tmp_path, publisher, device, "model.onnx", "1.0.0")
    invoke_json(
        capsys, "repo", "publish", repo, str(tmp_path / "triage-1.0.0.insb"), "--home", publisher
    )
    metadata, targets = str(tmp_path / "tuf-md"), tmp_path / "tuf-targets"
    root = f"{repo}/public/metadata/1.root.json"
    assert invoke(capsys, "update", "tuf-client", "--metadata-dir", metadata, "init", root)[0] == 0
    with serving(Path(repo)) as url:
        client = ["update", "tuf-client", "--metadata-dir", metadata,
                  "--metadata-url", f"{url}/metadata"]  # fmt: skip
        assert invoke(capsys, *client, "refresh")[0] == 0
        assert (Path(metadata) / "timestamp.json").exists()
        download = [*client, "--target-base-url", f"{url}/targets", "--target-dir", str(targets)]
        name = "channels/stable/triage.json"
        assert invoke(capsys, *download, "--target-name", name, "download")[0] == 0
        assert json.loads(next(targets.iterdir()).read_bytes())["version"] == "1.0.0"
        assert invoke(capsys, *download, "--target-name", name, "download")[0] == 0  # cached
        assert invoke(capsys, *download, "--target-name", "no/such.bin", "download")[0] == 1
    code, _, err = invoke(capsys, *client, "refresh")  # the server is gone
    assert code == 1
    assert "cannot be reached" in err


def test_tuf_client_downloads_each_target_name_in_order_with_one_updater(
    setup, capsys, monkeypatch
):
    # The protocol repeats --target-name; each is required, in order, on one updater.
    from insitu.update import _conformance

    tmp_path, publisher, device = setup
    repo = str(tmp_path / "repo")
    invoke_json(capsys, "repo", "init", repo, "--home", publisher)
    _create(capsys, tmp_path, publisher, device, "model.onnx", "1.0.0")
    invoke_json(
        capsys, "repo", "publish", repo, str(tmp_path / "triage-1.0.0.insb"), "--home", publisher
    )
    made, downloaded = [], []

    class Recording(_conformance.Updater):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def download_target(self, targetinfo, *args, **kwargs):
            downloaded.append(targetinfo.path)
            return super().download_target(targetinfo, *args, **kwargs)

    monkeypatch.setattr(_conformance, "Updater", Recording)
    metadata, targets = str(tmp_path / "tuf-md"), tmp_path / "tuf-targets"
    root = f"{repo}/public/metadata/1.root.json"
    assert invoke(capsys, "update", "tuf-client", "--metadata-dir", metadata, "init", root)[0] == 0
    names = ["channels/stable/triage.json", "bundles/triage/1.0.0.insb"]
    with serving(Path(repo)) as url:
        download = ["update", "tuf-client", "--metadata-dir", metadata,
                    "--metadata-url", f"{url}/metadata", "--target-base-url", f"{url}/targets",
                    "--target-dir", str(targets)]  # fmt: skip
        args = [*download, "--target-name", names[0], "--target-name", names[1], "download"]
        assert invoke(capsys, *args)[0] == 0
        assert (len(made), downloaded) == (1, names)
        files = {p.name: p.read_bytes() for p in targets.iterdir()}
        assert json.loads(files["channels%2Fstable%2Ftriage.json"])["version"] == "1.0.0"
        bundle = (tmp_path / "triage-1.0.0.insb").read_bytes()
        assert files["bundles%2Ftriage%2F1.0.0.insb"] == bundle
        # A target the metadata does not list fails the command, after the ones before it.
        made.clear()
        downloaded.clear()
        (targets / "bundles%2Ftriage%2F1.0.0.insb").unlink()
        code, _, err = invoke(
            capsys, *download, "--target-name", names[1], "--target-name", "no/such.bin",
            "download",
        )  # fmt: skip
        assert code == 1
        assert "no/such.bin is not in the repository's metadata" in err
        assert (len(made), downloaded) == (1, names[1:])
        code, _, err = invoke(capsys, *download, "download")
        assert (code, "--target-name is required" in err) == (2, True)


def test_help_texts_have_examples(capsys):
    for group in (["bundle", "create"], ["repo", "publish"], ["update"], ["rollback"]):
        code, out, _ = invoke(capsys, *group, "--help")
        assert code == 0
        assert "insitu" in out


def test_repo_publishers_add_and_revoke(setup, capsys):
    tmp_path, publisher, device = setup
    repo = str(tmp_path / "repo")
    invoke_json(capsys, "repo", "init", repo, "--home", publisher)
    before = invoke_json(capsys, "repo", "publishers", repo)
    assert before["root_version"] == 1
    (old,) = before["publishers"]
    after = invoke_json(
        capsys, "repo", "publishers", repo, "--add", f"{device}/keys/signing.pub.pem",
        "--remove", old, "--home", publisher,
    )  # fmt: skip
    assert after["root_version"] == 2
    assert old not in after["publishers"]
    assert len(after["publishers"]) == 1
    code, _, err = invoke(capsys, "repo", "publishers", repo, "--remove", "nope")
    assert code == 2
    assert "no publisher with key id" in err


def test_tuf_client_refuses_a_rolled_back_timestamp_and_keeps_its_metadata(setup, capsys):
    import datetime as dt
    import shutil

    from tests.update.conftest import frozen_at

    tmp_path, publisher, device = setup
    repo = tmp_path / "repo"
    invoke_json(capsys, "repo", "init", str(repo), "--home", publisher)
    old_timestamp = (repo / "public/metadata/timestamp.json").read_bytes()
    _create(capsys, tmp_path, publisher, device, "model.onnx", "1.0.0")
    invoke_json(capsys, "repo", "publish", str(repo), str(tmp_path / "triage-1.0.0.insb"),
                "--home", publisher)  # fmt: skip
    metadata = tmp_path / "tuf-md"
    invoke(capsys, "update", "tuf-client", "--metadata-dir", str(metadata), "init",
           str(repo / "public/metadata/1.root.json"))  # fmt: skip
    with serving(repo) as url:
        client = ["update", "tuf-client", "--metadata-dir", str(metadata),
                  "--metadata-url", f"{url}/metadata"]  # fmt: skip
        assert invoke(capsys, *client, "refresh")[0] == 0
        trusted = {p.name: p.read_bytes() for p in metadata.glob("*.json")}
        new_timestamp = (repo / "public/metadata/timestamp.json").read_bytes()
        (repo / "public/metadata/timestamp.json").write_bytes(old_timestamp)  # rollback
        code, _, err = invoke(capsys, *client, "refresh")
        assert (code, "older than the trusted version" in err) == (1, True)
        assert {p.name: p.read_bytes() for p in metadata.glob("*.json")} == trusted
        (repo / "public/metadata/timestamp.json").write_bytes(new_timestamp)
        with frozen_at(dt.datetime.now(dt.UTC) + dt.timedelta(days=3)):  # freeze
            code, _, err = invoke(capsys, *client, "refresh")
        assert (code, "expired" in err) == (1, True)
        assert {p.name: p.read_bytes() for p in metadata.glob("*.json")} == trusted
    shutil.rmtree(metadata)


def test_bundle_create_no_encrypt_warns(setup, capsys):
    tmp_path, publisher, _ = setup
    code, out, err = invoke(
        capsys, "bundle", "create", str(tmp_path / "model.onnx"), "--version", "1.0.0",
        "--out", str(tmp_path / "plain.insb"), "--no-encrypt", "--home", publisher,
        "--epsilon", "3", "--delta", "1e-5",
    )  # fmt: skip
    assert code == 0
    assert "NOT encrypted" in err
    assert "not encrypted" in out
    assert (tmp_path / "model.onnx").read_bytes() in (tmp_path / "plain.insb").read_bytes()


def test_repo_rotate_replaces_key_files_and_devices_follow(setup, capsys):
    tmp_path, publisher, device = setup
    repo = tmp_path / "repo"
    invoke_json(capsys, "repo", "init", str(repo), "--home", publisher)
    _create(capsys, tmp_path, publisher, device, "model.onnx", "1.0.0")
    invoke_json(capsys, "repo", "publish", str(repo), str(tmp_path / "triage-1.0.0.insb"),
                "--home", publisher)  # fmt: skip
    with serving(repo) as url:
        invoke_json(capsys, "update", "enroll", "--root", f"{repo}/public/metadata/1.root.json",
                    "--url", url, "--model", "triage", "--home", device)  # fmt: skip
        invoke_json(capsys, "update", "--home", device)
        rotated = invoke_json(capsys, "repo", "rotate", str(repo), "root", "--home", publisher)
        assert rotated["roles"]["root"]["version"] == 2
        assert sorted(p.name for p in (repo / "keys").glob("root-*.key")) == ["root-2.key"]
        _create(capsys, tmp_path, publisher, device, "model2.onnx", "1.1.0")
        invoke_json(capsys, "repo", "publish", str(repo), str(tmp_path / "triage-1.1.0.insb"),
                    "--home", publisher)  # fmt: skip
        assert invoke_json(capsys, "update", "--home", device)["installed"] == "1.1.0"
    assert (Path(device) / "update/metadata/root_history/2.root.json").exists()


def test_bundle_card_names_the_federated_run_and_its_epsilon(setup, capsys):
    import hashlib

    tmp_path, publisher, device = setup
    model = (tmp_path / "model.onnx").read_bytes()
    with Workspace.open(publisher).ledger() as ledger:
        rounds = [
            ledger.record("federation.round", run="r7", round=n, epsilon_max=eps).seq
            for n, eps in ((1, 1.5), (2, 3.0))
        ]
        ledger.record("federation.completed", run="r7", rounds=2, round_entries=rounds,
                      onnx_sha256=hashlib.sha256(model).hexdigest())  # fmt: skip
    base = ["bundle", "create", str(tmp_path / "model.onnx"), "--version", "1.0.0",
            "--out", str(tmp_path / "r7.insb"), "--recipient",
            f"{device}/keys/encryption.pub.pem", "--home", publisher]  # fmt: skip
    code, _, err = invoke(capsys, *base, "--epsilon", "1", "--delta", "1e-5")
    assert code == 1  # UnderstatedPrivacyError: a refusal, not a usage error
    assert "may not understate" in err
    assert not (tmp_path / "r7.insb").exists()
    card = invoke_json(capsys, *base, "--epsilon", "3", "--delta", "1e-5")["card"]
    assert card["provenance"]["run"] == "r7"
    assert [r["seq"] for r in card["provenance"]["training_rounds"]] == rounds
    assert card["provenance"]["epsilon_recorded"] == 3.0
