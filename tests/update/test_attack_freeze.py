"""Freeze attack: the mirror keeps serving the last timestamp it saw, so the device never
learns of new versions. Once the timestamp expires the device refuses it."""

from __future__ import annotations

import datetime as dt

import pytest

from insitu.errors import ExpiredMetadataError
from tests.update.conftest import device_state, frozen_at, installed_v1, make_bundle


def test_attack_freeze_expired_timestamp(sim, device, keys, models, ledger):
    installed_v1(sim, device, keys, models)
    frozen = sim.storage.read("metadata/timestamp.json")
    sim.repo.publish(make_bundle(keys, "1.1.0", models.v2))  # the device must not miss this
    sim.serve("metadata/timestamp.json", frozen)
    before = device_state(device)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    with frozen_at(later), pytest.raises(ExpiredMetadataError, match="repo timestamp"):
        device.update()
    assert device_state(device) == before
    assert ledger.entries(event_type="update.refused")[-1].payload["reason"] == (
        "ExpiredMetadataError"
    )


def test_a_fresh_timestamp_ends_the_freeze(sim, device, keys, models):
    installed_v1(sim, device, keys, models)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    with frozen_at(later):
        with pytest.raises(ExpiredMetadataError):
            device.update()
        sim.repo.refresh_timestamp()  # the operator's cron job runs again
        assert device.update()["status"] == "up-to-date"
