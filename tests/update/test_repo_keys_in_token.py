"""The update repository's TUF role keys in a PKCS#11 token (SoftHSM2).

``insitu repo init --key-uri`` generates one ECDSA P-256 key per role in the token and
keeps only where each lives; every metadata signature (publish, timestamp, rotation) is
made there, and devices verify ``ecdsa-sha2-nistp256`` as any other TUF key. The token
store of this process is the one of ``tests/workspace/test_pkcs11.py`` (SoftHSM2 reads
its configuration once per process); "another machine" is another process with a store
of its own. The attacker of ``test_attack_cloned_repository_cannot_sign_metadata`` has a
full copy of the repository's directory (and the publisher's workspace) and a token of
their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from insitu.errors import RepositoryError
from insitu.update import init_directory_repository
from insitu.workspace import PIN_ENV, Workspace
from tests.bundle._models import write_trained_pair
from tests.update._cli import MODELS, WIDTHS, Site, invoke, invoke_json
from tests.update._http import serving
from tests.workspace.test_pkcs11 import MODULE, PIN, softhsm, softhsm_store, token

__all__ = ["softhsm", "token"]  # fixtures, imported for the tests below

ROLES = ("root", "targets", "assignments", "snapshot", "timestamp")


def _uri(label: str, obj: str = "repo") -> str:
    return f"pkcs11:token={label};object={obj}"


def _site_with_token_repo(root: Path, capsys: pytest.CaptureFixture[str], label: str) -> Site:
    """Publisher and device workspaces (file keys) and a repository whose keys are in ``label``."""
    site = Site(root, capsys)
    for home in (site.publisher, site.device):
        assert invoke(capsys, "init", "--home", home)[0] == 0
    write_trained_pair(site.publisher, WIDTHS, root / MODELS["1.0.0"], root / MODELS["2.0.0"])
    invoke_json(
        capsys, "repo", "init", str(site.repo), "--home", site.publisher,
        "--key-uri", _uri(label), "--pkcs11-module", MODULE,
    )  # fmt: skip
    return site


def _private_markers(directory: Path) -> list[str]:
    return [
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and b"PRIVATE KEY" in path.read_bytes()
    ]


def _tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_a_repository_with_its_role_keys_in_a_token_ships_updates(
    token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _site_with_token_repo(tmp_path, capsys, token)
    # Only where each key lives and its public half: no key file, no private key.
    assert sorted(p.name for p in (site.repo / "keys").iterdir()) == sorted(
        f"{role}-1.pkcs11" for role in ROLES
    )
    records = {
        role: json.loads((site.repo / "keys" / f"{role}-1.pkcs11").read_text()) for role in ROLES
    }
    assert {r["uri"] for r in records.values()} == {_uri(token, f"repo-{role}") for role in ROLES}
    root = json.loads((site.repo / "public" / "metadata" / "1.root.json").read_bytes())
    assert {k["scheme"] for k in root["signed"]["keys"].values()} == {"ecdsa-sha2-nistp256"}
    for role in ("root", "targets", "snapshot", "timestamp"):
        assert root["signed"]["roles"][role]["keyids"] == [records[role]["keyid"]]
    with Workspace.open(site.publisher).ledger() as ledger:
        (init,) = ledger.entries(event_type="repo.initialized")
    assert init.payload["key_store"] == "pkcs11"
    assert init.payload["key_uri"] == _uri(token)

    site.publish("1.0.0")
    with serving(site.repo) as url:
        site.enroll(url)
        assert invoke_json(capsys, "update", "--home", site.device)["installed"] == "1.0.0"
        # Every later signature is the token's: a timestamp, a publish, a rotation.
        invoke_json(capsys, "repo", "timestamp", str(site.repo), "--home", site.publisher)
        site.publish("2.0.0")
        rotated = invoke_json(
            capsys, "repo", "rotate", str(site.repo), "timestamp", "--home", site.publisher
        )
        assert rotated["roles"]["root"]["version"] == 2
        # Root itself: the new root is signed in the token by the old root key and the new.
        rotated = invoke_json(
            capsys, "repo", "rotate", str(site.repo), "root", "--home", site.publisher
        )
        assert rotated["roles"]["root"]["version"] == 3
        assert invoke_json(capsys, "update", "--home", site.device)["installed"] == "2.0.0"
    keys = {p.name for p in (site.repo / "keys").iterdir()}
    assert keys == {f"{role}-1.pkcs11" for role in ROLES if role not in ("root", "timestamp")} | {
        "root-2.pkcs11",
        "timestamp-2.pkcs11",
    }
    with Workspace.open(site.publisher).ledger() as ledger:
        rotations = [e.payload for e in ledger.entries(event_type="repo.keys_rotated")]
    assert [r["key_uris"] for r in rotations] == [
        [_uri(token, "repo-timestamp-2")],
        [_uri(token, "repo-root-2")],
    ]
    assert _private_markers(site.repo) == []
    # Reading the repository needs no PIN.
    os.environ.pop(PIN_ENV)
    assert invoke_json(capsys, "repo", "status", str(site.repo))["targets"] >= 2


_CLONE = """
import sys
from insitu.cli import run
sys.exit(run(sys.argv[1:]))
"""


def test_attack_cloned_repository_cannot_sign_metadata(
    token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _site_with_token_repo(tmp_path / "origin", capsys, token)
    site.publish("1.0.0")
    bundle = site.bundle("2.0.0")
    # Another machine: a copy of the repository and the publisher's workspace, another
    # process with its own token store holding a token of the same label.
    stolen = tmp_path / "stolen"
    subprocess.run(["cp", "-a", str(site.root), str(stolen)], check=True)
    clone, publisher = stolen / "repo", stolen / "publisher"
    env = os.environ | softhsm_store(tmp_path / "other-hsm", label=token) | {PIN_ENV: PIN}
    before = _tree(clone)

    def clone_runs(*args: str) -> tuple[int, list[str]]:
        proc = subprocess.run(
            [sys.executable, "-c", _CLONE, *args], env=env, capture_output=True, text=True,
            check=False,
        )  # fmt: skip
        return proc.returncode, proc.stderr.strip().splitlines()

    publish = ("repo", "publish", str(clone), str(bundle), "--home", str(publisher))
    timestamp = ("repo", "timestamp", str(clone), "--home", str(publisher))
    for command in (publish, timestamp):
        code, lines = clone_runs(*command)
        assert code == 1
        assert len(lines) == 1
        assert "holds no key labelled 'repo-" in lines[0]
    # A key of the same labels, made in the thief's token (another repository's keys):
    # its public half is not the one root lists.
    decoy = ("repo", "init", str(tmp_path / "decoy"), "--home", str(publisher))
    code, lines = clone_runs(*decoy, "--key-uri", _uri(token), "--pkcs11-module", MODULE)
    assert code == 0, lines
    for command in (publish, timestamp):
        code, lines = clone_runs(*command)
        assert code == 1
        assert len(lines) == 1
        assert "is not the one this repository's metadata lists" in lines[0]
    assert _tree(clone) == before


def test_a_wrong_pin_or_a_missing_module_is_one_line_and_leaves_nothing(
    token: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = str(tmp_path / "publisher")
    assert invoke(capsys, "init", "--home", home)[0] == 0
    repo = tmp_path / "repo"
    init = ("repo", "init", str(repo), "--home", home, "--key-uri", _uri(token))
    code, _, err = invoke(capsys, *init, "--pkcs11-module", str(tmp_path / "nope.so"))
    assert code == 1
    (line,) = err.strip().splitlines()
    assert "nope.so does not exist" in line
    monkeypatch.setenv(PIN_ENV, "0000-wrong")
    code, _, err = invoke(capsys, *init, "--pkcs11-module", MODULE)
    assert code == 1
    (line,) = err.strip().splitlines()
    assert f"token {token!r} refused the PIN" in line
    assert not repo.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["publisher"]  # no staging left
    # No key was left in the token: the same labels are free for the right PIN.
    monkeypatch.setenv(PIN_ENV, PIN)
    assert invoke(capsys, *init, "--pkcs11-module", MODULE)[0] == 0
    # A wrong PIN later: the timestamp is not signed, nothing changes.
    before = _tree(repo)
    monkeypatch.setenv(PIN_ENV, "0000-wrong")
    code, _, err = invoke(capsys, "repo", "timestamp", str(repo), "--home", home)
    assert code == 1
    (line,) = err.strip().splitlines()
    assert "refused the PIN" in line
    assert _tree(repo) == before


def test_a_threshold_above_one_in_one_token_is_refused(token: str, tmp_path: Path) -> None:
    ws, _ = Workspace.init(tmp_path / "publisher")
    with pytest.raises(RepositoryError, match="keys in one token have one holder"):
        init_directory_repository(
            tmp_path / "repo",
            publishers=[ws.signing_public_key],
            threshold=2,
            key_uri=_uri(token),
            pkcs11_module=MODULE,
        )
    assert not (tmp_path / "repo").exists()
