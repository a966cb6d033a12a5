"""A node's whole life with its keys in a token, through the ``insitu`` command.

Shared by ``test_tpm_lifecycle`` (swtpm through tpm2-pkcs11) and
``test_pkcs11_lifecycle`` (SoftHSM2): :func:`train` runs ``insitu federate simulate`` on a
coordinator made by ``insitu init --key-uri``; :func:`ship` bundles the trained model,
verifies it, publishes it from a repository that node created, and has a device made by
``insitu init --key-uri`` install it with ``insitu update`` (a full install, then a delta
the repository computed with the publisher's decryption key); :func:`key_material` scans
a tree for private key material.

The commands run in this process (:func:`invoke` captures their output without pytest's
function-scoped ``capsys``, so that module-scoped fixtures can run them): a token's
library reads its configuration once per process, so the token's environment is the
test process's.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from insitu.bundle import Bundle
from insitu.bundle._verify import data_key_for
from insitu.cli import run
from insitu.datasets import builtin_data
from insitu.workspace import Workspace
from tests.update._http import serving

#: A PEM private key of any kind ("PRIVATE KEY", "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY").
PEM_PRIVATE = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
#: The Adult rows a run trains on: enough for DP-SGD at three sites, quick to train.
ROWS = 6000


def invoke(*args: str) -> tuple[int, str, str]:
    """Run ``insitu ARGS`` here; its exit code, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = run(list(args))
    return code, stdout.getvalue(), stderr.getvalue()


def invoke_json(*args: str) -> Any:
    code, out, err = invoke(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def init_in_token(home: Path, uri: str, module: str) -> dict[str, Any]:
    """``insitu init --key-uri``; the payload of the ``workspace.init`` it recorded."""
    code, _, err = invoke("init", "--home", str(home), "--key-uri", uri, "--pkcs11-module", module)
    assert code == 0, err
    with Workspace.open(home).ledger() as ledger:
        (init,) = ledger.entries(event_type="workspace.init")
    assert init.payload["signing_key_store"] == "pkcs11"
    assert init.payload["signing_key_uri"] == uri
    return dict(init.payload)


def train(home: Path, data_dir: Path) -> dict[str, Any]:
    """A federated run of the coordinator at ``home``: 3 sites, 2 rounds; its JSON summary."""
    import pandas as pd

    data_dir.mkdir(parents=True, exist_ok=True)
    data = data_dir / "adult.csv"
    frame = pd.read_csv(builtin_data("adult")).iloc[:ROWS].drop(columns=["record_id"])
    frame.to_csv(data, index=False)
    summary: dict[str, Any] = invoke_json(
        "federate", "simulate", "--data", str(data), "--label", "income", "--sites", "3",
        "--rounds", "2", "--batch-size", "64", "--no-secure-aggregation", "--home", str(home),
    )  # fmt: skip
    return summary


@dataclass
class Shipped:
    """What :func:`ship` did: the bundle, and each ``insitu update``'s JSON."""

    bundles: list[Path]
    verified: dict[str, Any]
    published: list[dict[str, Any]]
    updates: list[dict[str, Any]]


def ship(
    publisher: Path, device: Path, model: Path, trained: dict[str, Any], root: Path
) -> Shipped:
    """Bundle ``model`` for ``device``, verify, publish from a new repository, update."""
    versions = ("1.0.0", "1.0.1")
    bundles = [root / f"triage-{version}.insb" for version in versions]
    for version, bundle in zip(versions, bundles, strict=True):
        invoke_json(
            "bundle", "create", str(model), "--name", "triage", "--version", version,
            "--out", str(bundle), "--recipient", str(device / "keys" / "encryption.pub.pem"),
            "--epsilon", str(trained["epsilon_run"]), "--delta", str(trained["config"]["delta"]),
            "--home", str(publisher),
        )  # fmt: skip
    pinned = str(publisher / "keys" / "signing.pub.pem")
    verified = invoke_json(
        "bundle", "verify", str(bundles[0]), "--publisher", pinned, "--home", str(device)
    )
    repo = root / "repo"
    invoke_json("repo", "init", str(repo), "--home", str(publisher))
    published = [
        invoke_json("repo", "publish", str(repo), str(bundles[0]), "--home", str(publisher))
    ]
    updates = []
    with serving(repo) as url:
        invoke_json(
            "update", "enroll", "--root", f"{repo}/public/metadata/1.root.json", "--url", url,
            "--model", "triage", "--home", str(device),
        )  # fmt: skip
        updates.append(invoke_json("update", "--home", str(device)))
        # The second version's delta is computed by the repository from both bundles,
        # decrypted with the publisher's own key (a recipient of every bundle it makes).
        published.append(
            invoke_json("repo", "publish", str(repo), str(bundles[1]), "--home", str(publisher))
        )
        updates.append(invoke_json("update", "--home", str(device)))
    return Shipped(bundles, dict(verified), published, updates)


def recipient_algorithms(bundle: Path) -> list[str]:
    """The key agreement (or transport) of each recipient entry of ``bundle``."""
    signed = Bundle.parse(bundle.read_bytes()).signed
    entries = signed["payload"]["encryption"]["recipients"]
    return sorted(str(entry.get("algorithm", "x25519")) for entry in entries)


def _key_files(home: Path) -> dict[Path, dict[str, Any]]:
    """insitu's own private key files (``insitu-key/1``) under ``home``, parsed."""
    found = {}
    for path in home.rglob("*"):
        if not path.is_file() or path.is_symlink() or b'"insitu-key/1"' not in path.read_bytes():
            continue
        with contextlib.suppress(ValueError):
            doc = json.loads(path.read_bytes())
            if isinstance(doc, dict) and doc.get("format") == "insitu-key/1":
                found[path] = doc
    return found


def key_material(*homes: Path, secrets: tuple[bytes, ...] = ()) -> list[str]:
    """Every file under ``homes`` holding a PEM private key, or private key bytes.

    The bytes looked for are ``secrets`` and the secret of every unprotected insitu key
    file under ``homes`` (the simulated sites' own keys, a file decryption key), raw or as
    hex, anywhere but in that key file itself.
    """
    files = [p for home in homes for p in sorted(home.rglob("*")) if p.is_file()]
    known: dict[bytes, Path | None] = dict.fromkeys(secrets)
    for home in homes:
        for path, doc in _key_files(home).items():
            if doc.get("protection") == "none":
                known[bytes.fromhex(doc["secret"])] = path
    found = []
    for path in files:
        data = path.read_bytes()
        if PEM_PRIVATE.search(data):
            found.append(f"{path}: PEM private key")
        for secret, owner in known.items():
            if path != owner and (secret in data or secret.hex().encode() in data.lower()):
                found.append(f"{path}: private key bytes of {owner or 'the token key'}")
    return found


def data_keys(device: Path, *bundles: Path) -> tuple[bytes, ...]:
    """Each bundle's data key, as ``device`` unwraps it with its own key (in its token or not).

    The one secret of a bundle that leaves a token (its key agreement's result is
    derived into it): the device must not keep it.
    """
    key = Workspace.open(device).encryption_key()
    return tuple(data_key_for(Bundle.parse(path.read_bytes()), key) for path in bundles)


def own_private_keys(home: Path) -> list[str]:
    """The private (asymmetric) key files in a workspace's own ``keys/``, by name.

    Its site secrets (kind ``secret``: pseudonym and cache keys) are not counted.
    """
    keys = Workspace.layout(home).keys_dir
    found = _key_files(keys).items()
    return sorted(p.name for p, doc in found if p.parent == keys and doc["kind"] != "secret")
