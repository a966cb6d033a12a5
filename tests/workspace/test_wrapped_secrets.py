"""Site secrets sealed to the workspace's decryption key in a token (issue 19).

``keys/pseudonym.key`` (HMAC key of pseudonymization) and ``keys/data.key`` (AES-GCM key
of the sealed caches) are used in memory, so they cannot live in the token; in a
workspace whose decryption key is in a token they are sealed to it
(``insitu.workspace._wrapped``). The token store of this process is the one of
``test_pkcs11`` (SoftHSM2 reads its configuration once per process); "another machine"
is another process with a store of its own; the TPM (RSA-OAEP) case runs in processes
of its own with two swtpm. The attacker: a copy of the site's disk, config and all, on
a machine without the site's token.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import pandas as pd
import pytest

from insitu.audit import events
from insitu.data import DataSchema, Pseudonymizer, SiteDataset
from insitu.errors import KeyFileError
from insitu.workspace import PIN_ENV, Workspace, migrate_keys
from insitu.workspace._keys import create_secret
from insitu.workspace._pkcs11 import TokenDecryptionKey
from insitu.workspace._wrapped import SEALED_P256, SEALED_RSA
from tests import _swtpm
from tests.workspace.test_pkcs11 import MODULE, PIN, softhsm, softhsm_store, token, uri_of

__all__ = ["softhsm", "token"]  # fixtures, imported for the tests below

NAMES: tuple[Literal["pseudonym", "data"], ...] = ("pseudonym", "data")
TABLE = {
    "dataset": {"name": "triage", "label": "urgency", "classes": ["low", "high"]},
    "features": {"numeric": ["age"], "ranges": {"age": [0, 100]}},
    "consent": {"required": False, "legal_basis": "test"},
}


def _workspace_in_token(home: Path, label: str) -> Workspace:
    ws, created = Workspace.init(home, name="site-a", key_uri=uri_of(label), pkcs11_module=MODULE)
    assert created
    return ws


def _snapshot(home: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file()
    }


def _files_holding(home: Path, secret: bytes) -> list[str]:
    """The files under ``home`` holding ``secret``, raw or as hex (either case)."""
    needles = (secret, secret.hex().encode())
    return [
        name
        for name, data in _snapshot(home).items()
        if any(n in data or n in data.lower() for n in needles)
    ]


def _prepare(ws: Workspace, out: Path) -> pd.DataFrame:
    frame = pd.DataFrame({"age": [30, 40, 50, 60], "urgency": ["high", "low", "high", "low"]})
    schema = DataSchema.from_dict(TABLE)
    return SiteDataset.from_frame(ws, frame, schema, source="t", k=1, out=out).prepared.frame


_SECRETS = """
import hashlib, sys
from insitu.workspace import Workspace
ws = Workspace.open(sys.argv[1])
print(" ".join(hashlib.sha256(ws.secret(n)).hexdigest() for n in ("pseudonym", "data")))
"""


def test_a_token_workspace_holds_its_site_secrets_sealed_to_the_token_key(
    token: str, tmp_path: Path
) -> None:
    ws = _workspace_in_token(tmp_path / "site", token)
    opened = {name: ws.secret(name) for name in NAMES}
    assert opened["pseudonym"] != opened["data"]
    for name, secret in opened.items():
        doc = json.loads((ws.keys_dir / f"{name}.key").read_text())
        assert doc["protection"] == SEALED_P256
        assert doc["kind"] == "secret"
        assert _files_holding(ws.home, secret) == []
    # Another process (the same token store) opens the same secrets.
    proc = subprocess.run(
        [sys.executable, "-c", _SECRETS, str(ws.home)],
        env=os.environ,
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.split() == [hashlib.sha256(opened[n]).hexdigest() for n in NAMES]
    assert Workspace.open(ws.home).secret("data") == opened["data"]


def test_sealed_caches_and_pseudonyms_of_a_token_workspace_open_with_the_token(
    token: str, tmp_path: Path
) -> None:
    ws = _workspace_in_token(tmp_path / "site", token)
    written = _prepare(ws, tmp_path / "release")
    again = Workspace.open(ws.home)
    read = SiteDataset.open(again, tmp_path / "release").prepared.frame
    pd.testing.assert_frame_equal(read, written)
    assert Pseudonymizer(again.secret("pseudonym")).token("p-17") == Pseudonymizer(
        ws.secret("pseudonym")
    ).token("p-17")


def test_a_workspace_opens_each_sealed_secret_in_the_token_once(
    token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _workspace_in_token(tmp_path / "site", token).home
    calls = []
    exchange = TokenDecryptionKey.exchange

    def counted(self: TokenDecryptionKey, peer: object) -> bytes:
        calls.append(peer)
        return exchange(self, peer)  # type: ignore[arg-type]

    monkeypatch.setattr(TokenDecryptionKey, "exchange", counted)
    ws = Workspace.open(home)
    for _ in range(3):
        assert ws.secret("data") == ws.secret("data")
        ws.secret("pseudonym")
    assert len(calls) == 2
    Workspace.open(home).secret("data")  # another object (a ClientApp): once more
    assert len(calls) == 3


def test_a_token_workspace_still_opens_unsealed_secret_files(token: str, tmp_path: Path) -> None:
    ws = _workspace_in_token(tmp_path / "site", token)
    path = ws.keys_dir / "pseudonym.key"
    path.unlink()
    assert create_secret(path, None)  # as a workspace made before sealing wrote it
    doc = json.loads(path.read_text())
    assert Workspace.open(ws.home).secret("pseudonym") == bytes.fromhex(doc["secret"])


@pytest.mark.parametrize("field", ["secret", "encapsulation", "public"])
def test_attack_a_changed_sealed_secret_does_not_open(
    token: str, tmp_path: Path, field: str
) -> None:
    ws = _workspace_in_token(tmp_path / "site", token)
    path = ws.keys_dir / "data.key"
    doc = json.loads(path.read_text())
    if field == "encapsulation":  # another point on the curve: another shared secret
        other = json.loads((ws.keys_dir / "pseudonym.key").read_text())
        doc[field] = other[field]
    else:
        value = bytearray.fromhex(doc[field])
        value[0] ^= 1
        doc[field] = value.hex()
    path.write_text(json.dumps(doc))
    before = _snapshot(ws.home)
    with pytest.raises(KeyFileError, match=r"data\.key does not open with the token key"):
        Workspace.open(ws.home).secret("data")
    assert _snapshot(ws.home) == before


_CLONE_OPENS = """
import sys
from pathlib import Path
from insitu.data import SiteDataset
from insitu.workspace import Workspace
from insitu.workspace._pkcs11 import TokenKeyUri, generate_token_decryption_key
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

home, release, how, module = sys.argv[1:5]
ws = Workspace.open(home)
if how in ("decoy", "swap"):  # a key of the same label, made in this machine's token
    uri = TokenKeyUri.parse(ws.decryption_key_uri, module=module)
    decoy = generate_token_decryption_key(uri, "{pin}")
    if how == "swap":  # ... and its public key put in place of the site's
        pem = decoy.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        Path(home, "keys", "encryption.pub.pem").write_bytes(pem)
if how == "forget":  # the config says nothing of a token key any more
    config = Path(home, "config.toml")
    text = config.read_text()
    config.write_text("\\n".join(l for l in text.splitlines() if not l.startswith("decryption")))
    ws = Workspace.open(home)
try:
    if how == "cache":
        SiteDataset.open(ws, Path(release))
    else:
        ws.secret("pseudonym")
except Exception as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
print("opened")
"""


def test_attack_cloned_site_cannot_open_its_secrets(token: str, tmp_path: Path) -> None:
    ws = _workspace_in_token(tmp_path / "site", token)
    _prepare(ws, tmp_path / "release")
    script = _CLONE_OPENS.replace("{pin}", PIN)

    def clone_opens(how: str) -> tuple[int, str, dict[str, bytes], dict[str, bytes]]:
        """Another machine: a store of its own, with a token of the site's token label."""
        env = softhsm_store(tmp_path / "hsm" / how, label=token) | {PIN_ENV: PIN}
        clone = tmp_path / "stolen" / how / "site"
        shutil.copytree(ws.home, clone)
        before = _snapshot(clone)
        proc = subprocess.run(
            [sys.executable, "-c", script, str(clone), str(tmp_path / "release"), how, MODULE],
            env=os.environ | env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode != 1, proc.stderr
        return proc.returncode, proc.stdout.strip(), before, _snapshot(clone)

    for how in ("none", "cache"):
        code, said, before, after = clone_opens(how)
        assert code == 3
        assert said.startswith("TokenKeyNotFoundError token ")
        assert "site-a-decrypt" in said
        assert "\n" not in said
        assert after == before  # nothing written
    code, said, before, after = clone_opens("decoy")
    assert (code, said) == (
        3,
        f"KeyFileError pkcs11:token={token};object=site-a-decrypt does not match "
        "keys/encryption.pub.pem",
    )
    assert after == before
    code, said, _, _ = clone_opens("swap")
    assert code == 3
    assert said.startswith("KeyFileError ")
    assert "pseudonym.key is sealed to another token key than this workspace's" in said
    assert "\n" not in said
    code, said, before, after = clone_opens("forget")
    assert code == 3
    assert said.startswith("KeyFileError ")
    assert "pseudonym.key is sealed to a token key and this workspace names none" in said
    del before["config.toml"], after["config.toml"]  # the attacker's edit
    assert after == before


def test_a_file_workspace_keeps_its_secret_files_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = {"format", "kind", "public", "protection", "secret"}
    ws, _ = Workspace.init(tmp_path / "plain", name="plain")
    for name in NAMES:
        doc = json.loads((ws.keys_dir / f"{name}.key").read_text())
        assert set(doc) == fields
        assert doc["protection"] == "none"
        assert Workspace.open(ws.home).secret(name) == bytes.fromhex(doc["secret"])
    monkeypatch.setenv("INSITU_PASSPHRASE", "correct horse")
    ws, _ = Workspace.init(tmp_path / "sealed", name="sealed")
    for name in NAMES:
        doc = json.loads((ws.keys_dir / f"{name}.key").read_text())
        assert set(doc) == fields | {"kdf", "nonce"}
        assert doc["protection"] == "scrypt+aes-256-gcm"
        assert len(Workspace.open(ws.home).secret(name)) == 32


def test_a_new_decryption_key_reseals_the_site_secrets_to_it(
    token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INSITU_PASSPHRASE", "correct horse")
    ws, _ = Workspace.init(tmp_path / "site", name="site-a")
    before = {name: ws.secret(name) for name in NAMES}
    migrate_keys(ws, uri_of(token), pkcs11_module=MODULE, decryption=True)
    monkeypatch.delenv("INSITU_PASSPHRASE")  # the token alone opens them now
    moved = Workspace.open(ws.home)
    for name, secret in before.items():
        doc = json.loads((moved.keys_dir / f"{name}.key").read_text())
        assert doc["protection"] == SEALED_P256
        assert moved.secret(name) == secret  # the same pseudonyms, the same caches
        assert _files_holding(moved.home, secret) == []


def test_a_failed_migration_leaves_the_site_secrets_as_they_were(
    token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws, _ = Workspace.init(tmp_path / "site", name="site-a")
    before = _snapshot(ws.keys_dir)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    broken = SimpleNamespace(
        WORKSPACE_INIT=events.WORKSPACE_INIT,
        WORKSPACE_KEYS_MIGRATED=SimpleNamespace(record=disk_full),
    )
    monkeypatch.setattr("insitu.workspace._migrate.events", broken)
    with pytest.raises(OSError, match="No space left"):
        migrate_keys(ws, uri_of(token), pkcs11_module=MODULE, decryption=True)
    assert _snapshot(ws.keys_dir) == before
    assert Workspace.open(ws.home).decryption_key_uri is None


_TPM_SECRETS = """
import json, sys
from insitu.workspace import Workspace
home, uri, module = sys.argv[1:4]
try:
    if uri != "-":
        ws, _ = Workspace.init(home, name="node", key_uri=uri, pkcs11_module=module)
    ws = Workspace.open(home)
    secrets = {n: ws.secret(n).hex() for n in ("pseudonym", "data")}
except Exception as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
print(json.dumps(secrets))
"""


def test_a_tpm_workspace_seals_its_site_secrets_with_rsa_oaep(tmp_path: Path) -> None:
    """A TPM (swtpm, tpm2-pkcs11) has no ECDH: the secrets are sealed by RSA-OAEP there.

    Each step runs in a process of its own (tpm2-pkcs11 reads its TCTI once per process);
    a copy of the workspace on a machine with another TPM does not open them.
    """
    why = _swtpm.missing()
    if why is not None:
        pytest.skip(why)
    tpms: list[_swtpm.SoftwareTpm] = []
    home = tmp_path / "node"

    def secrets_in(tpm: _swtpm.SoftwareTpm, where: Path, uri: str = "-") -> tuple[int, str]:
        proc = subprocess.run(
            [sys.executable, "-c", _TPM_SECRETS, str(where), uri, _swtpm.MODULE],
            env=os.environ | tpm.env | {PIN_ENV: PIN},
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        assert proc.returncode in (0, 3), proc.stderr
        return proc.returncode, proc.stdout.strip().splitlines()[-1]

    try:
        for i in (0, 1):  # the site's TPM, and another machine's (its token of the same label)
            tpms.append(
                _swtpm.SoftwareTpm(tmp_path / f"tpm-{i}", token="site", pin=PIN, so_pin="1357")
            )
        code, made = secrets_in(tpms[0], home, "pkcs11:token=site;object=node")
        assert code == 0, made
        clone = tmp_path / "stolen" / "node"
        shutil.copytree(home, clone)
        assert secrets_in(tpms[0], home) == (0, made)  # another process, the same TPM
        before = _snapshot(clone)
        code, said = secrets_in(tpms[1], clone)
        assert _snapshot(clone) == before  # nothing written
    finally:
        for tpm in tpms:
            tpm.stop()
    for name, value in json.loads(made).items():
        doc = json.loads((home / "keys" / f"{name}.key").read_text())
        assert doc["protection"] == SEALED_RSA
        assert _files_holding(home, bytes.fromhex(value)) == []
    assert code == 3
    assert said.startswith(
        "TokenKeyNotFoundError token 'site' holds no key labelled 'node-decrypt'"
    )
