"""Arbitrary software: a bundle that the publisher did not sign reaches the repository
(a stolen targets key, a compromised build server). TUF's metadata vouches for the file,
but the bundle's own signature must come from a publisher key that root lists."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from insitu.bundle import BundleVerifier
from insitu.bundle._format import assemble
from insitu.errors import UnsignedBundleError, UntrustedPublisherError
from tests.update.conftest import (
    assert_only_genuine_metadata,
    assert_slots_unchanged,
    device_state,
    installed_v1,
    make_bundle,
)


def _publish_unchecked(sim, monkeypatch, bundle: bytes) -> None:
    with monkeypatch.context() as patch:  # the repository's own check is bypassed
        patch.setattr(BundleVerifier, "verify", lambda *args, **kwargs: None)
        sim.repo.publish(bundle)


def test_attack_arbitrary_software_signed_by_another_key(sim, device, keys, models, monkeypatch):
    installed_v1(sim, device, keys, models)
    before = device_state(device)
    evil = make_bundle(keys, "6.6.6", models.v3, signer=Ed25519PrivateKey.generate())
    _publish_unchecked(sim, monkeypatch, evil)
    with pytest.raises(UntrustedPublisherError, match="not a trusted publisher key"):
        device.update()
    assert_slots_unchanged(device, before)
    assert_only_genuine_metadata(device, sim)
    assert bytes(device.load().model) == models.v1


def test_attack_arbitrary_software_header_changed_after_signing(
    sim, device, keys, models, monkeypatch
):
    installed_v1(sim, device, keys, models)
    genuine = make_bundle(keys, "1.1.0", models.v2)
    header_len = int.from_bytes(genuine[8:12], "big")
    doc = json.loads(genuine[12 : 12 + header_len])
    doc["signed"]["card"]["privacy"]["epsilon"] = 0.1  # a better-looking privacy figure
    forged = assemble(doc["signed"], doc["signatures"]) + genuine[12 + header_len :]
    _publish_unchecked(sim, monkeypatch, forged)
    with pytest.raises(UnsignedBundleError, match="does not verify"):
        device.update()
    assert device.status()["active"]["version"] == "1.0.0"
