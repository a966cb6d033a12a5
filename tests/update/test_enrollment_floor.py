"""A floor at enrollment: a device never installs a version older than what its channel
offered when it enrolled (or ``--min-version``).

The attack: whoever holds the assignments key (it lives on the deployment host) points
the channel back at an older, validly signed bundle, one with a known flaw. A device
that already runs the newer version refuses the downgrade (``test_attack_rollback.py``);
one enrolled *after* the channel moved forward has nothing installed to compare with,
and without a floor would install the old model.
"""

from __future__ import annotations

import json

import pytest

from insitu.errors import RepositoryUnavailableError, RollbackError, UsageError
from insitu.update import UpdateClient, open_directory_repository
from insitu.update._repository import channel_path
from insitu.workspace import Workspace
from tests.update._cli import Site, invoke, invoke_json
from tests.update._http import serving
from tests.update.conftest import events, make_bundle
from tests.update.repository_simulator import BASE_URL


def _point_channel_back(repo, version: str) -> None:
    """What a stolen assignments key can do: sign a channel pointer to an older bundle."""
    pointer = {"bundle": f"bundles/mlp/{version}.insb", "deltas": {}, "name": "mlp"}
    pointer["version"] = version
    with repo.edit_targets("assignments") as targets:
        repo._add_target(
            targets,
            channel_path("stable", "mlp"),
            json.dumps(pointer, sort_keys=True, separators=(",", ":")).encode(),
            {"kind": "pointer"},
        )
    repo.do_snapshot()
    repo.do_timestamp()


def _new_device(tmp_path, sim, keys, ledger=None, **enroll) -> UpdateClient:
    config = UpdateClient.enroll(
        tmp_path / "new", root=sim.root_bytes, url=BASE_URL, model="mlp", fetcher=sim,
        ledger=ledger, **enroll,
    )  # fmt: skip
    assert config.model == "mlp"
    return UpdateClient(tmp_path / "new", device_key=keys.device, ledger=ledger, fetcher=sim)


def _published(sim, keys, models) -> None:
    sim.repo.publish(make_bundle(keys, "1.0.0", models.v1), publisher_key=keys.publisher_enc)
    sim.repo.publish(make_bundle(keys, "1.1.0", models.v2), publisher_key=keys.publisher_enc)


def test_attack_channel_pointed_back_is_refused_for_a_newly_enrolled_device(
    tmp_path, sim, keys, models, ledger
):
    _published(sim, keys, models)
    device = _new_device(tmp_path, sim, keys, ledger, learn_floor=True)
    assert device.config.floor == "1.1.0"  # what the channel offered at enrollment
    assert ledger.entries(event_type="update.enrolled")[-1].payload["floor"] == "1.1.0"
    _point_channel_back(sim.repo, "1.0.0")
    with pytest.raises(RollbackError, match=r"offers 1\.0\.0, below this device's floor 1\.1\.0"):
        device.update()
    with pytest.raises(RollbackError, match="below this device's floor"):
        device.update(check_only=True)
    assert device.slots.active() is None
    assert events(ledger)[-1] == "update.refused"
    assert ledger.entries(event_type="update.refused")[-1].payload["reason"] == "RollbackError"

    # Without the floor, the same device would have installed the old model: the attack
    # this guards against is real.
    bare = tmp_path / "bare"
    UpdateClient.enroll(bare, root=sim.root_bytes, url=BASE_URL, model="mlp")
    unguarded = UpdateClient(bare, device_key=keys.device, fetcher=sim)
    assert unguarded.update()["installed"] == "1.0.0"


def test_a_min_version_given_at_enrollment_is_the_floor(tmp_path, sim, keys, models):
    _published(sim, keys, models)
    device = _new_device(tmp_path, sim, keys, min_version="2.0.0")
    assert device.config.floor == "2.0.0"
    with pytest.raises(RollbackError, match=r"below this device's floor 2\.0\.0"):
        device.update()
    sim.repo.publish(make_bundle(keys, "2.0.0", models.v3), publisher_key=keys.publisher_enc)
    assert device.update()["installed"] == "2.0.0"


def test_a_floor_never_moves_down_on_enrolling_again(tmp_path, sim, keys, models):
    _published(sim, keys, models)
    _new_device(tmp_path, sim, keys, learn_floor=True)
    again = _new_device(tmp_path, sim, keys, min_version="1.0.0")
    assert again.config.floor == "1.1.0"
    assert again.status()["config"]["floor"] == "1.1.0"


def test_a_channel_that_offers_nothing_yet_sets_no_floor(tmp_path, sim, keys, models):
    device = _new_device(tmp_path, sim, keys, learn_floor=True)
    assert device.config.floor is None
    sim.repo.publish(make_bundle(keys, "1.0.0", models.v1), publisher_key=keys.publisher_enc)
    assert device.update()["installed"] == "1.0.0"


def test_a_repository_unreachable_at_enrollment_enrolls_nothing(tmp_path, sim, keys):
    with pytest.raises(RepositoryUnavailableError, match="cannot be reached"):
        UpdateClient.enroll(
            tmp_path / "new", root=sim.root_bytes, url=f"{BASE_URL}/moved", model="mlp",
            fetcher=sim, learn_floor=True,
        )  # fmt: skip
    assert not (tmp_path / "new" / "config.json").exists()
    assert not (tmp_path / "new" / "root.json").exists()


@pytest.mark.parametrize(
    ("version", "message"),
    [("2.0", "not a semantic version"), ("1.0.0-local.1", "device-local version")],
)
def test_a_min_version_that_is_not_a_release_is_refused(tmp_path, sim, version, message):
    with pytest.raises(UsageError, match=message):
        UpdateClient.enroll(
            tmp_path / "new", root=sim.root_bytes, url=BASE_URL, model="mlp", min_version=version
        )
    assert not (tmp_path / "new" / "config.json").exists()


def test_the_floor_through_the_command_line(tmp_path, capsys):
    site = Site.make(tmp_path, capsys)
    site.publish("1.0.0")
    site.publish("2.0.0")
    repo = open_directory_repository(site.repo)
    with serving(site.repo) as url:
        code, out, _ = invoke(
            capsys, "update", "enroll", "--root", f"{site.repo}/public/metadata/1.root.json",
            "--url", url, "--model", "triage", "--home", site.device,
        )  # fmt: skip
        assert code == 0
        assert "floor 2.0.0" in out
        status = invoke_json(capsys, "update", "status", "--home", site.device)
        assert status["config"]["floor"] == "2.0.0"
        # The channel is signed back to 1.0.0 (publish refuses; the assignments key can).
        pointer = {"bundle": "bundles/triage/1.0.0.insb", "deltas": {}, "name": "triage"}
        pointer["version"] = "1.0.0"
        with repo.edit_targets("assignments") as targets:
            repo._add_target(
                targets,
                channel_path("stable", "triage"),
                json.dumps(pointer, sort_keys=True, separators=(",", ":")).encode(),
                {"kind": "pointer"},
            )
        repo.do_snapshot()
        repo.do_timestamp()
        code, _, err = invoke(capsys, "update", "--home", site.device)
        assert code == 1
        (line,) = err.strip().splitlines()
        assert "offers 1.0.0, below this device's floor 2.0.0" in line
        # --min-version on another device: the floor it gives, not the channel's.
        other = str(tmp_path / "other")
        invoke(capsys, "init", "--home", other)
        enrolled = site.enroll(url, "--min-version", "1.0.0", home=other)
        assert enrolled["floor"] == "1.0.0"
    with Workspace.open(site.device).ledger() as ledger:
        assert ledger.entries(event_type="update.enrolled")[-1].payload["floor"] == "2.0.0"
