"""A node's bundle decryption key in a TPM 2.0 (swtpm, tpm2-pkcs11): RSA-OAEP made there.

tpm2-pkcs11 1.9 has no ``CKM_ECDH1_DERIVE`` but has ``CKM_RSA_PKCS_OAEP``, so ``insitu init
--key-uri`` on a TPM makes an RSA decryption key there (3072 bits on swtpm) and bundles
carry ``rsa-oaep-sha256`` recipient entries (``insitu.bundle._stream``; ADR 0020). Each
module run starts its own swtpm (``tests/_swtpm.py``; tpm2-pkcs11 reads its TCTI once per
process), every test has a key label of its own, and "another machine" is another process
with another swtpm. The attackers: a copy of the site's disk on another machine, and
whoever changes a bundle's recorded recipient kind.

Never hand the TPM a corrupt OAEP ciphertext in a test: libtpms 0.9.2 (Debian 12's swtpm)
enters failure mode on one and refuses every later command until restarted. insitu
itself only asks the token for ciphertexts of a signed header, of the key's length.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from insitu._canonical import canonical_bytes
from insitu.bundle import (
    Bundle,
    BundleVerifier,
    ModelCard,
    create_bundle,
    device_key_id,
    load_session,
    schema_of,
)
from insitu.bundle._format import SIGNATURE_DOMAIN, assemble
from insitu.bundle._verify import data_key_for
from insitu.cli import run
from insitu.errors import TamperedBundleError, UnsignedBundleError
from insitu.workspace import PIN_ENV, Workspace
from insitu.workspace._pkcs11 import TokenKeyUri, TokenRsaDecryptionKey, open_token_decryption_key
from tests._swtpm import MODULE, SoftwareTpm, missing
from tests.bundle._models import mlp

PIN = "2468-tpm"
SO_PIN = "1357-tpm"
TOKEN = "insitu-tpm-decrypt"
PUBLISHER = Ed25519PrivateKey.generate()
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
    for name, value in before.items():
        if name == "TSS2_LOG":  # tpm2-pkcs11 logs (and would print) its last flush at exit
            continue
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def label(tpm: SoftwareTpm, monkeypatch: pytest.MonkeyPatch) -> str:
    """A key label of this test's own in the TPM's token, the PIN in the environment."""
    monkeypatch.setenv(PIN_ENV, PIN)
    return f"node-{next(_labels)}"


def uri_of(obj: str) -> str:
    return f"pkcs11:token={TOKEN};object={obj}"


def _pem_private_keys(home: Path) -> list[str]:
    """Every file under ``home`` holding a PEM private key (of any kind)."""
    return [
        str(path.relative_to(home))
        for path in home.rglob("*")
        if path.is_file() and b"PRIVATE KEY-----" in path.read_bytes()
    ]


def _bundle(model: bytes, recipients: list, version: str = "1.0.0") -> bytes:
    inputs, outputs = schema_of(model)
    card = ModelCard(name="mlp", version=version, inputs=inputs, outputs=outputs)
    return create_bundle(model, card, PUBLISHER, recipients=recipients, segment_size=4096)


def _entries(signed: dict) -> list[dict]:
    return list(signed["payload"]["encryption"]["recipients"])


def _resigned(blob: bytes, change: Callable[[dict], None]) -> bytes:
    """``blob`` with its header changed by ``change(signed)`` and signed again."""
    bundle = Bundle.parse(blob)
    signed = json.loads(canonical_bytes(bundle.signed))
    change(signed)
    sig = PUBLISHER.sign(SIGNATURE_DOMAIN + canonical_bytes(signed)).hex()
    keyid = bundle.signatures[0]["keyid"]
    return assemble(signed, [{"keyid": keyid, "sig": sig}]) + bytes(bundle.payload)


def _write_publisher(path: Path) -> Path:
    pem = PUBLISHER.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    path.write_bytes(pem)
    return path


def _snapshot(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in home.rglob("*") if p.is_file()}


# -- the format: RSA-OAEP recipients with software keys --------------------------------


def test_a_software_rsa_key_is_a_recipient_beside_x25519_and_p256() -> None:
    model, _ = mlp([8, 4, 2])
    rsa_2048, rsa_3072 = (rsa.generate_private_key(65537, bits) for bits in (2048, 3072))
    x25519, p256 = X25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())
    keys = [rsa_2048, rsa_3072, x25519, p256]
    blob = _bundle(model, [k.public_key() for k in keys])
    entries = {e["keyid"]: e for e in _entries(Bundle.parse(blob).signed)}
    kinds = [entries[device_key_id(k.public_key())]["algorithm"] for k in keys]
    assert kinds == ["rsa-oaep-sha256", "rsa-oaep-sha256", "x25519", "p256-ecdh"]
    assert {e["kdf"] for e in entries.values()} == {"hkdf-sha256"}
    # The encapsulation is the OAEP ciphertext: one modulus long.
    assert len(bytes.fromhex(entries[device_key_id(rsa_3072.public_key())]["ephemeral"])) == 384
    verifier = BundleVerifier([PUBLISHER.public_key()])
    for key in keys:
        assert bytes(verifier.open(Bundle.parse(blob), key).model) == model


def test_an_rsa_recipient_key_under_2048_bits_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = rsa.generate_private_key(65537, 1024).public_key()
    model, _ = mlp([8, 4, 2])
    with pytest.raises(ValueError, match="at least 2048 bits, this one has 1024"):
        _bundle(model, [small])
    pem = tmp_path / "small.pub.pem"
    pem.write_bytes(small.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    home = str(tmp_path / "publisher")
    assert run(["init", "--home", home]) == 0
    capsys.readouterr()
    (tmp_path / "m.onnx").write_bytes(model)
    code = run(
        ["bundle", "create", str(tmp_path / "m.onnx"), "--name", "m", "--version", "1.0.0",
         "--out", str(tmp_path / "m.insb"), "--home", home, "--recipient", str(pem)]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert "is a 1024-bit RSA key; recipients need 2048 bits or more" in err
    assert "\n" not in err
    assert not (tmp_path / "m.insb").exists()


def test_attack_rsa_recipient_kind_swap_is_refused() -> None:
    model, _ = mlp([8, 4, 2])
    keys = {
        "rsa-oaep-sha256": rsa.generate_private_key(65537, 2048),
        "x25519": X25519PrivateKey.generate(),
        "p256-ecdh": ec.generate_private_key(ec.SECP256R1()),
    }
    blob = _bundle(model, [k.public_key() for k in keys.values()])
    verifier = BundleVerifier([PUBLISHER.public_key()])
    rsa_id = device_key_id(keys["rsa-oaep-sha256"].public_key())

    def relabel(to: dict[str, str]) -> Callable[[dict], None]:
        def change(signed: dict) -> None:
            for entry in _entries(signed):
                entry["algorithm"] = to.get(entry["algorithm"], entry["algorithm"])

        return change

    # Inside the signed header: changed without signing again, the signature breaks.
    bundle = Bundle.parse(blob)
    doc = json.loads(bundle.header_bytes[12:])
    relabel({"rsa-oaep-sha256": "x25519"})(doc["signed"])
    forged = assemble(doc["signed"], doc["signatures"]) + bytes(bundle.payload)
    with pytest.raises(UnsignedBundleError, match="header was changed after signing"):
        verifier.open(Bundle.parse(forged), keys["rsa-oaep-sha256"])

    def removed(signed: dict) -> None:  # reads as X25519
        for entry in _entries(signed):
            if entry["keyid"] == rsa_id:
                del entry["algorithm"]

    # Signed again (a publisher's bug, a reader that skips the signature): an entry is
    # opened only with its key's own kind; swapped either way, removed or unknown.
    for change, victims in (
        (relabel({"rsa-oaep-sha256": "x25519"}), ("rsa-oaep-sha256",)),
        (relabel({"rsa-oaep-sha256": "p256-ecdh"}), ("rsa-oaep-sha256",)),
        (relabel({"x25519": "rsa-oaep-sha256"}), ("x25519",)),
        (relabel({"p256-ecdh": "rsa-oaep-sha256"}), ("p256-ecdh",)),
        (relabel({"rsa-oaep-sha256": "rsa-oaep-sha1"}), ("rsa-oaep-sha256",)),
        (removed, ("rsa-oaep-sha256",)),
    ):
        tampered = Bundle.parse(_resigned(blob, change))
        for kind in victims:
            with pytest.raises(TamperedBundleError, match="does not open") as info:
                data_key_for(tampered, keys[kind])
            assert "\n" not in str(info.value)


def test_attack_rsa_entry_moved_to_another_bundle_does_not_open() -> None:
    device = rsa.generate_private_key(65537, 2048)
    model, _ = mlp([8, 4, 2])
    first = _bundle(model, [device.public_key()], "1.0.0")
    second = _bundle(model, [device.public_key()], "2.0.0")
    (moved,) = _entries(Bundle.parse(first).signed)

    def transplant(signed: dict) -> None:
        signed["payload"]["encryption"]["recipients"] = [moved]

    # The OAEP ciphertext opens anywhere; the key it yields is bound to its bundle by HKDF.
    forged = Bundle.parse(_resigned(second, transplant))
    with pytest.raises(TamperedBundleError, match="does not open"):
        data_key_for(forged, device)


# -- the key in the TPM ----------------------------------------------------------------


def test_a_bundle_for_a_tpm_nodes_rsa_key_loads_and_runs_there(
    label: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    home = tmp_path / "node"
    init = ["init", "--home", str(home), "--key-uri", uri_of(label), "--pkcs11-module", MODULE]
    assert run(init) == 0, capsys.readouterr().err
    capsys.readouterr()
    ws = Workspace.open(home)
    public = ws.encryption_public_key
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 3072  # swtpm makes 3072-bit keys; 2048 where a TPM stops there
    assert ws.decryption_key_uri == uri_of(f"{label}-decrypt")
    with ws.ledger() as ledger:
        (entry,) = ledger.entries(event_type="workspace.init")
    assert entry.payload["decryption_key_store"] == "pkcs11"
    assert entry.payload["decryption_key_uri"] == uri_of(f"{label}-decrypt")
    assert entry.payload["decryption_algorithm"] == "rsa-oaep-sha256"
    assert run(["info", "--home", str(home)]) == 0
    assert f"in token {uri_of(label + '-decrypt')} (rsa-oaep-sha256)" in capsys.readouterr().out

    # A publisher elsewhere encrypts to the node's public key, through the command line.
    model, _ = mlp([8, 16, 2])
    (tmp_path / "m.onnx").write_bytes(model)
    publisher = str(tmp_path / "publisher")
    assert run(["init", "--home", publisher]) == 0
    out = tmp_path / "m.insb"
    code = run(
        ["bundle", "create", str(tmp_path / "m.onnx"), "--name", "mlp", "--version", "1.0.0",
         "--out", str(out), "--home", publisher,
         "--recipient", str(ws.keys_dir / "encryption.pub.pem")]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    kinds = sorted(e["algorithm"] for e in _entries(Bundle.parse(out.read_bytes()).signed))
    assert kinds == ["rsa-oaep-sha256", "x25519"]  # the node's, and the publisher's own
    capsys.readouterr()
    pinned = f"{publisher}/keys/signing.pub.pem"
    verify = ["bundle", "verify", str(out), "--home", str(home), "--publisher", pinned, "--json"]
    assert run(verify) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["verified"] == "signature, payload digest and decrypted model digest"

    # Loaded and run on the node: the data key is unwrapped by C_Decrypt in the TPM.
    verifier = BundleVerifier([Workspace.open(publisher).signing_public_key])
    header, session = load_session(out.read_bytes(), verifier, ws.encryption_key())
    assert header.name == "mlp"
    feed = {session.get_inputs()[0].name: np.zeros((1, 8), dtype=np.float32)}
    (scores,) = session.run(None, feed)
    assert scores.shape == (1, 2)
    # The node signs its ledger in the same process after decrypting (both keys fit).
    with ws.ledger() as ledger:
        ledger.record("test.loaded", name=header.name)
    assert run(["audit", "verify", "--home", str(home)]) == 0, capsys.readouterr().err

    # No private key of the node under the workspace: no PEM, no key file.
    assert _pem_private_keys(home) == []
    assert not (ws.keys_dir / "encryption.key").exists()
    assert not (ws.keys_dir / "signing.key").exists()


def test_attack_tpm_decryption_key_cannot_be_read_out_or_sign(label: str, tmp_path: Path) -> None:
    import PyKCS11

    Workspace.init(tmp_path / "node", key_uri=uri_of(label), pkcs11_module=MODULE)
    uri = TokenKeyUri.parse(uri_of(f"{label}-decrypt"), module=MODULE)
    key = open_token_decryption_key(uri, PIN)
    session = key._session.session  # logged in as the node's user: the PIN is known
    (private,) = session.findObjects(
        [(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY), (PyKCS11.CKA_LABEL, f"{label}-decrypt")]
    )
    flags = session.getAttributeValue(
        private,
        [PyKCS11.CKA_SENSITIVE, PyKCS11.CKA_EXTRACTABLE, PyKCS11.CKA_DECRYPT, PyKCS11.CKA_SIGN],
    )
    assert flags == [True, False, True, False]
    secret = [PyKCS11.CKA_PRIVATE_EXPONENT, PyKCS11.CKA_PRIME_1]
    assert session.getAttributeValue(private, secret, allAsBinary=True) == [None, None]
    session.closeSession()


def test_attack_altered_rsa_entry_is_refused_before_the_tpm_is_asked(
    label: str, tmp_path: Path
) -> None:
    ws, _ = Workspace.init(tmp_path / "node", key_uri=uri_of(label), pkcs11_module=MODULE)
    key = ws.encryption_key()
    assert isinstance(key, TokenRsaDecryptionKey)
    model, _ = mlp([8, 4, 2])
    blob = _bundle(model, [ws.encryption_public_key])

    def relabelled(signed: dict) -> None:
        for entry in _entries(signed):
            entry["algorithm"] = "p256-ecdh"

    def shortened(signed: dict) -> None:  # an encapsulation of another length than the key's
        for entry in _entries(signed):
            entry["ephemeral"] = entry["ephemeral"][:-2]

    for change in (relabelled, shortened):
        with pytest.raises(TamperedBundleError, match="does not open") as info:
            data_key_for(Bundle.parse(_resigned(blob, change)), key)
        assert "\n" not in str(info.value)
    # The TPM was never handed them: it still opens the genuine bundle, in the same session.
    verifier = BundleVerifier([PUBLISHER.public_key()])
    assert bytes(verifier.open(Bundle.parse(blob), key).model) == model
    # Close the session now: a traceback kept by pytest.raises would keep it (and its
    # loaded keys: swtpm holds three objects) until the garbage collector runs.
    key.close()


_CLONE_DECOY = """
import sys
from pathlib import Path
from insitu.bundle import Bundle, BundleVerifier
from insitu.workspace import Workspace
from insitu.workspace._pkcs11 import TokenKeyUri, generate_token_rsa_decryption_key

home, bundle, pin, module = sys.argv[1:5]
ws = Workspace.open(home)
# A key of the same label, made in this machine's TPM.
uri = TokenKeyUri.parse(ws.decryption_key_uri, module=module)
generate_token_rsa_decryption_key(uri, pin).close()
try:
    ws.encryption_key()
except Exception as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
print("opened the key")
"""
_CLI = "import sys\nfrom insitu.cli import run\nsys.exit(run(sys.argv[1:]))"


def test_attack_cloned_site_tpm_cannot_decrypt(
    label: str, tmp_path: Path, tpm: SoftwareTpm
) -> None:
    ws, _ = Workspace.init(tmp_path / "node", key_uri=uri_of(label), pkcs11_module=MODULE)
    model, _ = mlp([8, 4, 2])
    blob = _bundle(model, [ws.encryption_public_key])
    (tmp_path / "m.insb").write_bytes(blob)
    publisher = _write_publisher(tmp_path / "publisher.pub.pem")
    verifier = BundleVerifier([PUBLISHER.public_key()])
    assert bytes(verifier.open(Bundle.parse(blob), ws.encryption_key()).model) == model

    clone = tmp_path / "stolen" / "node"
    shutil.copytree(ws.home, clone)
    before = _snapshot(clone)
    # Another machine: another process, another software TPM with a token of the same
    # label and PIN. The copy has everything the node's disk had.
    other = _start(tmp_path / "other-tpm")
    try:
        env = os.environ | other.env | {PIN_ENV: PIN}
        verify = [
            *(sys.executable, "-c", _CLI, "bundle", "verify", str(tmp_path / "m.insb")),
            *("--home", str(clone), "--publisher", str(publisher)),
        ]
        cli = subprocess.run(
            verify, env=env, capture_output=True, text=True, check=False, timeout=120
        )
        decoy = subprocess.run(
            [sys.executable, "-c", _CLONE_DECOY, str(clone), str(tmp_path / "m.insb"), PIN, MODULE],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
    finally:
        other.stop()
    said = [line for line in cli.stderr.splitlines() if line.strip()]
    assert cli.returncode == 1, cli.stderr
    assert len(said) == 1, cli.stderr
    assert f"holds no key labelled '{label}-decrypt'" in said[0]
    assert cli.stdout == ""
    assert (decoy.returncode, decoy.stdout.strip()) == (
        3,
        f"KeyFileError {uri_of(label + '-decrypt')} does not match keys/encryption.pub.pem",
    ), decoy.stderr
    assert _snapshot(clone) == before  # nothing written
