"""A node's signing key in a TPM 2.0 (the software TPM swtpm, through tpm2-pkcs11).

A TPM has no Ed25519, so ``insitu init --key-uri`` makes an ECDSA P-256 key there and
every signature records it (``insitu._signer``). Each module run starts its own
``swtpm socket --tpm2`` on free ports with a state directory under tmp_path, and a
tpm2-pkcs11 store (``TPM2_PKCS11_STORE``) beside it; tpm2-pkcs11 reads its TCTI and store
once per process (``C_Initialize``), so the tests of this module share one TPM, each with a
key label of its own, and "another machine" is another process with another swtpm.

``tests/_swtpm.py`` starts the TPM and makes the token (``tpm2_ptool init``, then
``C_InitToken``: ``tpm2_ptool addtoken`` needs a resource manager swtpm lacks).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from insitu._signer import P256, algorithm_of
from insitu.bundle import Bundle, BundleVerifier, ModelCard, create_bundle, schema_of
from insitu.cli import run
from insitu.errors import TokenError
from insitu.workspace import PIN_ENV, Workspace
from tests._swtpm import MODULE, SoftwareTpm, missing
from tests.bundle._models import mlp

PIN = "4321-tpm"
SO_PIN = "8765-tpm"
TOKEN = "insitu-tpm"
_labels = itertools.count()


def _start(root: Path) -> SoftwareTpm:
    why = missing()
    if why is not None:
        pytest.skip(why)
    return SoftwareTpm(root, token=TOKEN, pin=PIN, so_pin=SO_PIN)


@pytest.fixture(scope="module")
def tpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftwareTpm]:
    """This process's TPM: its environment is set for the module (tpm2-pkcs11 reads it once)."""
    started = _start(tmp_path_factory.mktemp("tpm"))
    before = {name: os.environ.get(name) for name in started.env}
    os.environ.update(started.env)
    yield started
    started.stop()
    # TSS2_LOG stays: tpm2-pkcs11 logs (and would print) its last flush at the exit.
    for name, value in before.items():
        if name == "TSS2_LOG":
            continue
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def label(tpm: SoftwareTpm, monkeypatch: pytest.MonkeyPatch) -> str:
    """A key label of this test's own in the TPM's token, the PIN in the environment."""
    monkeypatch.setenv(PIN_ENV, PIN)
    return f"site-{next(_labels)}"


def uri_of(obj: str) -> str:
    return f"pkcs11:token={TOKEN};object={obj}"


def _scan_for_private_keys(home: Path) -> list[str]:
    # The decryption key is in the TPM too (RSA-OAEP; tests/workspace/test_tpm_decrypt.py):
    # no file under the workspace holds a private key.
    return [
        str(path.relative_to(home))
        for path in home.rglob("*")
        if path.is_file() and b"PRIVATE KEY" in path.read_bytes()
    ]


def test_a_workspace_in_a_tpm_signs_its_ledger_and_bundles_with_p256(
    label: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "site"
    args = ["init", "--home", str(home), "--key-uri", uri_of(label), "--pkcs11-module", MODULE]
    assert run(args) == 0, capsys.readouterr().err
    assert f"in token {uri_of(label)} ({P256})" in capsys.readouterr().out
    ws = Workspace.open(home)
    assert algorithm_of(ws.signing_public_key) == P256
    assert not (ws.keys_dir / "signing.key").exists()
    with ws.ledger() as ledger:
        for i in range(10):
            ledger.record("test.event", i=i)
        head = ledger.sign_head()
        (init,) = ledger.entries(event_type="workspace.init")
    assert head.sig.startswith(b"ecdsa-p256-sha256:")
    assert init.payload["signing_algorithm"] == P256
    assert init.payload["signing_key_uri"] == uri_of(label)

    model, _ = mlp([8, 4, 2])
    inputs, outputs = schema_of(model)
    card = ModelCard(name="m", version="1.0.0", inputs=inputs, outputs=outputs)
    blob = create_bundle(model, card, ws.signing_key())
    bundle = Bundle.parse(blob)
    BundleVerifier([ws.signing_public_key]).verify(bundle)
    assert bundle.signed["publisher"]["public"].startswith("ecdsa-p256-sha256:")
    (tmp_path / "m.insb").write_bytes(blob)
    pinned = str(ws.keys_dir / "signing.pub.pem")
    verify_bundle = ["bundle", "verify", str(tmp_path / "m.insb"), "--publisher", pinned]
    assert run([*verify_bundle, "--home", str(home)]) == 0, capsys.readouterr().err

    assert run(["audit", "verify", "--home", str(home)]) == 0, capsys.readouterr().err
    # An export, verified elsewhere against the pinned P-256 key (signing.pub.pem).
    export = tmp_path / "export.jsonl"
    assert run(["audit", "export", "--home", str(home), "--out", str(export)]) == 0
    assert run(["audit", "verify", "--export", str(export), "--public-key", pinned]) == 0
    assert _scan_for_private_keys(home) == []
    assert not (ws.keys_dir / "encryption.key").exists()


def test_a_tpm_has_no_ed25519_and_says_so(label: str, tmp_path: Path) -> None:
    with pytest.raises(
        TokenError,
        match=r"cannot make ed25519 signing keys \(no CKM_EC_EDWARDS_KEY_PAIR_GEN, CKM_EDDSA\)",
    ):
        Workspace.init(
            tmp_path / "site", key_uri=uri_of(label), pkcs11_module=MODULE, key_algorithm="ed25519"
        )
    assert not (tmp_path / "site").exists()


_CLONE_SIGNS = """
import sys
from insitu.workspace import Workspace
try:
    with Workspace.open(sys.argv[1]).ledger() as ledger:
        ledger.record("test.forged", by="clone")
except Exception as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
"""


def test_attack_cloned_site_tpm(label: str, tmp_path: Path, tpm: SoftwareTpm) -> None:
    ws, _ = Workspace.init(tmp_path / "site", key_uri=uri_of(label), pkcs11_module=MODULE)
    clone = tmp_path / "stolen" / "site"
    shutil.copytree(ws.home, clone)
    # Another machine: another process, another software TPM with a token of the same
    # label and PIN. The copy has everything the site's disk had.
    other = _start(tmp_path / "other-tpm")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CLONE_SIGNS, str(clone)],
            env=os.environ | other.env | {PIN_ENV: PIN},
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
    finally:
        other.stop()
    assert (proc.returncode, proc.stdout.strip()) == (
        3,
        f"TokenKeyNotFoundError token '{TOKEN}' holds no key labelled '{label}'; this "
        "workspace's key is in another token (restore it, or use the token it was made in)",
    ), proc.stderr
    with Workspace.open(clone).ledger() as ledger:  # nothing was appended
        assert [e.type for e in ledger.entries()] == ["workspace.init"]
        assert ledger.verify().entries == 1
    with ws.ledger() as ledger:  # on the site's own machine, with its TPM, the site signs
        ledger.record("test.event", i=1)
