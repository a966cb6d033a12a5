"""Metadata signed by fewer keys than the role's threshold (a single stolen key of two)."""

from __future__ import annotations

import pytest
from tuf.api.metadata import Metadata

from insitu.errors import UnsignedMetadataError
from insitu.update import UpdateClient
from tests.update.conftest import device_state, make_bundle
from tests.update.repository_simulator import BASE_URL, RepositorySimulator


def test_attack_one_key_of_a_threshold_of_two(keys, models, tmp_path, ledger):
    sim = RepositorySimulator([keys.publisher.public_key()], threshold=2)
    sim.repo.publish(make_bundle(keys, "1.0.0", models.v1))
    UpdateClient.enroll(tmp_path / "d", root=sim.root_bytes, url=BASE_URL, model="mlp")
    device = UpdateClient(tmp_path / "d", device_key=keys.device, ledger=ledger, fetcher=sim)
    device.update()
    before = device_state(device)
    sim.repo.publish(make_bundle(keys, "1.1.0", models.v2))
    md = Metadata.from_bytes(sim.storage.read("metadata/timestamp.json"))
    md.signatures.popitem()  # the attacker holds only one of the two timestamp keys
    sim.serve("metadata/timestamp.json", md.to_bytes())
    with pytest.raises(UnsignedMetadataError, match="threshold"):
        device.update()
    assert device_state(device) == before
