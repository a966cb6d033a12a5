"""``insitu serve --isolate``: the server in a network namespace with no interface up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from insitu.errors import IsolationError
from insitu.serve._isolate import check_isolated, isolation_command, network_interfaces
from tests.serve.conftest import Site


def _namespaces_allowed() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = [unshare, "--user", "--map-root-user", "--net", "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


needs_namespaces = pytest.mark.skipif(
    not _namespaces_allowed(), reason="this kernel refuses unprivileged user namespaces"
)


@pytest.fixture
def isolated_server(site: Site) -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    entry = "from insitu.cli import main; main()"
    command = [sys.executable, "-c", entry, "serve", "--isolate", "--json"]
    proc = subprocess.Popen(
        [*command, "--home", str(site.workspace.home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline()]
        while lines[-1] and lines[-1].rstrip() != "}":
            lines.append(proc.stdout.readline())
        yield proc, json.loads("".join(lines) or "{}")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@needs_namespaces
def test_the_isolated_server_answers_on_its_socket_from_another_namespace(
    site: Site, isolated_server: tuple[subprocess.Popen[str], dict[str, str]]
) -> None:
    proc, announced = isolated_server
    socket_path = str(site.workspace.home / "serve.sock")
    assert announced["serving"] == f"unix:{socket_path}"
    token = site.workspace.api_token()
    transport = httpx.HTTPTransport(uds=socket_path)
    with httpx.Client(transport=transport, base_url="http://insitu", timeout=30) as client:
        headers = {"Authorization": f"Bearer {token}"}
        answer = client.post(
            "/v1/models/mlp/predict", headers=headers, json={"inputs": [[0.5] * 8]}
        )
        refused = client.get("/v1/models")  # no token: the socket is no way around it
    assert answer.status_code == 200
    assert refused.status_code == 401
    # The server runs in a network namespace of its own, where no interface is up.
    assert Path(f"/proc/{proc.pid}/ns/net").readlink() != Path("/proc/self/ns/net").readlink()
    devices = Path(f"/proc/{proc.pid}/net/dev").read_text().splitlines()[2:]
    assert [line.split(":")[0].strip() for line in devices] == ["lo"]


def test_a_process_that_sees_an_interface_up_is_not_isolated() -> None:
    assert any(network_interfaces().values())  # this test process: loopback is up
    with pytest.raises(IsolationError, match=r"interfaces up \(.*lo"):
        check_isolated()


def test_isolation_without_unshare_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("insitu.serve._isolate.shutil.which", lambda name: None)
    with pytest.raises(IsolationError, match=r"'unshare' command \(util-linux\)"):
        isolation_command(["serve"])


def test_isolated_env_set_by_hand_is_refused(site: Site) -> None:
    entry = "from insitu.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", entry, "serve", "--isolate", "--home", str(site.workspace.home)],
        capture_output=True,
        text=True,
        env={**os.environ, "INSITU_ISOLATED": "1"},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "start the server with 'insitu serve --isolate'" in proc.stderr
