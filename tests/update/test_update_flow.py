"""The update client end to end against the in-memory repository simulator."""

from __future__ import annotations

import numpy as np
import pytest

from insitu.errors import NothingToRollBackError, RepositoryError
from insitu.runtime import create_session
from insitu.update import UpdateClient
from tests.update.conftest import events, installed_v1, make_bundle


def _run(client: UpdateClient) -> np.ndarray:
    session = create_session(bytes(client.load().model))
    return session.run(None, {"x": np.ones((1, 16), np.float32)})[0]


def test_first_install_is_a_full_download_and_loads(sim, device, keys, models, ledger):
    installed_v1(sim, device, keys, models)
    assert device.status()["active"]["version"] == "1.0.0"
    assert bytes(device.load().model) == models.v1
    assert _run(device).shape == (1, 4)
    assert events(ledger) == ["update.downloaded", "update.installed"]
    assert ledger.entries(event_type="update.downloaded")[0].payload["kind"] == "bundle"


def test_second_version_arrives_as_a_delta_and_rollback_returns(sim, device, keys, models, ledger):
    installed_v1(sim, device, keys, models)
    v2 = make_bundle(keys, "1.1.0", models.v2)
    published = sim.repo.publish(v2, publisher_key=keys.publisher_enc)
    assert "1.0.0" in published["deltas"]
    result = device.update()
    assert (result["installed"], result["method"], result["slot"]) == ("1.1.0", "delta", "b")
    assert device.slots.read(device.slots.active()) == v2  # rebuilt byte for byte
    assert not any(p.endswith("1.1.0.insb") for p in sim.fetched)  # the full one never fetched
    before = _run(device)

    rolled = device.rollback()
    assert (rolled["active"], rolled["was"]) == ("1.0.0", "1.1.0")
    assert bytes(device.load().model) == models.v1
    assert not np.allclose(before, _run(device))
    assert "update.rolled_back" in events(ledger)
    # The version rolled back from is held: the next update does not reinstall it ...
    assert device.update()["status"] == "held"
    assert device.status()["active"]["version"] == "1.0.0"
    # ... but a newer one is installed as usual.
    sim.repo.publish(make_bundle(keys, "1.2.0", models.v3), publisher_key=keys.publisher_enc)
    assert device.update()["installed"] == "1.2.0"


def test_check_only_downloads_no_bundle(sim, device, keys, models):
    installed_v1(sim, device, keys, models)
    sim.repo.publish(make_bundle(keys, "1.1.0", models.v2), publisher_key=keys.publisher_enc)
    sim.fetched.clear()
    result = device.update(check_only=True)
    assert (result["status"], result["available"], result["installed"]) == (
        "available",
        "1.1.0",
        "1.0.0",
    )
    assert not any(p.startswith(("targets/bundles", "targets/deltas")) for p in sim.fetched)
    assert device.status()["active"]["version"] == "1.0.0"


def test_up_to_date_downloads_no_bundle(sim, device, keys, models):
    installed_v1(sim, device, keys, models)
    sim.fetched.clear()
    assert device.update()["status"] == "up-to-date"
    assert not any(p.startswith("targets/bundles") for p in sim.fetched)


def test_channels_and_device_assignment(sim, device, keys, models):
    installed_v1(sim, device, keys, models)
    sim.repo.publish(make_bundle(keys, "1.1.0", models.v2), channels=["canary"])
    assert device.update()["status"] == "up-to-date"  # stable still runs 1.0.0
    assert device.update(channel="canary")["installed"] == "1.1.0"
    # A per-device pointer (the director's assignment) wins over the channel.
    keyid = device.status()["device_key_id"]
    sim.repo.publish(make_bundle(keys, "1.2.0", models.v3), channels=[], devices=[keyid])
    assert device.update()["installed"] == "1.2.0"


def test_a_model_not_published_is_a_clear_error(device):
    with pytest.raises(RepositoryError, match="publishes no model 'mlp'"):
        device.update()


def test_nothing_to_roll_back(sim, device, keys, models):
    installed_v1(sim, device, keys, models)
    with pytest.raises(NothingToRollBackError, match="no previous version"):
        device.rollback()


def test_publish_refuses_to_move_a_channel_back_and_says_how(sim, keys, models):
    sim.repo.publish(make_bundle(keys, "1.1.0", models.v2))
    with pytest.raises(RepositoryError, match="--republishes"):
        sim.repo.publish(make_bundle(keys, "1.0.0", models.v1))
    with pytest.raises(RepositoryError, match="already published"):
        sim.repo.publish(make_bundle(keys, "1.1.0", models.v2), channels=["canary"])


def test_republishing_an_old_model_as_a_new_version(sim, device, keys, models, ledger):
    installed_v1(sim, device, keys, models)
    sim.repo.publish(make_bundle(keys, "1.1.0", models.v2), publisher_key=keys.publisher_enc)
    device.update()
    sim.repo.publish(make_bundle(keys, "1.1.1", models.v1, republishes="1.0.0"))
    assert device.update()["installed"] == "1.1.1"
    assert bytes(device.load().model) == models.v1
    assert device.load().card.republishes == "1.0.0"
    installed = ledger.entries(event_type="update.installed")[-1].payload
    assert installed["republishes"] == "1.0.0"


def test_threshold_two_needs_both_signatures(keys, models, tmp_path, ledger):
    from tests.update.repository_simulator import BASE_URL, RepositorySimulator

    sim = RepositorySimulator([keys.publisher.public_key()], threshold=2)
    sim.repo.publish(make_bundle(keys, "1.0.0", models.v1))
    UpdateClient.enroll(tmp_path / "d", root=sim.root_bytes, url=BASE_URL, model="mlp")
    client = UpdateClient(tmp_path / "d", device_key=keys.device, ledger=ledger, fetcher=sim)
    assert client.update()["installed"] == "1.0.0"
    assert sim.repo.root().roles["targets"].threshold == 2


def test_session_of_the_installed_model(sim, device, keys, models):
    installed_v1(sim, device, keys, models)
    bundle, session = device.session()
    assert bundle.version == "1.0.0"
    assert session.run(None, {"x": np.ones((3, 16), np.float32)})[0].shape == (3, 4)


def test_a_slot_overwritten_with_another_signed_bundle_is_refused(sim, device, keys, models):
    from insitu.errors import InstallError

    installed_v1(sim, device, keys, models)
    other = make_bundle(keys, "1.0.0", models.v2)  # validly signed, not the one installed
    device.slots.slot_path(device.slots.active().slot).write_bytes(other)
    with pytest.raises(InstallError, match="no longer holds"):
        device.session()
    with pytest.raises(InstallError, match="changed on disk"):
        device.load()


def test_one_update_at_a_time(sim, device, keys, models):
    import fcntl

    from insitu.errors import UpdateInProgressError

    installed_v1(sim, device, keys, models)
    with (device.directory / ".lock").open("a") as other:
        fcntl.flock(other, fcntl.LOCK_EX)  # another process is updating
        with pytest.raises(UpdateInProgressError, match="is running"):
            device.update()
        with pytest.raises(UpdateInProgressError):
            device.rollback()
    assert device.update()["status"] == "up-to-date"


def test_publish_refuses_a_bundle_the_root_does_not_trust(sim, keys, models, ledger):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from insitu.errors import UntrustedPublisherError

    stranger = make_bundle(keys, "1.0.0", models.v1, signer=Ed25519PrivateKey.generate())
    with pytest.raises(UntrustedPublisherError):
        sim.repo.publish(stranger, ledger=ledger)
    assert sim.repo.targets().targets == {}
    refused = ledger.entries(event_type="repo.publish_refused")[-1].payload
    assert refused == {"reason": "UntrustedPublisherError"}


def test_a_malformed_pointer_is_a_clear_error(sim, device, keys, models):
    from insitu.update._repository import channel_path

    installed_v1(sim, device, keys, models)
    with sim.repo.edit_targets("assignments") as targets:
        sim.repo._add_target(targets, channel_path("stable", "mlp"), b"[1, 2]", {"kind": "pointer"})
    sim.repo.do_snapshot()
    sim.repo.do_timestamp()
    with pytest.raises(RepositoryError, match="not a valid pointer"):
        device.update()
    assert device.status()["active"]["version"] == "1.0.0"


def test_the_genuine_metadata_check_finds_a_planted_file(sim, device, keys, models):
    from tests.update.conftest import assert_only_genuine_metadata

    installed_v1(sim, device, keys, models)
    assert_only_genuine_metadata(device, sim)
    (device.metadata_dir / "timestamp.json").write_bytes(b'{"planted": true}')
    with pytest.raises(AssertionError):
        assert_only_genuine_metadata(device, sim)
