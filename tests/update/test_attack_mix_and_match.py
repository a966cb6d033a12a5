"""Mix-and-match attack: the mirror combines metadata files from different repository
states (e.g. the current snapshot with an older targets file that still listed another
version). TUF refuses any file whose version is not the one the role above it lists.

TUF persists each file as soon as it verifies (spec 5.4, 5.5): the genuine new timestamp
(and snapshot) may be stored; the mixed-in file never is, and the installed model and the
trusted targets do not change."""

from __future__ import annotations

import pytest

from insitu.errors import MixAndMatchError
from tests.update.conftest import (
    assert_only_genuine_metadata,
    device_state,
    installed_v1,
    make_bundle,
)


@pytest.mark.parametrize(
    ("path", "older"),
    [
        ("metadata/3.targets.json", "metadata/2.targets.json"),
        ("metadata/3.snapshot.json", "metadata/2.snapshot.json"),
    ],
)
def test_attack_mix_and_match(sim, device, keys, models, path, older):
    installed_v1(sim, device, keys, models)
    before = device_state(device)
    sim.repo.publish(make_bundle(keys, "1.1.0", models.v2), publisher_key=keys.publisher_enc)
    sim.serve(path, sim.storage.read(older))
    with pytest.raises(MixAndMatchError, match="different repository states"):
        device.update()
    after = device_state(device)
    for name in ("metadata/targets.json", "slots/state.json", "slots/a.insb", "root.json"):
        assert after[name] == before[name], name
    assert_only_genuine_metadata(device, sim)
