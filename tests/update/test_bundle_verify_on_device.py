"""``insitu bundle verify`` on a device: without ``--publisher`` it trusts the publisher
keys of the repository the device enrolled with (listed in its signed root), as
``insitu update`` does, and still refuses a bundle signed by anyone else."""

from __future__ import annotations

from tests.update._cli import Site, invoke, invoke_json
from tests.update._http import serving


def test_bundle_verify_on_an_enrolled_device_trusts_the_enrolled_publisher(tmp_path, capsys):
    site = Site.make(tmp_path, capsys)
    site.publish("1.0.0")
    bundle = str(site.bundle("1.0.0"))
    # Not enrolled yet: the device's own key is all it trusts.
    code, _, err = invoke(capsys, "bundle", "verify", bundle, "--home", site.device)
    assert (code, "not a trusted publisher key" in err) == (1, True)

    with serving(site.repo) as url:
        site.enroll(url)
    verified = invoke_json(capsys, "bundle", "verify", bundle, "--home", site.device)
    assert verified["verified"] == "signature, payload digest and decrypted model digest"
    code, out, _ = invoke(capsys, "bundle", "verify", bundle, "--home", site.device)
    assert (code, "verified" in out) == (0, True)

    # A bundle signed by a key the repository does not list is still refused, in one line.
    stranger = str(tmp_path / "stranger")
    invoke(capsys, "init", "--home", stranger)
    forged = str(tmp_path / "forged.insb")
    invoke_json(
        capsys, "bundle", "create", str(tmp_path / "model1.onnx"), "--name", "triage",
        "--version", "1.0.0", "--out", forged, "--recipient",
        f"{site.device}/keys/encryption.pub.pem", "--home", stranger,
    )  # fmt: skip
    code, _, err = invoke(capsys, "bundle", "verify", forged, "--home", site.device)
    assert code == 1
    (line,) = err.strip().splitlines()
    assert "not a trusted publisher key" in line


def test_bundle_verify_follows_the_publishers_the_device_learned_by_root_rotation(tmp_path, capsys):
    site = Site.make(tmp_path, capsys)
    site.publish("1.0.0")
    new_publisher = str(tmp_path / "new-publisher")
    invoke(capsys, "init", "--home", new_publisher)
    with serving(site.repo) as url:
        site.enroll(url)
        invoke_json(
            capsys, "repo", "publishers", str(site.repo), "--add",
            f"{new_publisher}/keys/signing.pub.pem", "--home", site.publisher,
        )  # fmt: skip
        invoke_json(capsys, "update", "--home", site.device)  # follows root v2
    signed_by_new = str(tmp_path / "new.insb")
    invoke_json(
        capsys, "bundle", "create", str(tmp_path / "model1.onnx"), "--name", "triage",
        "--version", "1.0.1", "--out", signed_by_new, "--recipient",
        f"{site.device}/keys/encryption.pub.pem", "--home", new_publisher,
    )  # fmt: skip
    verified = invoke_json(capsys, "bundle", "verify", signed_by_new, "--home", site.device)
    assert "decrypted model digest" in verified["verified"]
