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


def provision_ek(state: Path, ca: Path) -> None:
    """Manufacture a TPM state as a vendor would: an RSA EK at 0x81010001 and its
    certificate in NV 0x01C00002, issued by swtpm-localca's CA kept under ``ca``
    (created on first use: ``ca/swtpm-localca-rootca-cert.pem`` and ``issuercert.pem``)."""
    if shutil.which("swtpm_setup") is None or shutil.which("swtpm_localca") is None:
        pytest.skip("swtpm_setup and swtpm_localca are not installed (package swtpm-tools)")
    ca.mkdir(exist_ok=True)
    config = ca / "localca.conf"
    config.write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
        f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n"
    )
    setup = ca / "swtpm_setup.conf"
    setup.write_text(
        "create_certs_tool = swtpm_localca\n"
        f"create_certs_tool_config = {config}\n"
        "active_pcr_banks = sha256\n"
    )
    subprocess.run(
        [
            *("swtpm_setup", "--tpm2", "--tpmstate", str(state), "--config", str(setup)),
            *("--create-ek-cert", "--overwrite"),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture
def start_swtpm(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start a fresh swtpm (its own state directory) and return its TCTI string; with
    ``ek_ca``, its state is first manufactured with an EK certificate (:func:`provision_ek`)."""
    if SWTPM is None or TOOLS is None:
        pytest.skip("swtpm and tpm2-tools are not installed (scripts/bootstrap installs them)")
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, *, ek_ca: Path | None = None) -> str:
        state = tmp_path / f"swtpm-{name}"
        state.mkdir()
        if ek_ca is not None:
            provision_ek(state, ek_ca)
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
