"""A node whose keys are in a TPM 2.0 (swtpm, tpm2-pkcs11), through its whole life.

``insitu init --key-uri`` makes the coordinator's P-256 signing key in the TPM; then, all
through the ``insitu`` command as a user runs it: a federated training run (``insitu
federate simulate``, 3 sites, 2 rounds), ``insitu bundle create`` of the trained model and
``bundle verify``, an update repository this node creates and publishes to (``insitu
repo init`` / ``repo publish``: the TPM key signs every bundle), a device whose key is in
the TPM too installing it with ``insitu update`` (a full install, then a delta), and
``insitu audit verify`` of both ledgers. Last, every file under both workspaces is
scanned for private key material (:func:`tests.workspace._tokens.key_material`), and for
the TPM-wrapped private blobs tpm2-pkcs11 keeps in its store.

Which process signs with the node key: the coordinator's ledger is written by the
process that runs ``insitu federate simulate`` (Flower runs the ServerApp in a thread of
it, and the strategy records each round there); the sites' ClientApps run in Ray worker
processes, and write only to the sites' own workspaces under ``<home>/sites`` (file
keys). So the TPM's environment (``TPM2_PKCS11_TCTI``, ``TPM2_PKCS11_STORE``, read once
per process by tpm2-pkcs11) and ``INSITU_PKCS11_PIN`` must be the environment of the
process that runs the command: here the test process, for the module (one swtpm per
module, :mod:`tests._swtpm`). Ray's workers inherit it and never open the token.

swtpm has no resource manager and holds 3 transient objects: tpm2-pkcs11 flushes what it
loads, so the coordinator's and the device's keys (two labels in one token) take turns.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from insitu._signer import P256
from insitu.workspace import PIN_ENV, Workspace
from tests._swtpm import MODULE, SoftwareTpm, missing
from tests.workspace._tokens import (
    Shipped,
    data_keys,
    init_in_token,
    invoke,
    key_material,
    own_private_keys,
    recipient_algorithms,
    ship,
    train,
)

pytestmark = [
    pytest.mark.slow,
    # Ray's driver leaves sockets to the garbage collector.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

PIN = "4321-tpm-life"
TOKEN = "insitu-tpm-life"


def uri_of(obj: str) -> str:
    return f"pkcs11:token={TOKEN};object={obj}"


@pytest.fixture(scope="module")
def tpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftwareTpm]:
    """This module's TPM and PIN, in the environment of this process (read once)."""
    why = missing()
    if why is not None:
        pytest.skip(why)
    started = SoftwareTpm(tmp_path_factory.mktemp("tpm"), token=TOKEN, pin=PIN, so_pin="8765")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in started.env.items():
            patch.setenv(name, value)
        patch.setenv(PIN_ENV, PIN)
        yield started
        started.stop()
    # Kept: tpm2-pkcs11 logs (and would print) its last flush at the process's exit.
    os.environ["TSS2_LOG"] = "all+NONE"


@dataclass
class Life:
    root: Path
    coordinator: Path
    device: Path
    init: dict[str, Any]
    device_init: dict[str, Any]
    trained: dict[str, Any]
    shipped: Shipped


@pytest.fixture(scope="module")
def life(tpm: SoftwareTpm, tmp_path_factory: pytest.TempPathFactory) -> Life:
    """One coordinator trained, its model shipped to one device: both keyed in the TPM."""
    root = tmp_path_factory.mktemp("life")
    coordinator, device = root / "coordinator", root / "device"
    init = init_in_token(coordinator, uri_of("coordinator"), MODULE)
    trained = train(coordinator, root / "data")
    device_init = init_in_token(device, uri_of("device"), MODULE)
    (model,) = Path(trained["model_dir"]).glob("*.onnx")
    shipped = ship(coordinator, device, model, trained, root)
    return Life(root, coordinator, device, init, device_init, trained, shipped)


def test_a_federation_whose_coordinator_key_is_in_the_tpm_trains(life: Life) -> None:
    assert life.init["signing_algorithm"] == P256
    assert len(life.trained["rounds"]) == 2
    with Workspace.open(life.coordinator).ledger() as ledger:
        rounds = ledger.entries(event_type="federation.round")
        (completed,) = ledger.entries(event_type="federation.completed")
        assert ledger.verify().entries == len(ledger.entries())
    assert [e.payload["round"] for e in rounds] == [1, 2]
    # Signed in the TPM: P-256 signatures, by the key of keys/signing.pub.pem.
    assert all(e.sig.startswith(b"ecdsa-p256-sha256:") for e in [*rounds, completed])


def test_the_trained_model_is_bundled_verified_and_installed_by_update(life: Life) -> None:
    # Encrypted for the device and the publisher, each with the key agreement (or key
    # transport) its `init --key-uri` recorded.
    recorded = sorted(i["decryption_algorithm"] for i in (life.init, life.device_init))
    for bundle in life.shipped.bundles:
        assert recipient_algorithms(bundle) == recorded
    assert "decrypted model digest" in life.shipped.verified["verified"]
    first, second = life.shipped.updates
    assert (first["installed"], first["method"]) == ("1.0.0", "full")
    assert (second["installed"], second["method"]) == ("1.0.1", "delta")
    assert "1.0.0" in life.shipped.published[1]["deltas"]
    with Workspace.open(life.coordinator).ledger() as ledger:
        (created, _) = ledger.entries(event_type="bundle.created")
    assert created.sig.startswith(b"ecdsa-p256-sha256:")
    with Workspace.open(life.device).ledger() as ledger:
        installed = ledger.entries(event_type="update.installed")
    assert [e.payload["version"] for e in installed] == ["1.0.0", "1.0.1"]
    assert all(e.sig.startswith(b"ecdsa-p256-sha256:") for e in installed)  # the device's TPM


def test_both_ledgers_verify_with_insitu_audit_verify(life: Life) -> None:
    for home in (life.coordinator, life.device):
        code, _, err = invoke("audit", "verify", "--home", str(home))
        assert code == 0, err


#: tpm2-pkcs11's vendor attribute CKA_TPM2_PRIV_BLOB (0x8F000003), as its store writes it.
_PRIV_BLOB = re.compile(r'\? !!int "2399141891"\s*: !!str "([0-9a-fA-F]+)"')


def _wrapped_blobs(store: Path) -> list[bytes]:
    """The TPM-wrapped private blobs tpm2-pkcs11 keeps of its keys (in its store).

    Only this TPM can load them, but a workspace holding one would carry a key that a
    cloned disk plus the same TPM could use: none may be under a workspace.
    """
    with contextlib.closing(sqlite3.connect(store / "tpm2_pkcs11.sqlite3")) as db:
        rows = [str(attrs) for (attrs,) in db.execute("SELECT attrs FROM tobjects")]
    return [bytes.fromhex(blob) for attrs in rows for blob in _PRIV_BLOB.findall(attrs)]


def test_no_private_key_material_is_under_either_workspace(life: Life, tpm: SoftwareTpm) -> None:
    store = Path(tpm.env["TPM2_PKCS11_STORE"])
    blobs = _wrapped_blobs(store)
    assert len(blobs) >= 2  # the coordinator's key and the device's
    secrets = (*blobs, *data_keys(life.device, *life.shipped.bundles))
    assert key_material(life.coordinator, life.device, secrets=secrets) == []
    for home, init in ((life.coordinator, life.init), (life.device, life.device_init)):
        # Never the node's signing key as a file. A decryption key file only where the
        # TPM holds none (whatever `init --key-uri` makes for decryption on a TPM, the
        # ledger says so); the OpenSSF model-signing key of a publisher is still a file
        # (kind ecdsa-p256, made by its first `bundle create`).
        assert init["decryption_key_store"] in {"file", "pkcs11"}
        allowed = {"model-signing.key"}
        if init["decryption_key_store"] == "file":
            allowed.add("encryption.key")
        assert set(own_private_keys(home)) <= allowed
