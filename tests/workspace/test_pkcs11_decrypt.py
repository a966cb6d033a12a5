"""A node's bundle decryption key in a PKCS#11 token (SoftHSM2): P-256 ECDH made there.

SoftHSM2 has no X25519, so a node whose keys live in a token gets a P-256 key agreement
key (``CKM_ECDH1_DERIVE``) and bundles carry ``p256-ecdh`` recipient entries beside the
``x25519`` ones. The token store of this process is the one of ``test_pkcs11`` (SoftHSM2
reads its configuration once per process); "another machine" is another process with a
store of its own. The attackers: a copy of the site's disk on another machine, and
whoever can change a bundle's bytes on the way (the recorded key agreement included).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

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
from insitu.errors import TamperedBundleError, TokenError, UnsignedBundleError
from insitu.update import UpdateClient
from insitu.workspace import PIN_ENV, Workspace
from insitu.workspace._pkcs11 import (
    TokenKeyUri,
    generate_token_decryption_key,
    open_token_decryption_key,
)
from tests.bundle._models import mlp
from tests.update.repository_simulator import BASE_URL, RepositorySimulator
from tests.workspace.test_pkcs11 import MODULE, PIN, softhsm, softhsm_store, token, uri_of

__all__ = ["softhsm", "token"]  # fixtures, imported for the tests below

PUBLISHER = Ed25519PrivateKey.generate()


def _workspace_in_token(home: Path, label: str) -> Workspace:
    ws, created = Workspace.init(home, name="site-a", key_uri=uri_of(label), pkcs11_module=MODULE)
    assert created
    return ws


def _bundle(model: bytes, recipients: list, version: str = "1.0.0") -> bytes:
    inputs, outputs = schema_of(model)
    card = ModelCard(name="mlp", version=version, inputs=inputs, outputs=outputs)
    return create_bundle(model, card, PUBLISHER, recipients=recipients, segment_size=4096)


def _resigned(blob: bytes, change: Callable[[dict], None]) -> bytes:
    """``blob`` with its header changed by ``change(signed)`` and signed again."""
    bundle = Bundle.parse(blob)
    signed = json.loads(canonical_bytes(bundle.signed))
    change(signed)
    sig = PUBLISHER.sign(SIGNATURE_DOMAIN + canonical_bytes(signed)).hex()
    keyid = bundle.signatures[0]["keyid"]
    return assemble(signed, [{"keyid": keyid, "sig": sig}]) + bytes(bundle.payload)


def _entries(signed: dict) -> list[dict]:
    return list(signed["payload"]["encryption"]["recipients"])


def _key_material(home: Path) -> list[str]:
    """Files under ``home`` that hold a private key: PEM, or insitu's sealed key files."""
    found = []
    for path in home.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"PRIVATE KEY" in data:
            found.append(str(path.relative_to(home)))
        elif path.parent.name == "keys" and path.suffix == ".key":
            kind = json.loads(data).get("kind")
            if kind != "secret":  # the site secrets (pseudonym.key, data.key) are no keys
                found.append(f"{path.relative_to(home)} ({kind})")
    return found


def test_a_bundle_for_a_token_keyed_node_decrypts_and_loads_there(
    token: str, tmp_path: Path
) -> None:
    ws = _workspace_in_token(tmp_path / "site", token)
    assert ws.decryption_key_uri == uri_of(token, "site-a-decrypt")
    public = ws.encryption_public_key
    assert isinstance(public, ec.EllipticCurvePublicKey)
    other = X25519PrivateKey.generate()
    model, _ = mlp([8, 16, 2])
    blob = _bundle(model, [public, other.public_key()])

    entries = {e["keyid"]: e for e in _entries(Bundle.parse(blob).signed)}
    assert entries[device_key_id(public)]["algorithm"] == "p256-ecdh"
    assert entries[device_key_id(other.public_key())]["algorithm"] == "x25519"
    assert {e["kdf"] for e in entries.values()} == {"hkdf-sha256"}

    # Another Workspace object, as a later process opens it: the key is found in the token.
    site = Workspace.open(ws.home)
    verifier = BundleVerifier([PUBLISHER.public_key()])
    assert bytes(verifier.open(Bundle.parse(blob), site.encryption_key()).model) == model
    header, session = load_session(blob, verifier, site.encryption_key())
    assert header.name == "mlp"
    assert session.get_inputs()[0].shape[-1] == 8
    assert bytes(verifier.open(Bundle.parse(blob), other).model) == model  # X25519 too

    with ws.ledger() as ledger:
        (init,) = ledger.entries(event_type="workspace.init")
    assert init.payload["decryption_key_store"] == "pkcs11"
    assert init.payload["decryption_key_uri"] == uri_of(token, "site-a-decrypt")
    assert init.payload["decryption_algorithm"] == "p256-ecdh"
    # No private key of the node under the workspace: no PEM, no sealed key file.
    assert _key_material(ws.home) == []
    assert not (ws.keys_dir / "encryption.key").exists()


def test_attack_token_decryption_key_cannot_be_read_out(token: str, tmp_path: Path) -> None:
    import PyKCS11

    _workspace_in_token(tmp_path / "site", token)
    key = open_token_decryption_key(
        TokenKeyUri.parse(uri_of(token, "site-a-decrypt"), module=MODULE), PIN
    )
    session = key._session.session  # logged in as the site's user: the PIN is known
    (private,) = session.findObjects(
        [(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY), (PyKCS11.CKA_LABEL, "site-a-decrypt")]
    )
    flags = session.getAttributeValue(
        private,
        [PyKCS11.CKA_SENSITIVE, PyKCS11.CKA_EXTRACTABLE, PyKCS11.CKA_DERIVE, PyKCS11.CKA_SIGN],
    )
    assert flags == [True, False, True, False]
    assert session.getAttributeValue(private, [PyKCS11.CKA_VALUE], allAsBinary=True) == [None]
    # A derivation leaves nothing behind in the token (the secret was a session object).
    key.exchange(ec.generate_private_key(ec.SECP256R1()).public_key())
    assert session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY)]) == []


def test_attack_recipient_algorithm_swap_is_refused(token: str, tmp_path: Path) -> None:
    ws = _workspace_in_token(tmp_path / "site", token)
    device = X25519PrivateKey.generate()
    model, _ = mlp([8, 4, 2])
    blob = _bundle(model, [ws.encryption_public_key, device.public_key()])
    verifier = BundleVerifier([PUBLISHER.public_key()])
    token_key = ws.encryption_key()
    swap = {"p256-ecdh": "x25519", "x25519": "p256-ecdh"}

    def swapped(signed: dict) -> None:
        for entry in _entries(signed):
            entry["algorithm"] = swap[entry["algorithm"]]

    # The algorithm is inside the signed header: changing it breaks the signature.
    bundle = Bundle.parse(blob)
    doc = json.loads(bundle.header_bytes[12:])
    swapped(doc["signed"])
    forged = assemble(doc["signed"], doc["signatures"]) + bytes(bundle.payload)
    with pytest.raises(UnsignedBundleError, match="header was changed after signing"):
        verifier.open(Bundle.parse(forged), token_key)

    # Even a header signed again (a publisher's bug, or a reader that skips the signature,
    # as a mirror might) never opens an entry with another agreement than the key's own:
    # swapped, removed (which reads as X25519), or unknown.
    def removed(signed: dict) -> None:
        for entry in _entries(signed):
            del entry["algorithm"]

    def unknown(signed: dict) -> None:
        for entry in _entries(signed):
            entry["algorithm"] = "x448"

    def other_kdf(signed: dict) -> None:
        for entry in _entries(signed):
            entry["kdf"] = "hkdf-sha512"

    for change, keys in (
        (swapped, (token_key, device)),
        (removed, (token_key,)),
        (unknown, (token_key, device)),
        (other_kdf, (token_key, device)),
    ):
        tampered = Bundle.parse(_resigned(blob, change))
        for key in keys:
            with pytest.raises(TamperedBundleError, match="does not open") as info:
                data_key_for(tampered, key)
            assert "\n" not in str(info.value)
            with pytest.raises(TamperedBundleError, match="does not open"):
                verifier.open(tampered, key)
    # Without the recorded algorithm, an X25519 entry still opens: bundles made before
    # P-256 recipients (no algorithm, no kdf) are X25519.
    old = Bundle.parse(_resigned(blob, removed))
    assert bytes(verifier.open(old, device).model) == model


def test_x25519_file_key_bundles_open_as_before(tmp_path: Path) -> None:
    ws, _ = Workspace.init(tmp_path / "site", name="site-b")
    assert isinstance(ws.encryption_key(), X25519PrivateKey)
    model, _ = mlp([8, 4, 2])
    blob = _bundle(model, [ws.encryption_public_key])
    (entry,) = _entries(Bundle.parse(blob).signed)
    assert (entry["algorithm"], entry["kdf"]) == ("x25519", "hkdf-sha256")

    def old_format(signed: dict) -> None:  # what bundles looked like before P-256
        for old in _entries(signed):
            del old["algorithm"], old["kdf"]

    verifier = BundleVerifier([PUBLISHER.public_key()])
    for data in (blob, _resigned(blob, old_format)):
        assert bytes(verifier.open(Bundle.parse(data), ws.encryption_key()).model) == model
    with ws.ledger() as ledger:
        (init,) = ledger.entries(event_type="workspace.init")
    assert init.payload["decryption_key_store"] == "file"
    assert init.payload["decryption_algorithm"] == "x25519"


def test_updates_install_on_a_token_keyed_node(token: str, tmp_path: Path) -> None:
    ws = _workspace_in_token(tmp_path / "site", token)
    publisher_enc = X25519PrivateKey.generate()  # the repository's, to compute deltas
    sim = RepositorySimulator([PUBLISHER.public_key()])
    recipients = [ws.encryption_public_key, publisher_enc.public_key()]
    base, _ = mlp([8, 16, 2])
    newer, _ = mlp([8, 16, 2], seed=7)
    directory = tmp_path / "device"
    UpdateClient.enroll(directory, root=sim.root_bytes, url=BASE_URL, model="mlp")
    with ws.ledger() as ledger:
        client = UpdateClient(directory, device_key=ws.encryption_key(), ledger=ledger, fetcher=sim)
        for version, model in (("1.0.0", base), ("1.1.0", newer)):
            sim.repo.publish(_bundle(model, recipients, version), publisher_key=publisher_enc)
            assert client.update()["installed"] == version
            assert bytes(client.load().model) == model


_CLONE_DECRYPTS = """
import sys
from pathlib import Path
from insitu.bundle import Bundle, BundleVerifier
from insitu.workspace import Workspace
from insitu.workspace._pkcs11 import TokenKeyUri, generate_token_decryption_key

home, bundle, publisher, decoy = sys.argv[1:5]
ws = Workspace.open(home)
if decoy == "decoy":  # a key of the same label, made in this machine's token
    uri = TokenKeyUri.parse(ws.decryption_key_uri, module=sys.argv[5])
    generate_token_decryption_key(uri, "{pin}")
try:
    key = ws.encryption_key()
    opened = BundleVerifier([ws.signing_public_key]).open(
        Bundle.parse(Path(bundle).read_bytes()), key
    )
except Exception as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
print("decrypted", len(opened.model))
"""


def test_attack_cloned_site_cannot_decrypt(token: str, tmp_path: Path) -> None:
    ws = _workspace_in_token(tmp_path / "site", token)
    model, _ = mlp([8, 4, 2])
    inputs, outputs = schema_of(model)
    card = ModelCard(name="mlp", version="1.0.0", inputs=inputs, outputs=outputs)
    # The site's own bundle, signed in its token, encrypted for its token key only.
    blob = create_bundle(model, card, ws.signing_key(), recipients=[ws.encryption_public_key])
    (tmp_path / "m.insb").write_bytes(blob)
    assert (
        bytes(
            BundleVerifier([ws.signing_public_key])
            .open(Bundle.parse(blob), ws.encryption_key())
            .model
        )
        == model
    )
    clone = tmp_path / "stolen" / "site"
    shutil.copytree(ws.home, clone)
    env = softhsm_store(tmp_path / "other-hsm", label=token) | {PIN_ENV: PIN}
    script = _CLONE_DECRYPTS.replace("{pin}", PIN)

    def clone_decrypts(decoy: str) -> tuple[int, str]:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                script,
                str(clone),
                str(tmp_path / "m.insb"),
                "-",
                decoy,
                MODULE,
            ],
            env=os.environ | env,
            capture_output=True,
            text=True,
            check=False,
        )
        return proc.returncode, proc.stdout.strip()

    code, said = clone_decrypts("none")
    assert code == 3
    assert said.startswith("TokenKeyNotFoundError")
    assert "site-a-decrypt" in said
    assert "\n" not in said
    code, said = clone_decrypts("decoy")
    assert code == 3
    assert said == (
        f"KeyFileError pkcs11:token={token};object=site-a-decrypt does not match "
        "keys/encryption.pub.pem"
    )


def test_a_decryption_label_in_use_leaves_no_workspace_and_no_key(
    token: str, tmp_path: Path
) -> None:
    import PyKCS11

    taken = TokenKeyUri.parse(uri_of(token, "site-a-decrypt"), module=MODULE)
    decoy = generate_token_decryption_key(taken, PIN)
    with pytest.raises(TokenError, match="already holds a key labelled 'site-a-decrypt'"):
        Workspace.init(tmp_path / "site", key_uri=uri_of(token), pkcs11_module=MODULE)
    assert not (tmp_path / "site").exists()
    session = decoy._session.session
    labels = {session.getAttributeValue(o, [PyKCS11.CKA_LABEL])[0] for o in session.findObjects([])}
    assert labels == {"site-a-decrypt"}  # the signing key made first was destroyed again


def test_the_command_line_shows_and_uses_the_token_decryption_key(
    token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = str(tmp_path / "site")
    assert run(["init", "--home", home, "--key-uri", uri_of(token), "--pkcs11-module", MODULE]) == 0
    capsys.readouterr()
    assert run(["info", "--home", home, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["decryption_key"] == uri_of(token, "site-a-decrypt")
    assert info["signing_key"] == uri_of(token)


def test_bundle_create_takes_a_token_nodes_p256_key_and_the_node_verifies_the_model(
    token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.bundle._models import write_trained_pair
    from tests.update._cli import WIDTHS, invoke, invoke_json

    publisher, device = str(tmp_path / "publisher"), str(tmp_path / "device")
    assert invoke(capsys, "init", "--home", publisher)[0] == 0
    init = ("init", "--home", device, "--key-uri", uri_of(token), "--pkcs11-module", MODULE)
    assert invoke(capsys, *init)[0] == 0
    write_trained_pair(publisher, WIDTHS, tmp_path / "m1.onnx", tmp_path / "m2.onnx")
    out = tmp_path / "m.insb"
    invoke_json(
        capsys, "bundle", "create", str(tmp_path / "m1.onnx"), "--name", "triage",
        "--version", "1.0.0", "--out", str(out), "--home", publisher,
        "--recipient", f"{device}/keys/encryption.pub.pem", "--epsilon", "3", "--delta", "1e-5",
    )  # fmt: skip
    entries = _entries(Bundle.parse(out.read_bytes()).signed)
    assert sorted(e["algorithm"] for e in entries) == ["p256-ecdh", "x25519"]  # + publisher's
    summary = invoke_json(
        capsys, "bundle", "verify", str(out), "--home", device,
        "--publisher", f"{publisher}/keys/signing.pub.pem",
    )  # fmt: skip
    assert summary["verified"] == "signature, payload digest and decrypted model digest"
