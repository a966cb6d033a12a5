"""A publisher and a device driven through the ``insitu`` command (in this process).

``Site.make`` creates both workspaces, two small models (``1.0.0``, ``2.0.0``) whose
training the publisher's ledger records, and a repository; ``publish`` signs, encrypts
for the device and publishes one version. The repository is served over loopback HTTP
with :func:`tests.update._http.serving`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from insitu.cli import run
from insitu.runtime import create_session
from insitu.workspace import Workspace
from tests.bundle._models import write_trained_pair

WIDTHS = [8, 16, 3]
MODELS = {"1.0.0": "model1.onnx", "2.0.0": "model2.onnx"}


def invoke(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def invoke_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    code, out, err = invoke(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


@dataclass
class Site:
    """A publisher workspace, a device workspace and a repository, under ``root``."""

    root: Path
    capsys: pytest.CaptureFixture[str]

    @property
    def publisher(self) -> str:
        return str(self.root / "publisher")

    @property
    def device(self) -> str:
        return str(self.root / "device")

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    @property
    def update_dir(self) -> Path:
        return Path(self.device) / "update"

    @classmethod
    def make(cls, root: Path, capsys: pytest.CaptureFixture[str]) -> Site:
        site = cls(root, capsys)
        for home in (site.publisher, site.device):
            assert invoke(capsys, "init", "--home", home)[0] == 0
        write_trained_pair(site.publisher, WIDTHS, root / MODELS["1.0.0"], root / MODELS["2.0.0"])
        invoke_json(capsys, "repo", "init", str(site.repo), "--home", site.publisher)
        return site

    def bundle(self, version: str, model: str | None = None) -> Path:
        """Create (once) the bundle of ``version`` for the device; return its path."""
        path = self.root / f"triage-{version}.insb"
        if not path.exists():
            invoke_json(
                self.capsys, "bundle", "create", str(self.root / (model or MODELS[version])),
                "--name", "triage", "--version", version, "--out", str(path),
                "--recipient", f"{self.device}/keys/encryption.pub.pem",
                "--epsilon", "3", "--delta", "1e-5", "--home", self.publisher,
            )  # fmt: skip
        return path

    def publish(self, version: str, *extra: str) -> Any:
        return invoke_json(
            self.capsys, "repo", "publish", str(self.repo), str(self.bundle(version)),
            "--home", self.publisher, *extra,
        )  # fmt: skip

    def enroll(self, url: str, *extra: str, home: str | None = None) -> Any:
        return invoke_json(
            self.capsys, "update", "enroll", "--root", f"{self.repo}/public/metadata/1.root.json",
            "--url", url, "--model", "triage", "--home", home or self.device, *extra,
        )  # fmt: skip

    def device_files(self) -> dict[str, bytes]:
        """Every file under the device's update directory, by relative path."""
        return {
            str(p.relative_to(self.update_dir)): p.read_bytes()
            for p in sorted(self.update_dir.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }

    def expected_output(self, version: str, x: np.ndarray) -> np.ndarray:
        model = (self.root / MODELS[version]).read_bytes()
        return create_session(model).run(None, {"x": x})[0]

    def update_events(self) -> list[Any]:
        with Workspace.open(self.device).ledger() as ledger:
            return list(ledger.entries(event_type="update."))
