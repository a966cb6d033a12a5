"""A stolen assignments key (the online key that moves channel and device pointers) can
point devices at a bundle, but cannot make one exist: bundles are listed by the targets
role only. And metadata for the assignments role signed by any other key is refused."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from insitu._canonical import canonical_bytes
from insitu.errors import RepositoryError, UnsignedMetadataError
from insitu.update._repository import ASSIGNMENTS, channel_path
from tests.update.conftest import (
    assert_only_genuine_metadata,
    assert_slots_unchanged,
    device_state,
    installed_v1,
    make_bundle,
)


def _point(sim, pointer: dict) -> None:
    with sim.repo.edit_targets(ASSIGNMENTS) as assignments:
        sim.repo._add_target(
            assignments,
            channel_path("stable", "mlp"),
            canonical_bytes(pointer),
            {"kind": "pointer"},
        )
    sim.repo.do_snapshot()
    sim.repo.do_timestamp()


def test_attack_assignments_key_points_at_a_bundle_targets_never_listed(sim, device, keys, models):
    installed_v1(sim, device, keys, models)
    evil = make_bundle(keys, "9.0.0", models.v3, signer=Ed25519PrivateKey.generate())
    # The attacker uploads a file and points the channel at it, but cannot list it.
    sim.storage.write("targets/bundles/mlp/evil.9.0.0.insb", evil)
    _point(sim, {"name": "mlp", "version": "9.0.0", "bundle": "bundles/mlp/9.0.0.insb",
                 "deltas": {}})  # fmt: skip
    before = device_state(device)
    with pytest.raises(RepositoryError, match="not published"):
        device.update()
    assert_slots_unchanged(device, before)
    assert_only_genuine_metadata(device, sim)


def test_attack_assignments_key_points_a_channel_at_another_target(sim, device, keys, models):
    installed_v1(sim, device, keys, models)
    sim.repo.publish(make_bundle(keys, "1.1.0", models.v2), publisher_key=keys.publisher_enc)
    device.update()
    # Point "2.0.0" at an existing target of another kind (the delta): refused as such.
    _point(sim, {"name": "mlp", "version": "2.0.0",
                 "bundle": "deltas/mlp/1.0.0_to_1.1.0.delta", "deltas": {}})  # fmt: skip
    before = device_state(device)
    with pytest.raises(RepositoryError, match="not a valid pointer"):
        device.update()
    assert_slots_unchanged(device, before)


def test_attack_assignments_metadata_signed_by_another_key(sim, device, keys, models):
    installed_v1(sim, device, keys, models)
    sim.repo.publish(make_bundle(keys, "1.1.0", models.v2))
    version = sim.repo.targets(ASSIGNMENTS).version
    path = f"metadata/{version}.{ASSIGNMENTS}.json"
    md = Metadata.from_bytes(sim.storage.read(path))
    md.sign(CryptoSigner(Ed25519PrivateKey.generate()))  # replaces the real signature
    sim.serve(path, md.to_bytes())
    before = device_state(device)
    with pytest.raises(UnsignedMetadataError):
        device.update()
    assert device_state(device)["slots/state.json"] == before["slots/state.json"]
    trusted = f"metadata/{ASSIGNMENTS}.json"
    assert device_state(device).get(trusted) == before.get(trusted)
