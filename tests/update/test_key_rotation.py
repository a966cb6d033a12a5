"""Rotating role keys: devices follow through TUF (a new root, cross-signed for root), and
metadata signed with a retired key is refused afterwards."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from insitu.errors import RepositoryError, UnsignedMetadataError
from tests.update.conftest import device_state, installed_v1, make_bundle


@pytest.mark.parametrize("role", ["root", "targets", "assignments", "snapshot", "timestamp"])
def test_devices_follow_a_rotation(sim, device, keys, models, role, ledger):
    installed_v1(sim, device, keys, models)
    new_key = Ed25519PrivateKey.generate()
    sim.repo.rotate_keys(role, [CryptoSigner(new_key)], ledger=ledger)
    sim.repo.publish(make_bundle(keys, "1.1.0", models.v2), publisher_key=keys.publisher_enc)
    assert device.update()["installed"] == "1.1.0"
    assert ledger.entries(event_type="repo.keys_rotated")[-1].payload == {"role": role, "keys": 1}


def test_attack_timestamp_signed_with_a_retired_key(sim, device, keys, models):
    installed_v1(sim, device, keys, models)
    (retired,) = sim.role_keys["timestamp"]
    sim.repo.rotate_keys("timestamp", [CryptoSigner(Ed25519PrivateKey.generate())])
    device.update()  # the device now trusts the root that lists the new key only
    before = device_state(device)
    sim.repo.publish(make_bundle(keys, "1.1.0", models.v2))
    md = Metadata.from_bytes(sim.storage.read("metadata/timestamp.json"))
    md.sign(CryptoSigner(retired))  # whoever stole the old key signs the new timestamp
    sim.serve("metadata/timestamp.json", md.to_bytes())
    with pytest.raises(UnsignedMetadataError):
        device.update()
    assert device_state(device) == before


def test_rotation_needs_as_many_keys_as_before(sim):
    with pytest.raises(RepositoryError, match="unknown role"):
        sim.repo.rotate_keys("mirror", [CryptoSigner(Ed25519PrivateKey.generate())])
    with pytest.raises(RepositoryError, match="at least 1 new keys"):
        sim.repo.rotate_keys("timestamp", [])
