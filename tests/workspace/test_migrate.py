"""``insitu keys migrate``: a workspace's file signing key moved into a token (SoftHSM2).

The store and the tokens are those of ``tests/workspace/test_pkcs11.py`` (SoftHSM2 reads
its configuration once per process: one store, a fresh token per test). After a
migration, no byte of the key is left in the workspace, the node is the same node and its
ledger verifies; a refusal changes nothing on disk and leaves no object in the token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from insitu.cli import run
from insitu.errors import (
    KeyFileError,
    PassphraseRequiredError,
    TokenError,
    TokenKeyNotFoundError,
    TokenModuleError,
    UsageError,
    WrongDeviceKeyError,
    WrongPassphraseError,
    WrongPinError,
)
from insitu.workspace import (
    PASSPHRASE_ENV,
    PIN_ENV,
    Workspace,
    load_private_key,
    migrate_keys,
    save_private_key,
)
from insitu.workspace._pkcs11 import TokenKey
from tests.workspace.test_pkcs11 import MODULE, PIN, softhsm, token, uri_of

__all__ = ["softhsm", "token"]  # the fixtures this module shares with test_pkcs11


def _objects(label: str) -> int:
    """How many objects (public and private) the token ``label`` holds."""
    import PyKCS11

    lib = PyKCS11.PyKCS11Lib()
    lib.load(MODULE)
    (slot,) = [s for s in lib.getSlotList() if lib.getTokenInfo(s).label.strip() == label]
    session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION)
    try:
        session.login(PIN)
    except PyKCS11.PyKCS11Error as exc:  # the login is the process's (PKCS#11 11.6)
        if exc.value != PyKCS11.CKR_USER_ALREADY_LOGGED_IN:
            raise
    try:
        return len(session.findObjects([]))
    finally:
        session.closeSession()


def _file_key(ws: Workspace) -> bytes:
    key = load_private_key(ws.keys_dir / "signing.key", "ed25519", None)
    assert isinstance(key, Ed25519PrivateKey)
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _snapshot(home: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(home)): p.read_bytes()
        for p in sorted(home.rglob("*"))
        if p.is_file() and p.suffix not in (".db", ".db-wal", ".db-shm")
    }


def _holders_of(home: Path, raw: bytes) -> list[str]:
    """Files under ``home`` holding the key's bytes, its hex, or a PEM private-key marker."""
    needles = (raw, raw.hex().encode(), raw.hex().upper().encode(), b"PRIVATE KEY")
    return [
        str(p.relative_to(home))
        for p in home.rglob("*")
        if p.is_file() and any(n in p.read_bytes() for n in needles)
    ]


def test_migrate_moves_the_file_key_into_the_token_and_the_node_stays_the_same(
    token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws, _ = Workspace.init(tmp_path / "site", name="site-a")
    with ws.ledger() as ledger:
        ledger.record("test.event", i=1)
    raw, node = _file_key(ws), ws.node_id
    assert _holders_of(ws.home, raw) == ["keys/signing.key"]

    args = ["keys", "migrate", "--home", str(ws.home), "--key-uri", uri_of(token)]
    assert run([*args, "--pkcs11-module", MODULE, "--json"]) == 0, capsys.readouterr().err
    shown = json.loads(capsys.readouterr().out)
    assert shown["keys"] == ["signing"]
    assert shown["destroyed"] == ["keys/signing.key"]

    moved = Workspace.open(ws.home)
    assert moved.node_id == node
    assert moved.signing_key_uri == uri_of(token)
    assert not (moved.keys_dir / "signing.key").exists()
    assert _holders_of(moved.home, raw) == []
    with moved.ledger() as ledger:  # signs in the token from now on
        ledger.record("test.event", i=2)
        (entry,) = ledger.entries(event_type="workspace.keys_migrated")
    assert entry.payload == {
        "node": node,
        "keys": ["signing"],
        "store": "pkcs11",
        "uris": {"signing": f"{uri_of(token)}?module-path={MODULE}"},
        "algorithms": {"signing": "ed25519"},
    }
    assert run(["audit", "verify", "--home", str(ws.home)]) == 0, capsys.readouterr().err
    assert _objects(token) == 2  # the key pair, nothing else


def test_attack_migrated_key_cannot_be_read_out_of_the_token(token: str, tmp_path: Path) -> None:
    import PyKCS11

    ws, _ = Workspace.init(tmp_path / "site")
    raw = _file_key(ws)
    migrate_keys(ws, uri_of(token), pkcs11_module=MODULE)
    key = Workspace.open(ws.home).signing_key()
    assert isinstance(key, TokenKey)
    session = key._session.session  # logged in as the site's user: the PIN is known
    (private,) = session.findObjects(
        [(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY), (PyKCS11.CKA_LABEL, "site-a")]
    )
    attributes = [PyKCS11.CKA_TOKEN, PyKCS11.CKA_PRIVATE, PyKCS11.CKA_SENSITIVE]
    assert session.getAttributeValue(private, attributes) == [True, True, True]
    assert session.getAttributeValue(private, [PyKCS11.CKA_EXTRACTABLE]) == [False]
    assert session.getAttributeValue(private, [PyKCS11.CKA_VALUE], allAsBinary=True) == [None]
    # Nor under any other attribute the token answers with.
    answers = session.getAttributeValue(
        private, [PyKCS11.CKA_LABEL, PyKCS11.CKA_ID, PyKCS11.CKA_EC_PARAMS], allAsBinary=True
    )
    assert all(raw not in bytes(a or b"") for a in answers)


def test_a_sealed_key_file_needs_its_passphrase(
    token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse battery staple")
    ws, _ = Workspace.init(tmp_path / "site")
    before = _snapshot(ws.home)
    monkeypatch.delenv(PASSPHRASE_ENV)
    with pytest.raises(PassphraseRequiredError, match="set INSITU_PASSPHRASE"):
        migrate_keys(ws, uri_of(token), pkcs11_module=MODULE)
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    with pytest.raises(WrongPassphraseError, match="does not open the keys"):
        migrate_keys(ws, uri_of(token), pkcs11_module=MODULE)
    assert _snapshot(ws.home) == before
    assert _objects(token) == 0
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse battery staple")
    migrate_keys(ws, uri_of(token), pkcs11_module=MODULE)
    with Workspace.open(ws.home).ledger() as ledger:
        assert ledger.verify().entries == 2  # workspace.init, workspace.keys_migrated
    assert not (ws.keys_dir / "signing.key").exists()


def _refused(
    ws: Workspace, args: list[str], capsys: pytest.CaptureFixture[str], words: str
) -> None:
    before = _snapshot(ws.home)
    code = run(["keys", "migrate", "--home", str(ws.home), *args])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.count("\n") == 1, err
    assert words in err
    assert _snapshot(ws.home) == before


def test_refusals_are_one_line_and_change_nothing_on_disk_or_in_the_token(
    token: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ws, _ = Workspace.init(tmp_path / "site")
    uri = ["--key-uri", uri_of(token)]
    monkeypatch.setenv(PIN_ENV, "0000-wrong")
    _refused(ws, [*uri, "--pkcs11-module", MODULE], capsys, "refused the PIN")
    monkeypatch.setenv(PIN_ENV, PIN)
    _refused(ws, [*uri, "--pkcs11-module", "/nonexistent/p11.so"], capsys, "does not exist")
    _refused(ws, uri, capsys, "no PKCS#11 module given")
    _refused(
        ws,
        ["--key-uri", uri_of("elsewhere"), "--pkcs11-module", MODULE],
        capsys,
        "no token labelled 'elsewhere'",
    )
    assert _objects(token) == 0
    # A label in use: another node's keys are there already.
    Workspace.init(tmp_path / "other", key_uri=uri_of(token), pkcs11_module=MODULE)
    theirs = _objects(token)
    _refused(ws, [*uri, "--pkcs11-module", MODULE], capsys, "already holds a key labelled")
    assert _objects(token) == theirs


def test_a_workspace_already_in_a_token_is_refused(
    token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws, _ = Workspace.init(tmp_path / "site", key_uri=uri_of(token), pkcs11_module=MODULE)
    its_own = _objects(token)
    args = ["--key-uri", uri_of(token, "again"), "--pkcs11-module", MODULE]
    _refused(ws, args, capsys, "is already in a token")
    with pytest.raises(TokenError, match="nothing to migrate"):
        migrate_keys(ws, uri_of(token, "again"), pkcs11_module=MODULE)
    assert _objects(token) == its_own


def test_a_token_without_ed25519_is_refused_before_anything_is_made(
    token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import PyKCS11

    ws, _ = Workspace.init(tmp_path / "site")
    before = _snapshot(ws.home)
    real = PyKCS11.PyKCS11Lib.getMechanismList

    def without_eddsa(self: object, slot: int) -> list[str]:
        return [m for m in real(self, slot) if m != "CKM_EDDSA"]

    monkeypatch.setattr(PyKCS11.PyKCS11Lib, "getMechanismList", without_eddsa)
    with pytest.raises(TokenError, match="cannot sign with Ed25519"):
        migrate_keys(ws, uri_of(token), pkcs11_module=MODULE)
    assert _snapshot(ws.home) == before
    assert _objects(token) == 0


def test_a_key_file_that_is_not_the_nodes_ed25519_key_is_refused(
    token: str, tmp_path: Path
) -> None:
    ws, _ = Workspace.init(tmp_path / "site")
    path = ws.keys_dir / "signing.key"
    save_private_key(path, X25519PrivateKey.generate(), None)
    with pytest.raises(KeyFileError, match="not an insitu ed25519 key file"):
        migrate_keys(ws, uri_of(token), pkcs11_module=MODULE)
    save_private_key(path, Ed25519PrivateKey.generate(), None)  # someone else's key
    with pytest.raises(KeyFileError, match=r"does not match keys/signing\.pub\.pem"):
        migrate_keys(ws, uri_of(token), pkcs11_module=MODULE)
    assert path.exists()
    assert _objects(token) == 0


def test_a_bad_uri_is_a_usage_error(token: str, tmp_path: Path) -> None:
    ws, _ = Workspace.init(tmp_path / "site")
    with pytest.raises(UsageError, match="carries a PIN"):
        migrate_keys(ws, f"{uri_of(token)}?pin-value=1234", pkcs11_module=MODULE)
    with pytest.raises(TokenKeyNotFoundError, match="no token labelled"):
        migrate_keys(ws, uri_of("nowhere"), pkcs11_module=MODULE)
    with pytest.raises(TokenModuleError, match="no PKCS#11 module given"):
        migrate_keys(ws, uri_of(token))


def test_the_library_refuses_a_wrong_pin(token: str, tmp_path: Path) -> None:
    ws, _ = Workspace.init(tmp_path / "site")
    with pytest.raises(WrongPinError, match="refused the PIN"):
        migrate_keys(ws, uri_of(token), pkcs11_module=MODULE, pin="0000-wrong")
    assert (ws.keys_dir / "signing.key").exists()
    assert _objects(token) == 0


def test_a_ledger_failure_after_the_config_was_written_undoes_everything(
    token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from insitu.audit import events

    ws, _ = Workspace.init(tmp_path / "site")
    before = _snapshot(ws.home)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    broken = SimpleNamespace(
        WORKSPACE_INIT=events.WORKSPACE_INIT,
        WORKSPACE_KEYS_MIGRATED=SimpleNamespace(record=disk_full),
    )
    monkeypatch.setattr("insitu.workspace._migrate.events", broken)
    with pytest.raises(OSError, match="No space left"):
        migrate_keys(ws, uri_of(token), pkcs11_module=MODULE)
    assert _snapshot(ws.home) == before  # config.toml as it was, the key file intact
    assert Workspace.open(ws.home).signing_key_uri is None
    assert _objects(token) == 0


def _bundle_for(public: object, publisher: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """A small signed bundle encrypted to ``public`` alone, and its model."""
    from insitu.bundle import ModelCard, create_bundle, schema_of
    from tests.bundle._models import mlp

    model, _ = mlp([4, 8, 2])
    inputs, outputs = schema_of(model)
    card = ModelCard(name="mlp", version="1.0.0", inputs=inputs, outputs=outputs)
    return create_bundle(model, card, publisher, recipients=[public]), model


def test_a_new_decryption_key_is_made_in_the_token_and_the_old_file_destroyed(
    token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from insitu.bundle import Bundle, BundleVerifier
    from insitu.workspace._pkcs11 import TokenDecryptionKey

    publisher = Ed25519PrivateKey.generate()
    verifier = BundleVerifier([publisher.public_key()])
    ws, _ = Workspace.init(tmp_path / "site", name="site-a")
    old = ws.encryption_key()
    assert isinstance(old, X25519PrivateKey)
    old_blob, _ = _bundle_for(old.public_key(), publisher)

    args = ["keys", "migrate", "--home", str(ws.home), "--key-uri", uri_of(token)]
    argv = [*args, "--pkcs11-module", MODULE, "--new-decryption-key", "--json"]
    assert run(argv) == 0, capsys.readouterr().err
    shown = json.loads(capsys.readouterr().out)
    assert shown["keys"] == ["signing", "decryption"]
    assert shown["replaced"] == ["decryption"]
    assert sorted(shown["destroyed"]) == ["keys/encryption.key", "keys/signing.key"]

    moved = Workspace.open(ws.home)
    assert moved.decryption_key_uri == uri_of(token, "site-a-decrypt")
    public = moved.encryption_public_key
    assert isinstance(public, ec.EllipticCurvePublicKey)  # encryption.pub.pem is the new key
    key = moved.encryption_key()
    assert isinstance(key, TokenDecryptionKey)
    blob, model = _bundle_for(public, publisher)
    assert bytes(verifier.open(Bundle.parse(blob), key).model) == model  # ECDH in the token
    # A new key, not the old one moved: what was encrypted to the old key stays shut.
    with pytest.raises(WrongDeviceKeyError, match="not encrypted for this device"):
        verifier.open(Bundle.parse(old_blob), key)
    raw_old = old.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    assert _holders_of(moved.home, raw_old) == []
    with moved.ledger() as ledger:
        (entry,) = ledger.entries(event_type="workspace.keys_migrated")
    assert entry.payload["replaced"] == ["decryption"]
    assert entry.payload["resealed"] == ["pseudonym", "data"]  # sealed to the new key
    assert entry.payload["algorithms"] == {"signing": "ed25519", "decryption": "p256-ecdh"}
    assert run(["audit", "verify", "--home", str(ws.home)]) == 0, capsys.readouterr().err
    assert _objects(token) == 4  # two key pairs


def test_a_signing_key_already_in_a_token_is_joined_by_a_new_decryption_key(
    token: str, tmp_path: Path
) -> None:
    ws, _ = Workspace.init(tmp_path / "site", name="site-a")
    migrate_keys(ws, uri_of(token), pkcs11_module=MODULE)
    with pytest.raises(TokenError, match=r"already in a token.*--new-decryption-key"):
        migrate_keys(Workspace.open(ws.home), uri_of(token))
    done = migrate_keys(Workspace.open(ws.home), uri_of(token), decryption=True)
    assert (done.keys, done.destroyed, done.replaced) == (
        ("decryption",),
        ("encryption.key",),
        ("decryption",),
    )
    both = Workspace.open(ws.home)
    assert both.decryption_key_uri == uri_of(token, "site-a-decrypt")
    with pytest.raises(TokenError, match="already in a token"):
        migrate_keys(both, uri_of(token), decryption=True)
    with both.ledger() as ledger:
        assert [
            e.payload["keys"] for e in ledger.entries(event_type="workspace.keys_migrated")
        ] == [
            ["signing"],
            ["decryption"],
        ]
        ledger.verify()


def test_a_decryption_label_in_use_changes_nothing_and_leaves_no_object(
    token: str, tmp_path: Path
) -> None:
    from insitu.workspace._pkcs11 import TokenKeyUri, generate_token_decryption_key

    taken = generate_token_decryption_key(
        TokenKeyUri.parse(uri_of(token, "site-a-decrypt"), module=MODULE), PIN
    )
    ws, _ = Workspace.init(tmp_path / "site", name="site-a")
    before = _snapshot(ws.home)
    with pytest.raises(TokenError, match="already holds a key labelled 'site-a-decrypt'"):
        migrate_keys(ws, uri_of(token), pkcs11_module=MODULE, decryption=True)
    assert _snapshot(ws.home) == before  # both key files, config.toml and the public keys
    assert Workspace.open(ws.home).signing_key_uri is None
    assert _objects(token) == 2  # the key pair that took the label, nothing of ours
    taken.destroy()
