"""Tampered bytes on the mirror: any byte of a bundle, a pointer or a delta changed in
transit or at rest on the server. TUF checks length and SHA-256 from signed metadata."""

from __future__ import annotations

import pytest

from insitu.errors import TargetMismatchError
from tests.update.conftest import (
    assert_only_genuine_metadata,
    assert_slots_unchanged,
    device_state,
    events,
    installed_v1,
    make_bundle,
)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def test_attack_tampered_bundle_on_the_mirror(sim, device, keys, models):
    bundle = make_bundle(keys, "1.0.0", models.v1)
    sim.repo.publish(bundle)
    path = sim.stored_target_path("bundles/mlp/1.0.0.insb")
    sim.serve(path, _flip(bundle, len(bundle) // 2))
    before = device_state(device)
    with pytest.raises(TargetMismatchError, match="does not match its signed length and hash"):
        device.update()
    assert_slots_unchanged(device, before)
    assert_only_genuine_metadata(device, sim)
    assert device.slots.active() is None


def test_attack_tampered_pointer_on_the_mirror(sim, device, keys, models):
    installed_v1(sim, device, keys, models)
    sim.repo.publish(make_bundle(keys, "1.1.0", models.v2))
    path = sim.stored_target_path("channels/stable/mlp.json")
    sim.serve(path, sim.storage.read(path).replace(b"1.1.0", b"9.9.9"))
    before = device_state(device)
    with pytest.raises(TargetMismatchError):
        device.update()
    assert device_state(device)["slots/state.json"] == before["slots/state.json"]


def test_tampered_delta_falls_back_to_the_full_bundle(sim, device, keys, models, ledger):
    installed_v1(sim, device, keys, models)
    v2 = make_bundle(keys, "1.1.0", models.v2)
    sim.repo.publish(v2, publisher_key=keys.publisher_enc)
    path = sim.stored_target_path("deltas/mlp/1.0.0_to_1.1.0.delta")
    sim.serve(path, _flip(sim.storage.read(path), 100))
    result = device.update()
    assert (result["installed"], result["method"]) == ("1.1.0", "full")
    assert device.slots.read(device.slots.active()) == v2
    assert "update.delta_refused" in events(ledger)
