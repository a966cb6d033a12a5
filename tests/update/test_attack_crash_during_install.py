"""A crash in the middle of an install: the update process is killed with SIGKILL while
the new version is being written, or just before it is switched to. The old version
still loads and serves; the next update completes and cleans up."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from insitu.runtime import create_session
from insitu.update import UpdateClient, init_directory_repository, open_directory_repository
from tests.update._http import serving
from tests.update.conftest import make_bundle

CHILD = textwrap.dedent(
    """
    import os, pathlib, signal, sys
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from insitu.update import UpdateClient

    crash_at, directory, key = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
    real_replace = pathlib.Path.replace

    def replace(self, target):
        name = pathlib.Path(target).name
        if (crash_at == "slot" and name.endswith(".insb")) or (
            crash_at == "commit" and name == "state.json"
        ):
            os.kill(os.getpid(), signal.SIGKILL)  # the temp file is written and synced
        return real_replace(self, target)

    pathlib.Path.replace = replace
    device_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(key))
    UpdateClient(directory, device_key=device_key).update()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", ["slot", "commit"])
def test_attack_sigkill_during_install(tmp_path, keys, models, crash_at):
    repo_dir = tmp_path / "repo"
    init_directory_repository(repo_dir, publishers=[keys.publisher.public_key()])
    repo = open_directory_repository(repo_dir)
    repo.publish(make_bundle(keys, "1.0.0", models.v1))
    with serving(repo_dir) as url:
        UpdateClient.enroll(
            tmp_path / "dev", root=repo.storage.read("metadata/1.root.json"), url=url, model="mlp"
        )
        device = UpdateClient(tmp_path / "dev", device_key=keys.device)
        device.update()
        repo.publish(make_bundle(keys, "1.1.0", models.v2), publisher_key=keys.publisher_enc)
        state_before = device.slots.state_path.read_bytes()
        slot_a_before = device.slots.slot_path("a").read_bytes()
        raw_key = keys.device.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        child = subprocess.run(
            [sys.executable, "-c", CHILD, crash_at, str(tmp_path / "dev"), raw_key.hex()],
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()

        # The old version is untouched, still active, and still serves.
        device = UpdateClient(tmp_path / "dev", device_key=keys.device)
        assert device.slots.state_path.read_bytes() == state_before
        assert device.slots.slot_path("a").read_bytes() == slot_a_before
        opened = device.load()
        assert (opened.bundle.version, bytes(opened.model)) == ("1.0.0", models.v1)
        bundle, session = device.session()  # the production load path
        assert bundle.version == "1.0.0"
        x = np.ones((2, 16), np.float32)
        expected = create_session(models.v1).run(None, {"x": x})[0]
        assert np.array_equal(session.run(None, {"x": x})[0], expected)
        assert not list(device.slots.directory.glob(".*.tmp"))  # swept on open

        # And the next update completes.
        assert device.update()["installed"] == "1.1.0"
        assert bytes(device.load().model) == models.v2
