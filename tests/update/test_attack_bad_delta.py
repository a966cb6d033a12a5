"""A delta that does not rebuild the signed bundle (a buggy publisher, or a delta target
swapped for another validly signed one): it is refused, recorded, and the full bundle is
downloaded instead; what gets installed is exactly the signed bundle."""

from __future__ import annotations

from insitu.bundle import make_bundle_delta
from insitu.update._repository import delta_path
from tests.update.conftest import events, installed_v1, make_bundle


def _replace_delta(sim, data: bytes) -> None:
    with sim.repo.edit_targets() as targets:
        sim.repo._add_target(
            targets,
            delta_path("mlp", "1.0.0", "1.1.0"),
            data,
            {"kind": "delta", "name": "mlp", "from": "1.0.0", "to": "1.1.0"},
        )
    sim.repo.do_snapshot()
    sim.repo.do_timestamp()


def test_attack_bad_delta_rebuilds_another_bundle(sim, device, keys, models, ledger):
    v1 = installed_v1(sim, device, keys, models)
    v2 = make_bundle(keys, "1.1.0", models.v2)
    sim.repo.publish(v2, publisher_key=keys.publisher_enc)
    # A well-formed delta to a *different* 1.1.0 bundle, signed into the metadata.
    impostor = make_bundle(keys, "1.1.0", models.v3)
    _replace_delta(sim, make_bundle_delta(v1, impostor, publisher_key=keys.publisher_enc))
    result = device.update()
    assert (result["installed"], result["method"]) == ("1.1.0", "full")
    assert device.slots.read(device.slots.active()) == v2
    refused = ledger.entries(event_type="update.delta_refused")[-1].payload
    assert refused["reason"] == "TargetMismatchError"
    assert events(ledger)[-1] == "update.installed"


def test_attack_bad_delta_that_does_not_apply(sim, device, keys, models, ledger):
    installed_v1(sim, device, keys, models)
    v2 = make_bundle(keys, "1.1.0", models.v2)
    sim.repo.publish(v2, publisher_key=keys.publisher_enc)
    _replace_delta(sim, b"INSITUD\x01" + b"\0" * 64)
    result = device.update()
    assert result["method"] == "full"
    assert device.slots.read(device.slots.active()) == v2
    assert ledger.entries(event_type="update.delta_refused")[-1].payload["reason"] == "DeltaError"
