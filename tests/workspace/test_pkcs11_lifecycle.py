"""A node whose keys are in a PKCS#11 token (SoftHSM2), through its whole life.

``insitu init --key-uri`` makes the coordinator's Ed25519 signing key and its P-256 key
agreement key in the token; then, through the ``insitu`` command: a federated training
run (``insitu federate simulate``, 3 sites, 2 rounds), ``insitu bundle create`` of the
trained model (encrypted for a device, ``p256-ecdh``) and ``bundle verify``, an update
repository the coordinator creates and publishes to (``repo init`` / ``repo publish``:
the token signs the bundles, and the repository computes the delta to the second
version with the publisher's token decryption key), a device whose signing *and*
decryption keys are in the token installing both versions with ``insitu update`` (its
ECDH in the token), and ``insitu audit verify`` of both ledgers. Last, every file under
both workspaces is scanned for PEM private keys, for the secret of every insitu key
file, and for the data keys of the bundles (the one secret the token's ECDH hands out).

The token store is this process's (SoftHSM2 reads ``SOFTHSM2_CONF`` once per process:
the ``softhsm`` fixture of ``test_pkcs11``); this module makes one token of its own. The
coordinator's ledger is signed by the process that runs ``insitu federate simulate``
(Flower runs the ServerApp in a thread of it; the sites' ClientApps run in Ray workers
with the sites' own file keys), so the token's environment is the test process's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from insitu._signer import ED25519
from insitu.workspace import PIN_ENV, Workspace
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
from tests.workspace.test_pkcs11 import MODULE, PIN, SO_PIN, softhsm

__all__ = ["softhsm"]  # a fixture, imported for the tests below

pytestmark = [
    pytest.mark.slow,
    # Ray's driver leaves sockets to the garbage collector.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

TOKEN = "insitu-life"


def uri_of(obj: str) -> str:
    return f"pkcs11:token={TOKEN};object={obj}"


@pytest.fixture(scope="module")
def token(softhsm: None) -> Any:
    """A token of this module's own in the process's store; the PIN in the environment."""
    import PyKCS11

    lib = PyKCS11.PyKCS11Lib()
    lib.load(MODULE)
    free = [s for s in lib.getSlotList() if not lib.getTokenInfo(s).label.strip()]
    lib.initToken(free[0], SO_PIN, TOKEN.ljust(32))
    (slot,) = [s for s in lib.getSlotList() if lib.getTokenInfo(s).label.strip() == TOKEN]
    session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
    session.login(SO_PIN, user_type=PyKCS11.CKU_SO)
    session.initPin(PIN)
    session.logout()
    session.closeSession()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PIN_ENV, PIN)
        yield


@dataclass
class Life:
    coordinator: Path
    device: Path
    init: dict[str, Any]
    device_init: dict[str, Any]
    trained: dict[str, Any]
    shipped: Shipped


@pytest.fixture(scope="module")
def life(token: None, tmp_path_factory: pytest.TempPathFactory) -> Life:
    """One coordinator trained, its model shipped to one device: both keyed in the token."""
    root = tmp_path_factory.mktemp("life")
    coordinator, device = root / "coordinator", root / "device"
    init = init_in_token(coordinator, uri_of("coordinator"), MODULE)
    trained = train(coordinator, root / "data")
    device_init = init_in_token(device, uri_of("device"), MODULE)
    (model,) = Path(trained["model_dir"]).glob("*.onnx")
    shipped = ship(coordinator, device, model, trained, root)
    return Life(coordinator, device, init, device_init, trained, shipped)


def test_a_federation_whose_coordinator_key_is_in_the_token_trains(life: Life) -> None:
    assert life.init["signing_algorithm"] == ED25519
    assert len(life.trained["rounds"]) == 2
    with Workspace.open(life.coordinator).ledger() as ledger:
        assert [e.payload["round"] for e in ledger.entries(event_type="federation.round")] == [1, 2]
        assert ledger.entries(event_type="federation.completed")
        assert ledger.verify().entries == len(ledger.entries())


def test_a_device_with_its_decryption_key_in_the_token_installs_by_update(life: Life) -> None:
    for init, obj in ((life.init, "coordinator"), (life.device_init, "device")):
        assert init["decryption_key_store"] == "pkcs11"
        assert init["decryption_algorithm"] == "p256-ecdh"
        assert init["decryption_key_uri"] == uri_of(f"{obj}-decrypt")
    # Encrypted for the device and the publisher, both keys P-256 in the token.
    for bundle in life.shipped.bundles:
        assert recipient_algorithms(bundle) == ["p256-ecdh", "p256-ecdh"]
    assert "decrypted model digest" in life.shipped.verified["verified"]
    first, second = life.shipped.updates
    assert (first["installed"], first["method"]) == ("1.0.0", "full")
    assert (second["installed"], second["method"]) == ("1.0.1", "delta")
    # The repository made the delta with the publisher's key in the token.
    assert "1.0.0" in life.shipped.published[1]["deltas"]
    with Workspace.open(life.device).ledger() as ledger:
        installed = [e.payload["version"] for e in ledger.entries(event_type="update.installed")]
    assert installed == ["1.0.0", "1.0.1"]


def test_both_ledgers_verify_with_insitu_audit_verify(life: Life) -> None:
    for home in (life.coordinator, life.device):
        code, _, err = invoke("audit", "verify", "--home", str(home))
        assert code == 0, err


def test_no_private_key_material_is_under_either_workspace(life: Life) -> None:
    secrets = data_keys(life.device, *life.shipped.bundles)
    assert key_material(life.coordinator, life.device, secrets=secrets) == []
    # Neither a signing nor a decryption key file; the OpenSSF model-signing key of a
    # publisher is still a file (kind ecdsa-p256, made by its first `bundle create`).
    assert set(own_private_keys(life.coordinator)) <= {"model-signing.key"}
    assert own_private_keys(life.device) == []
