"""Revoking a stolen publisher key: a new root version lists the new key only; devices
follow the root rotation (TUF) and refuse bundles signed by the old key afterwards."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from insitu.errors import UntrustedPublisherError
from tests.update.conftest import installed_v1, make_bundle


def test_rotated_publisher_key(sim, device, keys, models, monkeypatch, ledger):
    installed_v1(sim, device, keys, models)
    new_key = Ed25519PrivateKey.generate()
    assert sim.repo.set_publishers([new_key.public_key()], ledger=ledger) == 2
    # A bundle signed with the old (stolen) key is refused by the repository ...
    with pytest.raises(UntrustedPublisherError):
        sim.repo.publish(make_bundle(keys, "1.1.0", models.v2))
    # ... and by devices, even if it gets into the metadata anyway.
    from insitu.bundle import BundleVerifier

    with monkeypatch.context() as patch:
        patch.setattr(BundleVerifier, "verify", lambda *a, **k: None)
        sim.repo.publish(make_bundle(keys, "1.1.0", models.v2))
    with pytest.raises(UntrustedPublisherError):
        device.update()
    assert (device.metadata_dir / "root_history" / "2.root.json").exists()
    sim.repo.publish(make_bundle(keys, "1.2.0", models.v3, signer=new_key))
    assert device.update()["installed"] == "1.2.0"
