"""A bundle is published for a device only after the device's fresh quote (out of band).

The publisher issues a nonce (``insitu attest challenge``), the device quotes its
measured build over it (``insitu attest quote``), and ``insitu repo publish --device ID
--attest ALLOWLIST --quote Q --ak AK`` checks the quote before anything is published.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from insitu.bundle import device_key_id
from insitu.workspace import Workspace
from tests.update._cli import Site, invoke

from .conftest import modified_build


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
