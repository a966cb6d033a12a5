"""The update client's refusals that no attack test names: not enrolled, no repository,
metadata that is not metadata. Each leaves the device's trusted state as it was."""

from __future__ import annotations

import pytest

from insitu.cli import run
from insitu.errors import NotEnrolledError, RepositoryUnavailableError, UpdateRefusedError
from insitu.update import UpdateClient
from insitu.workspace import Workspace
from tests.update.conftest import (
    assert_only_genuine_metadata,
    assert_slots_unchanged,
    device_state,
)
from tests.update.repository_simulator import BASE_URL


def test_a_device_never_enrolled_is_told_how_to_enroll(tmp_path, keys):
    with pytest.raises(NotEnrolledError, match=r"not enrolled .* run 'insitu update enroll"):
        UpdateClient(tmp_path / "update", device_key=keys.device)
    assert not (tmp_path / "update").exists()


def test_the_cli_on_a_device_never_enrolled_is_one_line(tmp_path, capsys):
    Workspace.init(tmp_path / "ws", name="ward-7")
    capsys.readouterr()
    code = run(["update", "status", "--home", str(tmp_path / "ws")])
    err = capsys.readouterr().err
    assert code == NotEnrolledError.exit_code == 1
    (line,) = err.strip().splitlines()
    assert "this device is not enrolled for updates" in line


def test_a_repository_url_that_serves_nothing_is_unavailable(tmp_path, sim, keys):
    # Enrolled with a wrong --url: the server answers 404 for every metadata file.
    UpdateClient.enroll(
        tmp_path / "device", root=sim.root_bytes, url=f"{BASE_URL}/moved", model="mlp"
    )
    device = UpdateClient(tmp_path / "device", device_key=keys.device, fetcher=sim)
    before = device_state(device)
    with pytest.raises(RepositoryUnavailableError, match=r"cannot be reached .* check --url"):
        device.update()
    assert_slots_unchanged(device, before)
    assert_only_genuine_metadata(device, sim)
    assert "moved/metadata/timestamp.json" in sim.fetched


def test_metadata_that_is_not_metadata_is_refused(sim, device):
    # A captive portal or a misconfigured proxy answers with a page instead of JSON.
    sim.serve("metadata/timestamp.json", b"<html><body>Please log in</body></html>")
    before = device_state(device)
    with pytest.raises(UpdateRefusedError, match="the repository's metadata was refused") as caught:
        device.update()
    assert type(caught.value) is UpdateRefusedError  # not mistaken for a named attack
    assert_slots_unchanged(device, before)
    assert_only_genuine_metadata(device, sim)
