"""A wrong device key: a bundle encrypted for other devices reaches this one. It cannot
decrypt it, says so in one line with the fix, and installs nothing."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from insitu.errors import WrongDeviceKeyError
from tests.update.conftest import (
    assert_only_genuine_metadata,
    assert_slots_unchanged,
    device_state,
    installed_v1,
    make_bundle,
)


def test_attack_wrong_device_key(sim, device, keys, models):
    installed_v1(sim, device, keys, models)
    other = X25519PrivateKey.generate()
    sim.repo.publish(make_bundle(keys, "1.1.0", models.v2, recipients=[other.public_key()]))
    before = device_state(device)
    with pytest.raises(WrongDeviceKeyError, match="not encrypted for this device") as info:
        device.update()
    assert "\n" not in str(info.value)
    assert "encryption.pub.pem" in str(info.value)  # the fix
    assert_slots_unchanged(device, before)
    assert_only_genuine_metadata(device, sim)
    assert bytes(device.load().model) == models.v1
