"""A node's signing key in a PKCS#11 token (SoftHSM2): made there, used there, never out.

Each test gets its own SoftHSM2 token store (``SOFTHSM2_CONF`` pointing into its
tmp_path), so a second store is "another machine". The attacker of
``test_attack_cloned_site_cannot_sign`` has a full copy of the workspace and a token of
their own; the one of ``test_attack_token_key_cannot_be_read_out`` is logged in to the
token itself.
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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from insitu._signer import ED25519, P256, algorithm_of
from insitu.audit import export_ledger, verify_export
from insitu.bundle import Bundle, BundleVerifier, ModelCard, create_bundle, schema_of
from insitu.cli import run
from insitu.errors import (
    TokenError,
    TokenKeyNotFoundError,
    TokenModuleError,
    UsageError,
    WorkspaceError,
    WrongPinError,
)
from insitu.workspace import PIN_ENV, Workspace
from insitu.workspace._pkcs11 import TokenKeyUri, open_token_key
from tests.bundle._models import mlp

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "4321-insitu"


SO_PIN = "87654321"
_labels = itertools.count()


def softhsm_store(root: Path, *, label: str) -> dict[str, str]:
    """A new SoftHSM2 token store under ``root`` with one token: the environment to use it."""
    if shutil.which("softhsm2-util") is None or not Path(MODULE).is_file():
        pytest.fail("SoftHSM2 is not installed; run ./scripts/bootstrap (Debian: softhsm2)")
    store = root / "tokens"
    store.mkdir(parents=True)
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {store}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    env = {"SOFTHSM2_CONF": str(conf), "PATH": os.environ["PATH"]}
    init = ("softhsm2-util", "--init-token", "--free", "--label", label)
    subprocess.run(
        [*init, "--pin", PIN, "--so-pin", SO_PIN], check=True, env=env, capture_output=True
    )
    return env


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """This process's token store. SoftHSM2 reads its configuration once per process
    (C_Initialize), so every test here shares the store and gets a token of its own
    (:func:`token`); "another machine" is another process with another store."""
    env = softhsm_store(tmp_path_factory.mktemp("hsm"), label="first")
    before = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = env["SOFTHSM2_CONF"]
    yield
    if before is None:
        del os.environ["SOFTHSM2_CONF"]
    else:
        os.environ["SOFTHSM2_CONF"] = before


@pytest.fixture
def token(softhsm: None, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh token (its label) in this process's store, the user PIN in the environment."""
    import PyKCS11

    label = f"t{next(_labels)}"
    lib = PyKCS11.PyKCS11Lib()
    lib.load(MODULE)
    free = [s for s in lib.getSlotList() if not lib.getTokenInfo(s).label.strip()]
    lib.initToken(free[0], SO_PIN, label.ljust(32))
    (slot,) = [s for s in lib.getSlotList() if lib.getTokenInfo(s).label.strip() == label]
    session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
    session.login(SO_PIN, user_type=PyKCS11.CKU_SO)
    session.initPin(PIN)
    session.logout()
    session.closeSession()
    monkeypatch.setenv(PIN_ENV, PIN)
    return label


def uri_of(label: str, obj: str = "site-a") -> str:
    return f"pkcs11:token={label};object={obj}"


def _workspace_in_token(home: Path, label: str) -> Workspace:
    ws, created = Workspace.init(home, name="site-a", key_uri=uri_of(label), pkcs11_module=MODULE)
    assert created
    return ws


def _private_markers(home: Path) -> list[str]:
    found = []
    for path in home.rglob("*"):
        if path.is_file() and b"PRIVATE KEY" in path.read_bytes():
            found.append(str(path.relative_to(home)))
    return found


def test_a_workspace_in_a_token_signs_its_ledger_and_bundles_there(
    token: str, tmp_path: Path
) -> None:
    ws = _workspace_in_token(tmp_path / "site", token)
    assert not (ws.keys_dir / "signing.key").exists()
    assert ws.signing_key_uri == uri_of(token)
    with ws.ledger() as ledger:
        for i in range(20):
            ledger.record("test.event", i=i)
        ledger.sign_head()
    with ws.ledger() as ledger:
        assert ledger.verify().entries == 21  # workspace.init and the 20 events
        (init,) = ledger.entries(event_type="workspace.init")
    assert init.payload["signing_key_store"] == "pkcs11"
    assert init.payload["signing_key_uri"] == uri_of(token)

    model, _ = mlp([8, 4, 2])
    inputs, outputs = schema_of(model)
    card = ModelCard(name="m", version="1.0.0", inputs=inputs, outputs=outputs)
    blob = create_bundle(model, card, ws.signing_key())
    BundleVerifier([ws.signing_public_key]).verify(Bundle.parse(blob))
    # Nothing that could sign is on disk: no signing.key, no PEM private key of it. (The
    # bundle decryption key is still a file: keys/encryption.key, scrypt-sealed or 0600.)
    assert [p for p in _private_markers(ws.home) if "encryption.key" not in p] == []


def test_the_command_line_makes_a_workspace_in_a_token(
    token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = str(tmp_path / "site")
    code = run(["init", "--home", home, "--key-uri", uri_of(token), "--pkcs11-module", MODULE])
    assert code == 0, capsys.readouterr().err
    assert f"in token {uri_of(token)}" in capsys.readouterr().out
    assert run(["audit", "verify", "--home", home]) == 0


def _sessions_of(label: str) -> int:
    """How many sessions the token ``label`` has open (``ulSessionCount``)."""
    import PyKCS11

    lib = PyKCS11.PyKCS11Lib()
    lib.load(MODULE)
    (slot,) = [s for s in lib.getSlotList() if lib.getTokenInfo(s).label.strip() == label]
    return int(lib.getTokenInfo(slot).ulSessionCount)


def test_a_command_releases_the_token_sessions_it_opened_and_keeps_the_callers(
    token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A TPM without a resource manager holds three objects while their sessions are open:
    # a command run in process must release its keys as its own process's end would, even
    # when something of the command still holds them (a simulation's threads did).
    from insitu.workspace import open_token_sessions

    monkeypatch.setenv(PIN_ENV, PIN)
    home = str(tmp_path / "site")
    assert run(["init", "--home", home, "--key-uri", uri_of(token), "--pkcs11-module", MODULE]) == 0
    held = Workspace.open(home).signing_key()  # the caller's own session, open across commands
    lingering: list[object] = []
    opened = Workspace.signing_key

    def keeping(self: Workspace, passphrase: str | None = None) -> object:
        key = opened(self, passphrase)
        lingering.append(key)  # a reference the command leaves behind
        return key

    monkeypatch.setattr(Workspace, "signing_key", keeping)
    before, counted = open_token_sessions(), _sessions_of(token)
    assert run(["audit", "head", "--home", home, "--json"]) == 0, capsys.readouterr().err
    assert lingering  # the command did open the key in the token
    assert open_token_sessions() == before
    assert _sessions_of(token) == counted  # as the token counts them, not only Python
    monkeypatch.setattr(Workspace, "signing_key", opened)
    held.sign(b"the caller's key still signs")
    with Workspace.open(home).ledger() as ledger:  # and a new one opens after the command
        ledger.record("test.event", i=1)


def test_attack_token_key_cannot_be_read_out(token: str, tmp_path: Path) -> None:
    import PyKCS11

    ws = _workspace_in_token(tmp_path / "site", token)
    key = open_token_key(TokenKeyUri.parse(uri_of(token), module=MODULE), PIN)
    session = key._session.session  # logged in as the site's user: the PIN is known
    (private,) = session.findObjects(
        [(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY), (PyKCS11.CKA_LABEL, "site-a")]
    )
    sensitive, extractable = session.getAttributeValue(
        private, [PyKCS11.CKA_SENSITIVE, PyKCS11.CKA_EXTRACTABLE]
    )
    assert (sensitive, extractable) == (True, False)
    # The token answers CKR_ATTRIBUTE_SENSITIVE for the key's value (PyKCS11: None).
    assert session.getAttributeValue(private, [PyKCS11.CKA_VALUE], allAsBinary=True) == [None]
    assert ws.signing_public_key == key.public_key()


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


def test_attack_cloned_site_cannot_sign(token: str, tmp_path: Path) -> None:
    ws = _workspace_in_token(tmp_path / "site", token)
    clone = tmp_path / "stolen" / "site"
    shutil.copytree(ws.home, clone)
    # Another machine (another process, its own token store) with a token of the same
    # label holding, at first, no key; then a key of the same label (made by a decoy
    # workspace). The copy has everything the site's disk had, and signs nothing.
    env = softhsm_store(tmp_path / "other-hsm", label=token) | {PIN_ENV: PIN}

    def clone_signs() -> tuple[int, str]:
        proc = subprocess.run(
            [sys.executable, "-c", _CLONE_SIGNS, str(clone)],
            env=os.environ | env,
            capture_output=True,
            text=True,
            check=False,
        )
        return proc.returncode, proc.stdout.strip()

    attempts = [clone_signs()]
    insitu = str(Path(sys.executable).with_name("insitu"))
    subprocess.run(
        [
            *(insitu, "init", "--home", str(tmp_path / "decoy")),
            *("--key-uri", uri_of(token), "--pkcs11-module", MODULE),
        ],
        env=os.environ | env,
        check=True,
        capture_output=True,
    )
    attempts.append(clone_signs())
    assert attempts[0] == (
        3,
        f"TokenKeyNotFoundError token '{token}' holds no key labelled "
        "'site-a'; this workspace's key is in another token (restore it, or "
        "use the token it was made in)",
    )
    assert attempts[1][0] == 3
    assert attempts[1][1].startswith("KeyFileError pkcs11:")
    assert "does not match keys/signing.pub.pem" in attempts[1][1]
    with Workspace.open(clone).ledger() as ledger:  # the original's events only
        assert [e.type for e in ledger.entries()] == ["workspace.init"]
    with ws.ledger() as ledger:  # on the site's own machine, the site signs
        ledger.record("test.event", i=1)


def test_a_wrong_pin_is_one_line_and_writes_nothing(
    token: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(PIN_ENV, "0000-wrong")
    home = tmp_path / "site"
    with pytest.raises(WrongPinError, match=f"'{token}' refused the PIN; check INSITU_PKCS11_PIN"):
        Workspace.init(home, key_uri=uri_of(token), pkcs11_module=MODULE)
    assert not home.exists()
    args = ["init", "--home", str(home), "--key-uri", uri_of(token), "--pkcs11-module", MODULE]
    code = run(args)
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1
    assert "refused the PIN" in err
    assert list(tmp_path.iterdir()) == []


def test_no_pin_is_one_line(token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PIN_ENV)
    with pytest.raises(TokenError, match="needs its user PIN; set INSITU_PKCS11_PIN"):
        Workspace.init(tmp_path / "site", key_uri=uri_of(token), pkcs11_module=MODULE)
    assert not (tmp_path / "site").exists()


def test_a_missing_module_is_one_line_and_writes_nothing(token: str, tmp_path: Path) -> None:
    home = tmp_path / "site"
    with pytest.raises(TokenModuleError, match=r"module /nonexistent/lib\.so does not exist"):
        Workspace.init(home, key_uri=uri_of(token), pkcs11_module="/nonexistent/lib.so")
    not_a_module = tmp_path / "not-a-module.so"
    not_a_module.write_bytes(b"\x7fELF garbage")
    with pytest.raises(TokenModuleError, match="is not a PKCS#11 library that loads"):
        Workspace.init(home, key_uri=uri_of(token), pkcs11_module=str(not_a_module))
    with pytest.raises(TokenModuleError, match="no PKCS#11 module given"):
        Workspace.init(home, key_uri=uri_of(token))
    assert not home.exists()


def test_a_token_without_the_key_or_label_is_named(token: str, tmp_path: Path) -> None:
    with pytest.raises(TokenKeyNotFoundError, match="no token labelled 'elsewhere'"):
        Workspace.init(tmp_path / "a", key_uri=uri_of("elsewhere"), pkcs11_module=MODULE)
    never = TokenKeyUri.parse(uri_of(token, "never-made"), module=MODULE)
    with pytest.raises(TokenKeyNotFoundError, match="holds no key labelled 'never-made'"):
        open_token_key(never, PIN)


def test_a_label_in_use_is_refused_two_nodes_never_share_a_key(token: str, tmp_path: Path) -> None:
    _workspace_in_token(tmp_path / "site", token)
    with pytest.raises(TokenError, match="already holds a key labelled 'site-a'"):
        Workspace.init(tmp_path / "second", key_uri=uri_of(token), pkcs11_module=MODULE)
    assert not (tmp_path / "second").exists()


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("token=insitu;object=k", "is not a PKCS#11 URI"),
        ("pkcs11:token=insitu", "must name the token and the key"),
        ("pkcs11:token=insitu;object=k?pin-value=1234", "carries a PIN; remove it"),
        ("pkcs11:token=insitu;slot=3;object=k", "'slot=3' is not a path attribute"),
    ],
)
def test_bad_key_uris_are_usage_errors(uri: str, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        TokenKeyUri.parse(uri)


def test_uris_are_percent_decoded_and_take_the_module_from_the_query() -> None:
    uri = TokenKeyUri.parse("pkcs11:token=my%20hsm;object=site%3Ba?module-path=/lib/p11.so")
    assert (uri.token, uri.object, uri.module) == ("my hsm", "site;a", "/lib/p11.so")
    assert TokenKeyUri.parse("pkcs11:token=t;object=o?module-path=/a", module="/b").module == "/b"


def test_an_existing_workspace_is_not_moved_into_a_token_by_init(
    token: str, tmp_path: Path
) -> None:
    Workspace.init(tmp_path / "site")
    with pytest.raises(WorkspaceError, match="already a workspace with its keys"):
        Workspace.init(tmp_path / "site", key_uri=uri_of(token), pkcs11_module=MODULE)


def test_the_token_signs_as_the_workspace_identity(token: str, tmp_path: Path) -> None:
    ws = _workspace_in_token(tmp_path / "site", token)
    key = ws.signing_key()
    assert isinstance(key.public_key(), Ed25519PublicKey)
    key.public_key().verify(key.sign(b"hello"), b"hello")


def test_a_p256_key_in_softhsm_signs_the_ledger_bundles_and_exports(
    token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "site"
    args = ["init", "--home", str(home), "--key-uri", uri_of(token), "--pkcs11-module", MODULE]
    assert run([*args, "--key-algorithm", "p256"]) == 0, capsys.readouterr().err
    assert f"in token {uri_of(token)} ({P256})" in capsys.readouterr().out
    ws = Workspace.open(home)
    assert algorithm_of(ws.signing_public_key) == P256
    with ws.ledger() as ledger:
        for i in range(5):
            ledger.record("test.event", i=i)
        (init,) = ledger.entries(event_type="workspace.init")
        export_ledger(ledger, tmp_path / "export.jsonl")
    assert init.payload["signing_algorithm"] == P256
    assert init.sig.startswith(b"ecdsa-p256-sha256:")
    exported = verify_export(tmp_path / "export.jsonl", public_key=ws.signing_public_key)
    assert exported.node_id == ws.node_id

    model, _ = mlp([8, 4, 2])
    inputs, outputs = schema_of(model)
    card = ModelCard(name="m", version="1.0.0", inputs=inputs, outputs=outputs)
    blob = create_bundle(model, card, ws.signing_key())
    BundleVerifier([ws.signing_public_key]).verify(Bundle.parse(blob))
    assert run(["audit", "verify", "--home", str(home)]) == 0
    assert [p for p in _private_markers(ws.home) if "encryption.key" not in p] == []


def test_softhsm_gives_ed25519_unless_told_and_records_it(token: str, tmp_path: Path) -> None:
    ws = _workspace_in_token(tmp_path / "site", token)
    with ws.ledger() as ledger:
        (init,) = ledger.entries(event_type="workspace.init")
    assert init.payload["signing_algorithm"] == ED25519
    assert len(init.sig) == 64  # a bare Ed25519 signature, as before P-256 came


def test_a_key_algorithm_needs_a_token_and_a_known_name(token: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="give --key-uri too"):
        Workspace.init(tmp_path / "a", key_algorithm="p256")
    with pytest.raises(UsageError, match="'rsa' is not one insitu signs with; use ed25519 or p256"):
        Workspace.init(
            tmp_path / "a", key_uri=uri_of(token), pkcs11_module=MODULE, key_algorithm="rsa"
        )
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ResourceWarning")  # Ray's own leftovers
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_federation_whose_coordinator_key_is_in_the_token_trains_and_verifies(
    token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from insitu.data import DataSchema, read_table
    from insitu.datasets import builtin_data, builtin_schema
    from insitu.federated import FederationConfig, simulate

    ws = _workspace_in_token(tmp_path / "coordinator", token)
    frame = read_table(builtin_data("adult")).iloc[:6000]
    config = FederationConfig(sites=3, rounds=1, secure_aggregation=False)
    doc = DataSchema.load(builtin_schema("adult")).source
    doc["consent"] = {"required": False, "legal_basis": "GDPR art. 6(1)(e), test"}
    result = simulate(ws, frame, config, schema=DataSchema.from_dict(doc))
    assert result.central_accuracy is not None
    with ws.ledger() as ledger:
        # The run's entries were signed in the token, and verify against its public key.
        assert ledger.entries(event_type="federation.completed")
        assert ledger.verify().entries >= 3
    assert run(["audit", "verify", "--home", str(ws.home), "--json"]) == 0, capsys.readouterr()
    assert not (ws.keys_dir / "signing.key").exists()
    assert [p for p in _private_markers(ws.home) if "encryption.key" not in p] == []
