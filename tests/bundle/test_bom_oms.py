"""The evidence a bundle carries for other tools: a CycloneDX 1.6 ML-BOM, an OMS signature.

The BOM must validate against the CycloneDX 1.6 JSON schema and state the figures the
ledger records; ``model_signing verify`` (the package's own command, run as a process
from this venv) must accept an exported bundle's model and refuse it after one byte
changed, or with a signature made by another node's key. A device reads the BOM without
the ``sign`` extra; a publisher without it is told in one line what to install.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from insitu.audit import events
from insitu.bundle import Bundle, BundleVerifier, bundle_model, export_bundle, verified_bom
from insitu.cli import run
from insitu.errors import MissingDependencyError, UntrustedPublisherError, UsageError
from insitu.workspace import Workspace
from tests.bundle._models import mlp
from tests.cli._device import blocked_python

MODEL_SIGNING = str(Path(sys.executable).parent / "model_signing")
SCHEMA = "ab" * 32
FIGURES = {"central_accuracy": 0.8312, "auc": 0.5174, "auc_ci": [0.4981, 0.5362], "bound": 0.412}


def _record_run(ws: Workspace, model: bytes) -> None:
    """What a private federated run and its audits leave in the coordinator's ledger."""
    digest = hashlib.sha256(model).hexdigest()
    with ws.ledger() as ledger:
        events.FEDERATION_STARTED.record(
            ledger, run="r1", dataset="adult", schema_sha256=SCHEMA, site_names=["a", "b", "c"]
        )
        events.FEDERATION_COMPLETED.record(
            ledger,
            run="r1",
            rounds=3,
            central_accuracy=FIGURES["central_accuracy"],
            model_sha256="00" * 32,
            onnx_sha256=digest,
            epsilon_run=2.5,
            delta=1e-5,
            round_entries=[],
        )
        events.PRIVACY_AUDIT.record(
            ledger,
            run="r1",
            model="mlp",
            onnx_sha256=digest,
            members=500,
            non_members=500,
            attacks=[
                {"attack": "loss", "auc": FIGURES["auc"], "auc_ci": FIGURES["auc_ci"]},
                {"attack": "lira", "auc": 0.5011, "auc_ci": [0.48, 0.52]},
            ],
            violation=False,
        )
        events.PRIVACY_ONE_RUN_AUDIT.record(
            ledger,
            run="r1",
            claimed_epsilon=2.5,
            delta=1e-5,
            canaries=1000,
            guesses=100,
            correct=60,
            epsilon_lower_bound=FIGURES["bound"],
            flagged=False,
        )


@pytest.fixture
def published(workspace: Workspace, tmp_path: Path) -> tuple[Workspace, bytes, Path]:
    """A publisher whose ledger records a model's run and audits, and its bundle file."""
    model = mlp([8, 16, 3])[0]
    _record_run(workspace, model)
    blob, _ = bundle_model(
        workspace,
        model,
        name="mlp",
        version="1.0.0",
        recipients=[workspace.encryption_public_key],
        metrics={"accuracy": 0.83},
        epsilon=2.5,
        delta=1e-5,
        data_schema_sha256=SCHEMA,
    )
    path = tmp_path / "mlp-1.0.0.insb"
    path.write_bytes(blob)
    return workspace, model, path


def test_the_bom_validates_against_cyclonedx_1_6_and_its_figures_equal_the_ledgers(published):
    ws, model, path = published
    bundle = Bundle.parse(path.read_bytes())
    bom, raw = verified_bom(bundle, BundleVerifier([ws.signing_public_key]))
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(raw.decode()) is None
    assert bom["specVersion"] == "1.6"
    subject = bom["metadata"]["component"]
    assert subject["type"] == "machine-learning-model"
    assert {h["alg"]: h["content"] for h in subject["hashes"]}["SHA-256"] == (
        hashlib.sha256(model).hexdigest()
    )
    with ws.ledger() as ledger:
        completed = ledger.entries(event_type="federation.completed")[0].payload
        audit = ledger.entries(event_type="privacy.audit")[0].payload
        one_run = ledger.entries(event_type="privacy.one_run_audit")[0].payload
    accuracy = {
        m["slice"]: float(m["value"]) for m in _metrics_list(bom) if m["type"] == "accuracy"
    }
    assert accuracy == {
        "as stated in the model card": bundle.card.metrics["accuracy"],
        "central evaluation recorded at the end of the federated run": (
            completed["central_accuracy"]
        ),
    }
    metrics = {m["type"]: m for m in _metrics_list(bom)}
    assert bundle.card.privacy is not None
    assert float(metrics["epsilon"]["value"]) == completed["epsilon_run"]
    assert float(metrics["epsilon"]["value"]) == bundle.card.privacy["epsilon"]
    assert float(metrics["delta"]["value"]) == completed["delta"]
    auc = metrics["membership-inference-auc"]
    assert float(auc["value"]) == audit["attacks"][0]["auc"]  # the strongest attack
    assert [float(auc["confidenceInterval"][k]) for k in ("lowerBound", "upperBound")] == (
        audit["attacks"][0]["auc_ci"]
    )
    bound = metrics["epsilon-lower-bound-one-run-audit"]
    assert float(bound["value"]) == one_run["epsilon_lower_bound"]
    data = next(c for c in bom["components"] if c["type"] == "data")
    properties = {p["name"]: p["value"] for p in data["data"][0]["contents"]["properties"]}
    assert properties["insitu:data_schema_sha256"] == SCHEMA
    assert data["name"] == "adult"
    libraries = {c["name"]: c["version"] for c in bom["components"] if c["type"] == "library"}
    import numpy
    import onnxruntime

    assert libraries["onnxruntime"] == onnxruntime.__version__
    assert libraries["numpy"] == numpy.__version__
    dependencies = {d["ref"]: d.get("dependsOn", []) for d in bom["dependencies"]}
    assert "pkg:onnxruntime" in dependencies["model"]


def _metrics_list(bom: dict) -> list[dict]:
    card = bom["metadata"]["component"]["modelCard"]
    return list(card["quantitativeAnalysis"]["performanceMetrics"])


def test_insitu_bundle_bom_writes_the_signed_bytes_and_prints_json(published, tmp_path, capsys):
    ws, _, path = published
    out = tmp_path / "bom.cdx.json"
    capsys.readouterr()
    assert run(["bundle", "bom", str(path), "--out", str(out), "--home", str(ws.home)]) == 0
    signed = Bundle.parse(path.read_bytes()).signed["files"]["bom.json"]
    assert hashlib.sha256(out.read_bytes()).hexdigest() == signed["sha256"]
    capsys.readouterr()
    assert run(["bundle", "bom", str(path), "--json", "--home", str(ws.home)]) == 0
    assert json.loads(capsys.readouterr().out)["bomFormat"] == "CycloneDX"


def test_a_device_reads_the_bom_without_the_sign_extra(published, tmp_path):
    ws, _, path = published
    command = blocked_python(tmp_path, sys.executable)
    proc = subprocess.run(
        [*command, "bundle", "bom", str(path), "--json", "--home", str(ws.home)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["specVersion"] == "1.6"


def _export(ws: Workspace, path: Path, out: Path) -> None:
    assert run(["bundle", "export", str(path), "--out", str(out), "--home", str(ws.home)]) == 0


def _oms_verify(directory: Path, key: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            MODEL_SIGNING, "verify", "key", "--signature", str(directory / "model.sig"),
            "--public_key", str(key), str(directory),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )  # fmt: skip


def test_model_signing_verify_accepts_an_exported_bundle(published, tmp_path):
    ws, model, path = published
    out = tmp_path / "exported"
    _export(ws, path, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "bom.json", "card.json", "model.onnx", "model.sig", "oms.pub.pem",
    ]  # fmt: skip
    assert (out / "model.onnx").read_bytes() == model
    assert (out / "oms.pub.pem").read_bytes() == ws.model_signing_public_pem()
    proc = _oms_verify(out, out / "oms.pub.pem")
    assert proc.returncode == 0, proc.stderr
    assert "Verification succeeded" in proc.stdout


def test_attack_one_byte_changed_model_fails_oms_verify(published, tmp_path):
    ws, _, path = published
    out = tmp_path / "exported"
    _export(ws, path, out)
    model = bytearray((out / "model.onnx").read_bytes())
    model[len(model) // 2] ^= 0x01
    (out / "model.onnx").write_bytes(bytes(model))
    proc = _oms_verify(out, out / "oms.pub.pem")
    assert proc.returncode == 1
    assert "Hash mismatch for 'model.onnx'" in proc.stderr


def test_attack_signature_by_another_nodes_key_is_rejected(published, tmp_path):
    ws, model, path = published
    other, _ = Workspace.init(tmp_path / "other")
    blob, _ = bundle_model(other, model, name="mlp", version="1.0.0", encrypt=False)
    other_path = tmp_path / "other.insb"
    other_path.write_bytes(blob)
    theirs = tmp_path / "theirs"
    _export(other, other_path, theirs)
    ours = tmp_path / "publisher-oms.pub.pem"
    assert run(["bundle", "oms-key", "--out", str(ours), "--home", str(ws.home)]) == 0
    # The other node's signature over the same model, checked with the publisher's key.
    proc = _oms_verify(theirs, ours)
    assert proc.returncode == 1
    assert "Key mismatch" in proc.stderr
    # Its signature planted beside the publisher's own export does not pass either.
    mine = tmp_path / "mine"
    _export(ws, path, mine)
    (mine / "model.sig").write_bytes((theirs / "model.sig").read_bytes())
    assert _oms_verify(mine, ours).returncode == 1


def test_the_model_signing_key_is_sealed_and_its_fingerprint_is_in_the_ledger(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("INSITU_PASSPHRASE", "correct horse")
    ws, _ = Workspace.init(tmp_path / "home")
    first = ws.model_signing_key()
    again = ws.model_signing_key()
    assert first.private_numbers() == again.private_numbers()
    key_file = ws.keys_dir / "model-signing.key"
    doc = json.loads(key_file.read_text())
    assert (doc["kind"], doc["protection"]) == ("ecdsa-p256", "scrypt+aes-256-gcm")
    assert key_file.stat().st_mode & 0o777 == 0o600
    with ws.ledger() as ledger:
        recorded = [e.payload for e in ledger.entries(event_type="workspace.model_signing_key")]
    pem = ws.model_signing_public_pem()
    assert recorded == [
        {
            "node": ws.node_id,
            "algorithm": "ecdsa-p256-sha256",
            "fingerprint": hashlib.sha256(pem).hexdigest(),
            "public_key": pem.decode(),
        }
    ]
    # The key hint model_signing writes into every signature is that fingerprint.
    blob, _ = bundle_model(ws, mlp([8, 16, 3])[0], name="mlp", version="1.0.0", encrypt=False)
    oms = Bundle.parse(blob).signed["oms"]
    hint = oms["signature"]["verificationMaterial"]["publicKey"]["hint"]
    assert hint == oms["keyid"] == recorded[0]["fingerprint"]


def test_without_the_sign_extra_bundle_creation_says_which_extra_in_one_line(
    workspace, tmp_path, monkeypatch, capsys
):
    model_path = tmp_path / "m.onnx"
    model_path.write_bytes(mlp([8, 16, 3])[0])
    monkeypatch.setitem(sys.modules, "model_signing", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'insitu\[sign\]'"):
        bundle_model(workspace, model_path.read_bytes(), name="m", version="1.0.0", encrypt=False)
    capsys.readouterr()
    out = tmp_path / "m.insb"
    args = ["bundle", "create", str(model_path), "--version", "1.0.0", "--no-encrypt"]
    assert run([*args, "--out", str(out), "--home", str(workspace.home)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "pip install 'insitu[sign]'" in err
    assert not out.exists()
    with workspace.ledger() as ledger:
        assert not list(ledger.entries(event_type="bundle.created"))


def test_export_refuses_a_directory_that_is_not_empty(published, tmp_path):
    ws, _, path = published
    out = tmp_path / "busy"
    out.mkdir()
    (out / "README").write_text("mine\n")
    bundle = Bundle.parse(path.read_bytes())
    with pytest.raises(UsageError, match="is not an empty directory"):
        export_bundle(bundle, BundleVerifier([ws.signing_public_key]), ws.encryption_key(), out)
    assert [p.name for p in out.iterdir()] == ["README"]


def test_attack_export_of_a_bundle_from_an_untrusted_publisher_writes_nothing(published, tmp_path):
    _, _, path = published
    stranger, _ = Workspace.init(tmp_path / "stranger")
    out = tmp_path / "exported"
    bundle = Bundle.parse(path.read_bytes())
    with pytest.raises(UntrustedPublisherError, match="not a trusted publisher key"):
        export_bundle(bundle, BundleVerifier([stranger.signing_public_key]), None, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".exported")] == []
