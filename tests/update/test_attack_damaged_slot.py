"""A damaged or swapped install slot: a byte flipped on the device's storage, or the two
slot files exchanged (each a validly signed bundle, of the other version).

Loading refuses such a slot; these tests show the rest: ``update status`` says what is
wrong, ``insitu update`` reinstalls the version from the repository (full bundle) and
records ``update.repaired``, the model serves again, and ``insitu rollback`` refuses to
switch to a damaged previous slot. The attacker (or the SD card) can write the slot
files, not the repository's signing keys.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from insitu.bundle import Bundle
from insitu.errors import InstallError, ModelNotFoundError, TamperedBundleError
from insitu.runtime import ModelRuntime, create_session
from insitu.update import UpdateClient
from insitu.workspace import Workspace
from tests.update._cli import Site, invoke, invoke_json
from tests.update._http import serving
from tests.update.conftest import events, installed_v1, make_bundle

X = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)


def _v2_installed(sim, device, keys, models) -> tuple[bytes, bytes]:
    """1.0.0 in slot a, then 1.1.0 (a delta) active in slot b; return both bundles."""
    v1 = installed_v1(sim, device, keys, models)
    v2 = make_bundle(keys, "1.1.0", models.v2)
    sim.repo.publish(v2, publisher_key=keys.publisher_enc)
    assert device.update()["slot"] == "b"
    return v1, v2


def _flip(path, offset: int = -7) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _swap(slots) -> None:
    a, b = slots.slot_path("a"), slots.slot_path("b")
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)


def _serves(device: UpdateClient, model: bytes) -> bool:
    _, session = device.session()  # the load path of insitu serve (runtime.InstalledModel)
    expected = create_session(model).run(None, {"x": X})[0]
    return np.array_equal(session.run(None, {"x": X})[0], expected)


def test_attack_byte_flipped_in_the_active_slot_is_shown_and_repaired(
    sim, device, keys, models, ledger
):
    v1, v2 = _v2_installed(sim, device, keys, models)
    _flip(device.slots.slot_path("b"))
    status = device.status()
    assert status["active"]["damage"]["kind"] == "changed"
    assert "slot b (mlp 1.1.0): its bytes changed on disk" in status["active"]["damage"]["detail"]
    assert status["previous"]["damage"] is None
    with pytest.raises(InstallError, match="changed on disk"):
        device.load()
    assert device.update(check_only=True)["status"] == "damaged"  # --check repairs nothing
    assert device.slots.slot_path("b").read_bytes() != v2

    sim.fetched.clear()
    result = device.update()
    assert (result["status"], result["installed"]) == ("repaired", "1.1.0")
    assert result["repaired"]["kind"] == "changed"
    assert sim.stored_target_path("bundles/mlp/1.1.0.insb") in sim.fetched  # the full bundle
    assert device.slots.slot_path("b").read_bytes() == v2
    assert device.slots.slot_path("a").read_bytes() == v1  # the rollback target untouched
    assert device.status()["active"]["damage"] is None
    assert _serves(device, models.v2)
    (repaired,) = ledger.entries(event_type="update.repaired")
    assert repaired.payload == {
        "model": "mlp",
        "version": "1.1.0",
        "slot": "b",
        "damage": "changed",
        "bundle_sha256": device.slots.active().sha256,
    }
    assert events(ledger)[-2:] == ["update.downloaded", "update.repaired"]
    assert device.update()["status"] == "up-to-date"


def test_attack_swapped_slots_are_shown_repaired_and_not_rolled_back_to(
    sim, device, keys, models, ledger
):
    _, v2 = _v2_installed(sim, device, keys, models)
    _swap(device.slots)  # each slot now holds the other's validly signed bundle
    status = device.status()
    assert status["active"]["damage"]["kind"] == "swapped"
    assert "another bundle (mlp 1.0.0" in status["active"]["damage"]["detail"]
    assert status["previous"]["damage"]["kind"] == "swapped"
    with pytest.raises(InstallError, match="no longer holds"):
        device.session()

    refusal = r"^cannot roll back: the previous slot a \(mlp 1\.0\.0\)"
    with pytest.raises(InstallError, match=refusal):
        device.rollback()
    assert device.status()["active"]["version"] == "1.1.0"  # nothing was switched, nor held
    assert device.slots.held() == []
    assert ledger.entries(event_type="update.refused")[-1].payload["action"] == "rollback"

    result = device.update()
    assert result["status"] == "repaired"
    assert result["repaired"]["kind"] == "swapped"
    assert device.slots.slot_path("b").read_bytes() == v2
    assert _serves(device, models.v2)
    assert ledger.entries(event_type="update.repaired")[-1].payload["damage"] == "swapped"


def test_attack_slot_replaced_by_another_signed_build_with_its_record_rewritten(
    sim, device, keys, models
):
    # Another build of 1.1.0, validly signed by the publisher but never published, and
    # state.json rewritten to match it: only the signed target tells it apart.
    _, v2 = _v2_installed(sim, device, keys, models)
    other = make_bundle(keys, "1.1.0", models.v3)
    device.slots.slot_path("b").write_bytes(other)
    state = json.loads(device.slots.state_path.read_text())
    state["slots"]["b"]["sha256"] = hashlib.sha256(other).hexdigest()
    state["slots"]["b"]["bundle_id"] = Bundle.parse(other).bundle_id
    device.slots.state_path.write_text(json.dumps(state))
    assert device.status()["active"]["damage"]["kind"] == "unlike-signed"
    assert device.update()["repaired"]["kind"] == "unlike-signed"
    assert device.slots.slot_path("b").read_bytes() == v2
    assert _serves(device, models.v2)


def test_a_damaged_slot_is_replaced_by_a_newer_offer(sim, device, keys, models, ledger):
    _v2_installed(sim, device, keys, models)
    _flip(device.slots.slot_path("b"))
    sim.repo.publish(make_bundle(keys, "1.2.0", models.v3), publisher_key=keys.publisher_enc)
    result = device.update()
    # Repaired first (so the delta has a sound base), then the newer version installed.
    assert result["repaired"]["version"] == "1.1.0"
    assert (result["status"], result["installed"]) == ("installed", "1.2.0")
    assert _serves(device, models.v3)
    assert events(ledger).count("update.repaired") == 1


def test_a_damaged_slot_the_repository_cannot_reinstall_says_what_to_do(sim, device, keys, models):
    _v2_installed(sim, device, keys, models)
    # The active slot records a version made on this device (insitu finetune), which no
    # repository holds; its file is damaged.
    state = json.loads(device.slots.state_path.read_text())
    state["slots"]["b"]["version"] = "1.2.0-local.1"  # newer than what the channel offers
    device.slots.state_path.write_text(json.dumps(state))
    _flip(device.slots.slot_path("b"))
    before = device.slots.state_path.read_bytes()
    with pytest.raises(InstallError, match=r"cannot be reinstalled \(it was made on this device\)"):
        device.update()
    assert device.slots.state_path.read_bytes() == before


def test_rollback_refuses_a_byte_flipped_previous_slot(sim, device, keys, models):
    _v2_installed(sim, device, keys, models)
    _flip(device.slots.slot_path("a"))
    assert device.status()["previous"]["damage"]["kind"] == "changed"
    with pytest.raises(InstallError, match="cannot roll back") as refused:
        device.rollback()
    assert "\n" not in str(refused.value)
    assert "mlp 1.1.0 stays active" in str(refused.value)
    assert _serves(device, models.v2)


@pytest.mark.parametrize("damage", ["flip", "swap"])
def test_attack_damaged_slot_through_the_command_line(tmp_path, capsys, damage):
    site = Site.make(tmp_path, capsys)
    site.publish("1.0.0")
    with serving(site.repo) as url:
        site.enroll(url)
        invoke_json(capsys, "update", "--home", site.device)
        site.publish("2.0.0")
        assert invoke_json(capsys, "update", "--home", site.device)["slot"] == "b"
        slots = site.update_dir / "slots"
        good = (slots / "b.insb").read_bytes()
        if damage == "flip":
            _flip(slots / "b.insb")
        else:
            (slots / "a.insb").write_bytes(good)  # both slots hold 2.0.0 now ...
            (slots / "b.insb").write_bytes(site.bundle("1.0.0").read_bytes())  # ... b: 1.0.0
        # Refused (an installed slot that is not the install's, or does not decrypt).
        with (
            ModelRuntime.for_workspace(Workspace.open(site.device), guard=False) as runtime,
            pytest.raises((ModelNotFoundError, TamperedBundleError)),
        ):
            runtime.predict("triage", X[:, :8])

        code, out, _ = invoke(capsys, "update", "status", "--home", site.device)
        assert code == 0
        # From the active slot's entry on, its wrapped lines joined (Rich wraps at the
        # terminal's width, pytest-xdist's workers at 80 columns).
        active_line = "active:" + " ".join(out.split()).split("active:", 1)[1]
        assert "2.0.0 (slot b) DAMAGED" in active_line
        assert ("changed on disk" if damage == "flip" else "swapped") in active_line
        assert "run 'insitu update' to reinstall it" in active_line
        status = invoke_json(capsys, "update", "status", "--home", site.device)
        assert status["active"]["damage"]["kind"] == ("changed" if damage == "flip" else "swapped")

        code, out, _ = invoke(capsys, "update", "--home", site.device)
        assert code == 0
        assert "repaired slot b (triage 2.0.0): its" in out
        assert "triage 2.0.0 is up to date" in out
    assert (slots / "b.insb").read_bytes() == good
    status = invoke_json(capsys, "update", "status", "--home", site.device)
    assert status["active"]["damage"] is None
    with ModelRuntime.for_workspace(Workspace.open(site.device), guard=False) as runtime:
        outputs = runtime.predict("triage", X[:, :8])
    assert np.array_equal(outputs["y"], site.expected_output("2.0.0", X[:, :8]))
    types = [e.type for e in site.update_events()]
    assert types[-1] == "update.repaired"
    repaired = site.update_events()[-1].payload
    assert (repaired["version"], repaired["slot"]) == ("2.0.0", "b")
    assert repaired["damage"] == ("changed" if damage == "flip" else "swapped")
    if damage == "swap":  # slot a holds 2.0.0's bytes: not 1.0.0 any more
        code, _, err = invoke(capsys, "rollback", "--home", site.device)
        assert code == 1
        (line,) = err.strip().splitlines()
        assert "cannot roll back: the previous slot a (triage 1.0.0)" in line


def test_rollback_from_a_damaged_active_slot_serves_the_sound_previous_version(
    sim, device, keys, models, ledger
):
    # The repository may be out of reach when the active slot is found damaged: rolling
    # back to the sound previous version is the operator's way to keep serving.
    v1, _ = _v2_installed(sim, device, keys, models)
    _flip(device.slots.slot_path("b"))
    result = device.rollback()
    assert (result["active"], result["was"], result["slot"]) == ("1.0.0", "1.1.0", "a")
    assert device.slots.slot_path("a").read_bytes() == v1
    assert device.status()["active"]["damage"] is None
    assert _serves(device, models.v1)
    assert ledger.entries(event_type="update.rolled_back")[-1].payload["from_version"] == "1.1.0"
    # The damaged version is held: the next update does not reinstall it over the rollback.
    assert device.slots.held() == ["1.1.0"]
