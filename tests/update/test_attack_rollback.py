"""Rollback attack: the mirror serves older, validly signed metadata, or points a channel
at an older, validly signed bundle. Both are refused; nothing on the device changes."""

from __future__ import annotations

import pytest

from insitu.errors import RollbackError
from insitu.update._repository import channel_path
from tests.update.conftest import (
    assert_only_genuine_metadata,
    assert_slots_unchanged,
    device_state,
    events,
    installed_v1,
    make_bundle,
)


def test_attack_rollback_replayed_older_timestamp(sim, device, keys, models, ledger):
    installed_v1(sim, device, keys, models)
    sim.repo.publish(make_bundle(keys, "1.1.0", models.v2), publisher_key=keys.publisher_enc)
    device.update()
    before = device_state(device)
    # Every timestamp the repository ever signed is still validly signed: replay one.
    sim.serve("metadata/timestamp.json", sim.storage.history["metadata/timestamp.json"][1])
    with pytest.raises(RollbackError, match="older than the trusted version"):
        device.update()
    assert device_state(device) == before
    assert events(ledger)[-1] == "update.refused"
    assert ledger.entries(event_type="update.refused")[-1].payload["reason"] == "RollbackError"


def test_attack_rollback_channel_pointed_at_an_older_bundle(sim, device, keys, models):
    installed_v1(sim, device, keys, models)
    sim.repo.publish(make_bundle(keys, "1.1.0", models.v2), publisher_key=keys.publisher_enc)
    device.update()
    before = device_state(device)
    # Whoever holds the assignments key signs a pointer back to 1.0.0 (publish() refuses).
    with sim.repo.edit_targets("assignments") as targets:
        sim.repo._add_target(
            targets,
            channel_path("stable", "mlp"),
            b'{"bundle":"bundles/mlp/1.0.0.insb","deltas":{},"name":"mlp","version":"1.0.0"}',
            {"kind": "pointer"},
        )
    sim.repo.do_snapshot()
    sim.repo.do_timestamp()
    with pytest.raises(RollbackError, match="downgrades are refused"):
        device.update()
    # TUF persisted the new, genuinely signed metadata; the installed model did not move.
    assert_slots_unchanged(device, before)
    assert_only_genuine_metadata(device, sim)
    assert device.status()["active"]["version"] == "1.1.0"
