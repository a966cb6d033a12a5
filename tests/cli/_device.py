"""The device's whole life on the command line, run by a device's Python.

A publisher (this process, the full install) trains nothing: it builds a small ONNX model
with onnx.helper, signs and encrypts a bundle for the device and publishes it in a TUF
repository served on loopback. The device runs each verb as a separate process, through
``device_python`` (a Python without PyTorch, Flower, pandas or SHAP), and must enroll,
update, verify, serve, predict over HTTP, roll back and verify its ledger.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from insitu.cli import run
from tests.bundle._models import write_trained_pair
from tests.update._http import serving

# What a device install lacks (the top-level import names).
NOT_ON_A_DEVICE = (
    "torch",
    "flwr",
    "opacus",
    "ray",
    "pandas",
    "pyarrow",
    "shap",
    "numba",
    "sklearn",
    "scipy",
    "matplotlib",
    "skl2onnx",
    # The sign extra (ML-BOM, OpenSSF model signatures) is the publisher's: a device
    # verifies bundles with insitu's own code and reads their BOM as JSON.
    "cyclonedx",
    "model_signing",
    "sigstore",
    "OpenSSL",
)

BLOCKER = f"""
import sys
from importlib.abc import MetaPathFinder

class _NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {set(NOT_ON_A_DEVICE)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
"""

WIDTHS = [8, 16, 3]

Device = Callable[..., subprocess.CompletedProcess[str]]


def device_venv(tmp_path: Path, root: Path) -> Path:
    """A venv holding ``insitu[device]`` only (no pip), built from a copy of ``root``.

    A copy, because pip builds a local project in its own tree (``build/``).
    """
    source = tmp_path / "source"
    shutil.copytree(
        root / "src",
        source / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(root / name, source / name)
    venv = tmp_path / "device-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [
            sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
            "--quiet", "--disable-pip-version-check", "--no-warn-script-location",
            f"{source}[device]",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return venv


def blocked_python(tmp_path: Path, python: str) -> list[str]:
    """A command line running ``insitu`` in ``python`` with the training stack hidden."""
    runner = tmp_path / "device_insitu.py"
    runner.write_text(BLOCKER + "\nfrom insitu.cli import main\nmain()\n")
    return [python, str(runner)]


def device_runner(command: Sequence[str], home: Path) -> Device:
    """Run one ``insitu`` verb on the device (its home) and return the finished process."""

    def device(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*command, *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "INSITU_HOME": str(home), "COLUMNS": "200"},
        )
        if check:
            assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc

    return device


@dataclass
class Publisher:
    """The publisher's side: a workspace, a repository and two model versions."""

    tmp: Path
    home: str
    repo: str

    def publish(self, model: str, version: str, device_home: Path) -> Path:
        out = self.tmp / f"triage-{version}.insb"
        assert run([
            "bundle", "create", str(self.tmp / model), "--name", "triage", "--version", version,
            "--out", str(out), "--recipient", f"{device_home}/keys/encryption.pub.pem",
            "--metric", "auc=0.91", "--epsilon", "3", "--delta", "1e-5", "--home", self.home,
        ]) == 0  # fmt: skip
        assert run(["repo", "publish", self.repo, str(out), "--home", self.home]) == 0
        return out


def publisher(tmp: Path) -> Publisher:
    """A publisher workspace, its repository and two models whose training it records."""
    home = str(tmp / "publisher")
    assert run(["init", "--home", home]) == 0
    write_trained_pair(home, WIDTHS, tmp / "model.onnx", tmp / "model2.onnx")
    repo = str(tmp / "repo")
    assert run(["repo", "init", repo, "--home", home]) == 0
    return Publisher(tmp, home, repo)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serve_and_predict(
    command: Sequence[str], home: Path
) -> tuple[list[list[float]], tuple[int, str]]:
    """Predict one row over HTTP, then ask for an explanation: (outputs, explain answer)."""
    port = _free_port()
    proc = subprocess.Popen(
        [*command, "serve", "--port", str(port), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "INSITU_HOME": str(home)},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline()]  # one JSON document, once listening
        while lines[-1] and lines[-1].rstrip() != "}":
            lines.append(proc.stdout.readline())
        announced = json.loads("".join(lines) or "{}")
        assert announced.get("serving") == f"http://127.0.0.1:{port}"
        token = (home / "keys" / "api-token").read_text().strip()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/models/triage/predict",
            data=json.dumps({"inputs": [[0.5] * WIDTHS[0]]}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            doc = json.loads(response.read())
        outputs: list[list[float]] = next(iter(doc["outputs"].values()))
        explain = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/models/triage/explain",
            data=json.dumps({"inputs": [[0.5] * WIDTHS[0]]}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(explain, timeout=30).close()
            explained: tuple[int, str] = (200, "")
        except urllib.error.HTTPError as refused:
            with refused:
                explained = (refused.code, json.loads(refused.read())["detail"])
        return outputs, explained
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def device_life(tmp: Path, command: Sequence[str]) -> dict[str, object]:
    """Run the device's life with ``command`` as its ``insitu``; return what it showed."""
    home = tmp / "device"
    device = device_runner(command, home)
    shown: dict[str, object] = {}
    shown["version"] = device("--version").stdout.strip()
    device("init")
    pub = publisher(tmp)
    first = pub.publish("model.onnx", "1.0.0", home)
    with serving(Path(pub.repo)) as url:
        root = f"{pub.repo}/public/metadata/1.root.json"
        device("update", "enroll", "--root", root, "--url", url, "--model", "triage")
        shown["first"] = json.loads(device("update", "--json").stdout)
        pub.publish("model2.onnx", "1.1.0", home)
        shown["check"] = device("update", "--check").stdout
        shown["second"] = json.loads(device("update", "--json").stdout)
    shown["status"] = json.loads(device("update", "status", "--json").stdout)
    publisher_key = f"{pub.home}/keys/signing.pub.pem"
    shown["verify"] = json.loads(
        device("bundle", "verify", str(first), "--publisher", publisher_key, "--json").stdout
    )
    started = time.perf_counter()
    shown["outputs"], shown["explain_http"] = _serve_and_predict(command, home)
    shown["serve_seconds"] = time.perf_counter() - started
    shown["drift"] = json.loads(device("drift", "status", "--json").stdout)
    shown["rollback"] = json.loads(device("rollback", "--json").stdout)
    shown["audit"] = device("audit", "verify").stdout
    shown["info"] = json.loads(device("info", "--json").stdout)
    shown["federate"] = device("federate", "simulate", "x.csv", check=False)
    shown["predict_file"] = device("predict", "triage", "in.csv", "-o", "out.csv", check=False)
    shown["explain_cli"] = device("explain", "triage", "in.csv", check=False)
    return shown


def check_device_life(shown: dict[str, object]) -> None:
    """What every device install must have shown."""
    assert shown["version"] == "insitu 0.1.0"
    assert shown["first"]["installed"] == "1.0.0"  # type: ignore[index]
    assert "1.1.0 is available" in str(shown["check"])
    assert shown["second"]["method"] == "delta"  # type: ignore[index]
    assert shown["status"]["active"]["version"] == "1.1.0"  # type: ignore[index]
    assert "decrypted model digest" in shown["verify"]["verified"]  # type: ignore[index]
    outputs = shown["outputs"]
    assert isinstance(outputs, list)
    assert len(outputs) == 1
    assert len(outputs[0]) == WIDTHS[-1]
    assert shown["rollback"]["active"] == "1.0.0"  # type: ignore[index]
    federate = shown["federate"]
    assert isinstance(federate, subprocess.CompletedProcess)
    assert federate.returncode == 1
    line = federate.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert "insitu federate needs " in line
    assert "pip install 'insitu[federated]'" in line
    predict = shown["predict_file"]
    assert isinstance(predict, subprocess.CompletedProcess)
    assert predict.returncode == 1
    assert "insitu[data]" in predict.stderr
    # No SHAP (nor pandas to read the site's records) on a device: a clear refusal.
    status, detail = shown["explain_http"]  # type: ignore[misc]
    assert status == 501
    assert "pip install 'insitu[serve]'" in detail
    explain = shown["explain_cli"]
    assert isinstance(explain, subprocess.CompletedProcess)
    assert explain.returncode == 1
    assert len(explain.stderr.strip().splitlines()) == 1
    assert "insitu explain needs" in explain.stderr
