"""Workspace creation, keys at rest, and the errors of a broken workspace."""

from __future__ import annotations

import json
import stat

import pytest

from insitu.errors import (
    ConfigError,
    KeyFileError,
    PassphraseRequiredError,
    WorkspaceError,
    WorkspaceNotFoundError,
    WorkspaceNotWritableError,
    WrongPassphraseError,
)
from insitu.workspace import Workspace

SECRET_FILES = ("signing.key", "encryption.key", "api-token", "pseudonym.key", "data.key")


def test_init_creates_config_keys_and_a_verified_ledger(workspace):
    assert workspace.config.get("node", "id") == workspace.node_id
    assert workspace.name == "test-site"
    for name in SECRET_FILES:
        mode = stat.S_IMODE((workspace.keys_dir / name).stat().st_mode)
        assert mode == 0o600, name
    assert stat.S_IMODE(workspace.keys_dir.stat().st_mode) == 0o700
    with workspace.ledger() as ledger:
        first = ledger.entries()[0]
        assert first.type == "workspace.init"
        assert first.payload["node"] == workspace.node_id
        assert ledger.verify().entries == 1
    # The X25519 key pair is whole.
    assert workspace.encryption_key().public_key().public_bytes_raw() == (
        workspace.encryption_public_key.public_bytes_raw()
    )


def test_init_twice_does_not_overwrite_keys(workspace):
    before = {name: (workspace.keys_dir / name).read_bytes() for name in SECRET_FILES}
    again, created = Workspace.init(workspace.home)
    assert not created
    assert again.node_id == workspace.node_id
    assert {name: (workspace.keys_dir / name).read_bytes() for name in SECRET_FILES} == before


def test_home_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("INSITU_HOME", str(tmp_path / "from-env"))
    ws, _ = Workspace.init()
    assert ws.home == tmp_path / "from-env"
    assert Workspace.open().node_id == ws.node_id


def test_keys_are_encrypted_with_the_passphrase(tmp_path, monkeypatch):
    monkeypatch.setenv("INSITU_PASSPHRASE", "correct horse battery staple")
    ws, _ = Workspace.init(tmp_path / "ws")
    doc = json.loads((ws.keys_dir / "signing.key").read_text())
    assert doc["protection"] == "scrypt+aes-256-gcm"
    assert doc["kdf"]["n"] >= 2**15
    raw_secret = ws.signing_key().private_bytes_raw().hex()
    assert raw_secret not in (ws.keys_dir / "signing.key").read_text()
    with ws.ledger() as ledger:
        ledger.record("test.event")


def test_wrong_passphrase_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("INSITU_PASSPHRASE", "right")
    ws, _ = Workspace.init(tmp_path / "ws")
    monkeypatch.setenv("INSITU_PASSPHRASE", "wrong")
    with ws.ledger() as ledger:
        before = len(ledger)
        with pytest.raises(WrongPassphraseError, match="does not open"):
            ledger.record("test.event")
        assert len(ledger) == before
        ledger.verify()  # reading and verifying never need the passphrase


def test_missing_passphrase_for_encrypted_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("INSITU_PASSPHRASE", "right")
    ws, _ = Workspace.init(tmp_path / "ws")
    monkeypatch.delenv("INSITU_PASSPHRASE")
    with pytest.raises(PassphraseRequiredError, match="INSITU_PASSPHRASE"):
        ws.signing_key()


def test_key_file_moved_between_workspaces_does_not_open(tmp_path, monkeypatch):
    # The AEAD binds the public key: a ciphertext pasted under another public key fails.
    monkeypatch.setenv("INSITU_PASSPHRASE", "same")
    a, _ = Workspace.init(tmp_path / "a")
    b, _ = Workspace.init(tmp_path / "b")
    doc_a = json.loads((a.keys_dir / "signing.key").read_text())
    doc_b = json.loads((b.keys_dir / "signing.key").read_text())
    doc_a["public"] = doc_b["public"]
    (a.keys_dir / "signing.key").write_text(json.dumps(doc_a))
    with pytest.raises(WrongPassphraseError):
        a.signing_key()


def test_missing_workspace(tmp_path):
    with pytest.raises(WorkspaceNotFoundError, match="insitu init"):
        Workspace.open(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("this is = = not toml", "not valid TOML"),
        (
            '[node]\nid = "x"\nname = "y"\ncreated = "z"\n[ledger]\nhead_interval = "many"\n',
            "must be a int",
        ),
        ('[node]\nid = "x"\nname = "y"\ncreated = "z"\n[ledgr]\n', "unknown section"),
        ('[node]\nid = "x"\nname = "y"\n', "required key node.created"),
        ('[node]\nid = "x"\nname = "y"\ncreated = "z"\n[server]\nport = true\n', "must be a int"),
    ],
)
def test_corrupt_config(workspace, content, message):
    workspace.config_path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        Workspace.open(workspace.home)


def test_corrupt_key_file(workspace):
    (workspace.keys_dir / "signing.key").write_text("{not json")
    with pytest.raises(KeyFileError, match="restore it"):
        workspace.signing_key()


def test_unwritable_home_leaves_nothing_behind(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(WorkspaceNotWritableError, match="writable --home"):
        Workspace.init(blocker / "deeper" / "ws")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_failure_while_populating_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("insitu.workspace._workspace.save_config", boom)
    with pytest.raises(WorkspaceNotWritableError, match="No space left"):
        Workspace.init(tmp_path / "parents" / "ws")
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_directory_that_is_not_a_workspace_is_left_alone(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.csv").write_text("a,b\n")
    with pytest.raises(WorkspaceError, match="not an insitu workspace"):
        Workspace.init(tmp_path / "data")
    assert (tmp_path / "data" / "precious.csv").read_text() == "a,b\n"


def test_site_secrets_are_created_once_and_differ(workspace, tmp_path):
    pseudonym = workspace.secret("pseudonym")
    assert len(pseudonym) == 32
    assert workspace.secret("pseudonym") == pseudonym
    assert workspace.secret("data") != pseudonym
    other, _ = Workspace.init(tmp_path / "other")
    assert other.secret("pseudonym") != pseudonym


def test_a_site_secret_missing_from_an_older_workspace_is_created_without_overwriting(workspace):
    (workspace.keys_dir / "data.key").unlink()
    created = workspace.secret("data")
    assert workspace.secret("data") == created
    assert stat.S_IMODE((workspace.keys_dir / "data.key").stat().st_mode) == 0o600


def test_site_secrets_are_encrypted_with_the_passphrase(tmp_path, monkeypatch):
    monkeypatch.setenv("INSITU_PASSPHRASE", "pw")
    ws, _ = Workspace.init(tmp_path / "ws")
    secret = ws.secret("pseudonym")
    assert secret.hex() not in (ws.keys_dir / "pseudonym.key").read_text()
    monkeypatch.setenv("INSITU_PASSPHRASE", "other")
    with pytest.raises(WrongPassphraseError):
        ws.secret("pseudonym")
