"""A software TPM per test (swtpm), on free loopback ports, stopped afterwards."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from insitu.workspace import Workspace

SWTPM = shutil.which("swtpm")
TOOLS = shutil.which("tpm2_quote")


def _free_pair() -> int:
    """A port P with P and P + 1 free (swtpm's command and control ports)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two consecutive free ports")


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"swtpm exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("swtpm did not listen within 10 s")


@pytest.fixture
def start_swtpm(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Start a fresh swtpm (its own state directory) and return its TCTI string."""
    if SWTPM is None or TOOLS is None:
        pytest.skip("swtpm and tpm2-tools are not installed (scripts/bootstrap installs them)")
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> str:
        state = tmp_path / f"swtpm-{name}"
        state.mkdir()
        port = _free_pair()
        process = subprocess.Popen(
            [
                SWTPM,
                *("socket", "--tpm2", "--flags", "not-need-init,startup-clear"),
                *("--tpmstate", f"dir={state}"),
                *("--server", f"type=tcp,port={port},bindaddr=127.0.0.1"),
                *("--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(process)
        _wait_listening(port, process)
        return f"swtpm:host=127.0.0.1,port={port}"

    try:
        yield start
    finally:
        for process in started:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def tcti(start_swtpm: Callable[[str], str]) -> str:
    return start_swtpm("site")


@pytest.fixture
def coordinator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    monkeypatch.setenv("INSITU_PASSPHRASE", "attestation-tests")
    ws, _ = Workspace.init(tmp_path / "coordinator")
    return ws


def snapshot(tmp_path: Path, name: str = "release") -> Path:
    """A frozen copy of the running insitu package (the tree under test may be edited
    while a test runs); returns the directory to put on ``PYTHONPATH``."""
    from insitu.attestation import package_dir

    parent = tmp_path / name
    shutil.copytree(package_dir(), parent / "insitu", ignore=shutil.ignore_patterns("__pycache__"))
    return parent


def modified_build(tmp_path: Path, source: Path | None = None) -> Path:
    """A copy of insitu (of ``source``, a snapshot, or the running package) with one byte
    added; returns the directory to put on ``PYTHONPATH``."""
    from insitu.attestation import package_dir

    parent = tmp_path / "modified"
    tree = parent / "insitu"
    origin = source / "insitu" if source is not None else package_dir()
    shutil.copytree(origin, tree, ignore=shutil.ignore_patterns("__pycache__"))
    target = tree / "_clock.py"
    target.write_bytes(target.read_bytes() + b"#")  # one byte more: a comment, same code
    return parent
