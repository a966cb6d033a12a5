"""Endless data: the mirror sends more bytes than signed metadata allows (to fill the
disk or stall the device). The download stops at the signed length."""

from __future__ import annotations

import pytest

from insitu.errors import EndlessDataError
from tests.update.conftest import (
    assert_only_genuine_metadata,
    assert_slots_unchanged,
    device_state,
    installed_v1,
    make_bundle,
)


def test_attack_endless_data(sim, device, keys, models, tmp_path):
    installed_v1(sim, device, keys, models)
    v2 = make_bundle(keys, "1.1.0", models.v2)
    sim.repo.publish(v2, max_deltas=0)
    path = sim.stored_target_path("bundles/mlp/1.1.0.insb")
    sim.serve(path, v2 + b"\0" * (4 << 20))
    before = device_state(device)
    with pytest.raises(EndlessDataError, match="more bytes than the signed metadata allows"):
        device.update()
    assert_slots_unchanged(device, before)
    assert_only_genuine_metadata(device, sim)
    assert list((device.directory / "downloads").iterdir()) == []


def test_attack_endless_data_in_metadata(sim, device, keys, models):
    installed_v1(sim, device, keys, models)
    before = device_state(device)
    sim.serve("metadata/timestamp.json", b"{" + b" " * (1 << 20))
    with pytest.raises(EndlessDataError):
        device.update()
    assert device_state(device) == before
