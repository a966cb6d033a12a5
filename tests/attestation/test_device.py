"""A bundle is published for a device only after the device's fresh quote (out of band).

The publisher issues a nonce (``insitu attest challenge``), the device quotes its
measured build over it (``insitu attest quote``), and ``insitu repo publish --device ID
--attest ALLOWLIST --quote Q --ak AK`` checks the quote before anything is published.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from insitu.bundle import device_key_id
from insitu.workspace import Workspace
from tests.update._cli import Site, invoke, invoke_json

from .conftest import modified_build, snapshot


def _quote(capsys: pytest.CaptureFixture[str], tcti: str, nonce: str, *extra: str) -> str:
    code, out, err = invoke(capsys, "attest", "quote", "--nonce", nonce, "--tcti", tcti, *extra)
    assert code == 0, err
    return out


def test_a_device_gets_its_bundle_only_with_a_fresh_allowed_quote(
    tcti: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = Site.make(tmp_path, capsys)
    keyid = device_key_id(Workspace.open(site.device).encryption_public_key)
    allow, ak, quote = tmp_path / "allow.toml", tmp_path / "device.ak.pem", tmp_path / "q.json"
    assert invoke(capsys, "attest", "allow", "--out", str(allow), "--name", "release")[0] == 0
    assert invoke(capsys, "attest", "key", "--tcti", tcti, "--out", str(ak))[0] == 0
    challenge = ["attest", "challenge", "--subject", keyid, "--allow-list", str(allow)]
    publish = [
        *("repo", "publish", str(site.repo), str(site.bundle("1.0.0")), "--device", keyid),
        *("--attest", str(allow), "--quote", str(quote), "--ak", str(ak)),
        *("--home", site.publisher),
    ]

    # A modified build on the device: refused, one line naming the PCR, nothing published.
    code, nonce, _ = invoke(capsys, *challenge, "--home", site.publisher)
    assert code == 0
    modified = modified_build(tmp_path) / "insitu"
    quote.write_text(_quote(capsys, tcti, nonce.strip(), "--root", str(modified)))
    code, _, err = invoke(capsys, *publish)
    assert code == 1
    assert err.count("\n") == 1, err
    assert f"device {keyid} refused: PCR 23 is" in err
    assert not (site.repo / "public" / "targets" / "bundles").exists() or not any(
        (site.repo / "public" / "targets").rglob("*.insb")
    )

    # The good build, over a fresh nonce: published. The same quote again: refused.
    code, nonce, _ = invoke(capsys, *challenge, "--home", site.publisher)
    quote.write_text(_quote(capsys, tcti, nonce.strip()))
    code, out, err = invoke(capsys, *publish, "--json")
    assert code == 0, err
    assert json.loads(out)["version"] == "1.0.0"
    code, _, err = invoke(capsys, *publish)
    assert code == 1
    assert "not over this verifier's fresh nonce" in err

    with Workspace.open(site.publisher).ledger() as ledger:
        checks = [e.payload for e in ledger.entries(event_type="attestation.checked")]
    assert [(c["kind"], c["decision"]) for c in checks] == [
        ("device", "refused"),
        ("device", "admitted"),
        ("device", "refused"),
    ]
    assert checks[0]["pcr"] == 23
    assert not list((Path(site.publisher) / "attestation" / "nonces").iterdir())


def _ledger(home: str, event_type: str) -> list[dict[str, object]]:
    with Workspace.open(home).ledger() as ledger:
        return [e.payload for e in ledger.entries(event_type=event_type)]


def _published(site: Site) -> list[Path]:
    return sorted((site.repo / "public" / "targets").rglob("*.insb"))


def _some_ak(path: Path) -> Path:
    """An EC P-256 public key in PEM, as 'insitu attest key' writes an AK (no TPM needed)."""
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    path.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def test_attack_publish_without_quote_when_required(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = Site.make(tmp_path, capsys)
    keyid = device_key_id(Workspace.open(site.device).encryption_public_key)
    allow = tmp_path / "allow.toml"
    assert invoke(capsys, "attest", "allow", "--out", str(allow), "--name", "release")[0] == 0
    repo_attest = ["repo", "attest", str(site.repo), "--home", site.publisher]
    assert invoke(capsys, *repo_attest, "--require", str(allow))[0] == 0
    bundle = str(site.bundle("1.0.0"))
    publish = ["repo", "publish", str(site.repo), bundle, "--home", site.publisher]

    # An operator (or a script) publishes as before this repository required attestation:
    # for the device without its quote, to a channel, or with a key and allow-list of
    # their own choosing. Each is one line, exit non-zero, and nothing is published.
    refusals = [
        ([*publish, "--device", keyid], 1, f"device {keyid} has no attestation key enrolled"),
        ([*publish, "--channel", "stable"], 1, "not to a channel"),
        ([*publish], 1, "not to a channel"),
    ]
    for args, status, message in refusals:
        code, _, err = invoke(capsys, *args)
        assert (code, err.count("\n")) == (status, 1), err
        assert f"the repository {site.repo} requires attestation of every device" in err
        assert message in err
    assert (
        invoke(capsys, *repo_attest, "--enroll", keyid, "--ak", str(_some_ak(tmp_path / "d.pem")))[
            0
        ]
        == 0
    )
    code, _, err = invoke(capsys, *publish, "--device", keyid)
    assert code == 1
    assert f"device {keyid} gave no quote; get a nonce with 'insitu repo attest" in err
    own_ak = str(_some_ak(tmp_path / "own.pem"))
    code, _, err = invoke(
        capsys,
        *publish,
        "--device",
        keyid,
        "--attest",
        str(allow),
        "--quote",
        own_ak,
        "--ak",
        own_ak,
    )
    assert code == 2
    assert "requires attestation with its own allow-list and enrolled keys" in err
    assert _published(site) == []
    assert [e["reason"] for e in _ledger(site.publisher, "repo.publish_refused")] == [
        "UnknownAttestationKeyError",
        "AttestationRequiredError",
        "AttestationRequiredError",
        "AttestationRequiredError",
    ]
    (setting,) = _ledger(site.publisher, "repo.attestation_set")
    assert (setting["required"], setting["states"], setting["pcrs"]) == (True, 1, [23])
    (enrolled,) = _ledger(site.publisher, "repo.attestation_enrolled")
    assert enrolled["device"] == keyid

    # Turned off (recorded), a channel publish goes through again.
    assert invoke(capsys, *repo_attest, "--off")[0] == 0
    assert invoke(capsys, *publish, "--channel", "stable")[0] == 0
    assert len(_published(site)) == 1
    assert [e["required"] for e in _ledger(site.publisher, "repo.attestation_set")] == [True, False]


def test_a_repository_that_requires_attestation_publishes_with_a_good_quote(
    tcti: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = Site.make(tmp_path, capsys)
    release = snapshot(tmp_path) / "insitu"  # the build the device runs, frozen
    keyid = device_key_id(Workspace.open(site.device).encryption_public_key)
    allow, ak, quote = tmp_path / "allow.toml", tmp_path / "device.ak.pem", tmp_path / "q.json"
    allow_cmd = [
        "attest",
        "allow",
        "--out",
        str(allow),
        "--name",
        "release",
        "--root",
        str(release),
    ]
    assert invoke(capsys, *allow_cmd)[0] == 0
    assert invoke(capsys, "attest", "key", "--tcti", tcti, "--out", str(ak))[0] == 0
    repo_attest = ["repo", "attest", str(site.repo), "--home", site.publisher]
    assert (
        invoke(capsys, *repo_attest, "--require", str(allow), "--enroll", keyid, "--ak", str(ak))[0]
        == 0
    )
    status = invoke_json(capsys, *repo_attest)
    assert status["required"]
    assert list(status["devices"]) == [keyid]

    code, nonce, err = invoke(capsys, *repo_attest, "--challenge", keyid)
    assert code == 0, err
    quote.write_text(_quote(capsys, tcti, nonce.strip(), "--root", str(release)))
    publish = [
        *("repo", "publish", str(site.repo), str(site.bundle("1.0.0")), "--device", keyid),
        *("--quote", str(quote), "--home", site.publisher),
    ]
    code, out, err = invoke(capsys, *publish, "--json")
    assert code == 0, err
    assert json.loads(out)["pointers"] == [f"devices/{keyid}/triage.json"]
    code, _, err = invoke(capsys, *publish)  # the same quote again: its nonce is used up
    assert code == 1
    assert "not over this verifier's fresh nonce" in err
    checks = _ledger(site.publisher, "attestation.checked")
    assert [(c["subject"], c["decision"]) for c in checks] == [
        (keyid, "admitted"),
        (keyid, "refused"),
    ]
