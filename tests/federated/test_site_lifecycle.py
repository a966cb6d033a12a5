"""A deployed site's life without a federation: the server's word, its processes, its spool.

A stand-in for the server's gateway (TLS with the federation's server certificate, on
loopback) answers the run status route sites poll and, for the tests that start Flower's
real SuperNode, a Fleet API that refuses the site's key as Flower's SuperLink does (HTTP
412, code 2004) or holds the SuperNode's calls. Where the SuperNode's work is not the
point, a fake one (a child process that spools an egress entry and marks the run done, as
the ClientApp does) stands in for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from insitu.audit import events
from insitu.data import DataSchema, read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.errors import (
    CertificateError,
    FederationError,
    ServerUnreachableError,
    SiteRefusedError,
)
from insitu.federated import _supernode as supernode
from insitu.federated import join
from insitu.federated._certs import FederationCerts, make_certs
from insitu.federated._egress import EgressSite, EgressSpool, egress_mod, spool_dir, spool_entry
from insitu.federated._processes import child_env, flower_bin, spawn, stop
from insitu.federated._status import ServerWatch
from insitu.workspace import Workspace

INSITU = str(Path(sys.executable).parent / "insitu")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- a server


class FakeGateway:
    """The server's gateway as a site sees it (see the module docstring).

    ``states[run]`` is served in turn, the last one repeated; ``fleet`` is ``refuse``
    (Flower's answer to a key it will not activate) or ``hold`` (calls wait until the
    gateway stops).
    """

    def __init__(self, certs: FederationCerts, *, fleet: str = "refuse") -> None:
        self.states: dict[str, list[str]] = {}
        self.served: list[tuple[str, str]] = []
        self.fleet = fleet
        self.stop_after: int | None = None
        self.released = threading.Event()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs.server_cert, certs.server_key)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.gateway = self  # type: ignore[attr-defined]
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        self._stopped = False

    def state_of(self, run: str) -> str | None:
        queue = self.states.get(run)
        if not queue:
            return None
        state = queue.pop(0) if len(queue) > 1 else queue[0]
        self.served.append((run, state))
        if self.stop_after is not None and len(self.served) >= self.stop_after:
            threading.Thread(target=self.stop).start()  # gone, as a server that stopped
        return state

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: dict[str, Any] | bytes) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        gateway: FakeGateway = self.server.gateway  # type: ignore[attr-defined]
        prefix = "/insitu/v1/runs/"
        if not self.path.startswith(prefix):
            self._answer(404, b"<html>not found</html>")
            return
        run = unquote(self.path[len(prefix) :])
        state = gateway.state_of(run)
        if state is None:
            self._answer(404, {"error": f"this server has no run {run!r}"})
        else:
            self._answer(200, {"run": run, "state": state})

    def do_POST(self) -> None:
        gateway: FakeGateway = self.server.gateway  # type: ignore[attr-defined]
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if gateway.fleet == "hold":
            gateway.released.wait(120)
            self._answer(503, {"error": "stopping"})
            return
        self._answer(412, {"code": 2004, "detail": "Failed to activate SuperNode."})


@pytest.fixture
def certs(tmp_path: Path) -> FederationCerts:
    return make_certs(tmp_path / "certs", sites=["site-a"])


@pytest.fixture
def gateway(certs: FederationCerts) -> Iterator[FakeGateway]:
    server = FakeGateway(certs)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _private_lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's site locks in a directory of its own (not the user's)."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))


# --------------------------------------------------------------------------- the poll


def test_a_site_polls_until_the_server_says_the_run_finished(
    certs: FederationCerts, gateway: FakeGateway
) -> None:
    gateway.states["run-1"] = ["running", "running", "finished"]
    turns: list[int] = []
    watch = ServerWatch(gateway.address, certs.ca, interval=0.01)
    assert watch.wait_for_end("run-1", between=lambda: turns.append(1)) == "finished"
    assert gateway.served == [("run-1", "running"), ("run-1", "running"), ("run-1", "finished")]
    assert len(turns) == 3  # the site's own work (its spool) runs before every poll


def test_a_server_gone_for_good_is_given_up_after_a_capped_exponential_backoff(
    certs: FederationCerts,
) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens: refused at every attempt
    now, delays = [0.0], []

    def sleep(seconds: float) -> None:
        delays.append(seconds)
        now[0] += seconds

    watch = ServerWatch(address, certs.ca, give_up_after=20, sleep=sleep, clock=lambda: now[0])
    with pytest.raises(
        ServerUnreachableError,
        match=rf"server at {address} has not answered for 20 s \(7 attempts; last: .+\); "
        "this site stopped its SuperNode",
    ):
        watch.wait_for_end("run-1")
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 4.5]  # doubling, capped, ending on time


def test_a_server_that_stops_answering_mid_run_is_given_up(
    certs: FederationCerts, gateway: FakeGateway
) -> None:
    gateway.states["run-1"] = ["running"]
    gateway.stop_after = 2
    watch = ServerWatch(gateway.address, certs.ca, interval=0.01, give_up_after=1.0)
    with pytest.raises(ServerUnreachableError, match=f"at {gateway.address} has not answered"):
        watch.wait_for_end("run-1")
    assert gateway.served == [("run-1", "running")] * 2


def test_a_run_the_server_does_not_know_is_a_clear_error_at_once(
    certs: FederationCerts, gateway: FakeGateway
) -> None:
    watch = ServerWatch(gateway.address, certs.ca, sleep=pytest.fail)
    with pytest.raises(FederationError, match=r"does not know run run-9 .*start the site again"):
        watch.wait_for_end("run-9")


def test_a_server_without_the_status_route_is_named_as_such(
    certs: FederationCerts, gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    import insitu.federated._status as status

    monkeypatch.setattr(status, "STATUS_PATH", "/flower/v1/runs/")  # a 404 that is not JSON
    watch = ServerWatch(gateway.address, certs.ca)
    with pytest.raises(FederationError, match="has no run status endpoint"):
        watch.poll("run-1")


def test_attack_a_server_certificate_from_another_ca_is_refused_not_polled(
    tmp_path: Path, gateway: FakeGateway
) -> None:
    other = make_certs(tmp_path / "other", sites=["site-a"])
    watch = ServerWatch(gateway.address, other.ca, sleep=pytest.fail)
    with pytest.raises(CertificateError, match="presented a certificate that"):
        watch.poll("run-1")
    with pytest.raises(CertificateError, match="presented a certificate that"):
        watch.poll(None)  # before a run is known: the handshake alone
    assert gateway.served == []


# --------------------------------------------------------------------------- processes


def _state(pid: int) -> str | None:
    """A process's state letter (``Z`` a zombie: it runs nothing), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _running(pid: int) -> bool:
    return _state(pid) not in (None, "Z")


def _wait_until(predicate: Any, limit: float = 60.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(stat.parent.name))
    return found


_SITE = """\
import os, subprocess, sys, time
from pathlib import Path
from insitu.federated._processes import spawn
command = sys.argv[3:]
log, cwd = Path(sys.argv[1]), Path.cwd()
if sys.argv[2] == "spawn":
    child = spawn(command, log_path=log, env=dict(os.environ), cwd=cwd)
else:  # the control: a session of its own, no parent-death signal
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def _site_with_child(tmp_path: Path, how: str, command: list[str]) -> tuple[Any, int]:
    site = subprocess.Popen(
        [sys.executable, "-c", _SITE, str(tmp_path / "child.log"), how, *command],
        stdout=subprocess.PIPE,
        cwd=tmp_path,
    )
    assert site.stdout is not None
    return site, int(site.stdout.readline())


@pytest.mark.parametrize("how", ["spawn", "plain"])
def test_a_site_process_killed_with_sigkill_takes_its_supernode_with_it(
    tmp_path: Path, how: str
) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    site, child = _site_with_child(tmp_path, how, sleeper)
    try:
        assert _running(child)
        site.kill()  # no finally runs: only the kernel can stop the child now
        site.wait()
        site.stdout.close()
        if how == "spawn":
            assert _wait_until(lambda: not _running(child)), "an orphan kept running"
        else:  # the control: without the parent-death signal the child lives on
            time.sleep(0.5)
            assert _running(child)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


@pytest.mark.slow
def test_flowers_own_children_die_with_a_supernode_whose_site_was_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real chain: SuperNode (parent-death signal), then its SuperExec (--parent-pid).

    Flower starts each ClientApp from the SuperExec with ``--parent-pid`` as well: the
    same watch, one level down.
    """
    command = [
        flower_bin("flower-supernode"),
        "--superlink",
        f"127.0.0.1:{free_port()}",  # nothing there: it keeps retrying, with its SuperExec up
        "--insecure",
        "--max-retries",
        "1000",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
    ]
    for name, value in child_env(tmp_path / "flwr").items():
        monkeypatch.setenv(name, value)  # what the site gives its SuperNode
    site, node = _site_with_child(tmp_path, "spawn", command)
    superexec: set[int] = set()
    try:
        assert _wait_until(lambda: bool(superexec.update(_children(node)) or superexec))
        site.kill()
        site.wait()
        site.stdout.close()
        assert _wait_until(lambda: not any(_running(p) for p in {node, *superexec})), [
            (p, _state(p)) for p in {node, *superexec}
        ]
    finally:
        for pid in (node, *superexec):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_stopping_a_supernode_stops_what_it_started(tmp_path: Path) -> None:
    parent = textwrap.dedent(
        """\
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(child.pid, flush=True)
        time.sleep(600)
        """
    )
    log = tmp_path / "node.log"
    process = spawn(
        [sys.executable, "-c", parent], log_path=log, env=dict(os.environ), cwd=tmp_path
    )
    assert _wait_until(lambda: log.read_text().strip() != "")
    grandchild = int(log.read_text())
    stop(process, grace=5)
    assert process.returncode == -signal.SIGTERM
    assert _wait_until(lambda: not _running(grandchild))


# --------------------------------------------------------------------------- the spool


def _payload(run: str = "run-1", **extra: Any) -> dict[str, Any]:
    return {
        "run": run,
        "site": "site-a",
        "round": 1,
        "message": "train",
        "stage": "collect_masked_vectors",
        "bytes_in": 100,
        "bytes_out": 900,
        "metrics_sent": {"fitres.metrics.loss": 0.5},
        "model_update_bytes": 800,
        "protocol_bytes": 0,
        "metrics_bytes": 40,
        "envelope_bytes": 60,
        "unclassified_bytes": 0,
        **extra,
    }


@pytest.fixture
def site_home(tmp_path: Path) -> Path:
    ws, _ = Workspace.init(tmp_path / "site", name="site-a")
    return ws.home


def _egress(home: Path) -> list[dict[str, Any]]:
    with Workspace.open(home).ledger() as ledger:
        return [e.payload for e in ledger.entries(event_type=events.FEDERATION_EGRESS.name)]


def test_spooled_egress_is_recorded_once_then_deleted(site_home: Path) -> None:
    first = spool_entry(site_home, _payload(round=1))
    second = spool_entry(site_home, _payload(round=2))
    spool = EgressSpool(site_home)
    assert spool.ingest() == ["run-1"]
    recorded = _egress(site_home)
    assert [(p["round"], p["spool"]) for p in recorded] == [(1, first.name), (2, second.name)]
    assert list(spool_dir(site_home).iterdir()) == []
    assert spool.ingest() == []
    assert len(_egress(site_home)) == 2


def test_a_crash_between_recording_and_deleting_records_nothing_twice(site_home: Path) -> None:
    path = spool_entry(site_home, _payload())
    saved = path.read_bytes()
    EgressSpool(site_home).ingest()
    path.write_bytes(saved)  # as if the site process died after recording, before deleting
    assert EgressSpool(site_home).ingest() == []  # a new site process
    assert len(_egress(site_home)) == 1
    assert not path.exists()


def test_attack_a_planted_spool_file_is_set_aside_not_recorded(site_home: Path) -> None:
    spool_dir(site_home).mkdir(parents=True)
    planted = spool_dir(site_home) / "0-planted.json"
    planted.write_text(json.dumps(_payload(rows=[[39, "Male", "United-States"]])))
    aliased = spool_dir(site_home) / "1-aliased.json"
    aliased.write_text(json.dumps(_payload(spool="0-other.json")))
    EgressSpool(site_home).ingest()
    assert _egress(site_home) == []
    assert sorted(p.name for p in spool_dir(site_home).iterdir()) == [
        "0-planted.rejected",
        "1-aliased.rejected",
    ]


def _exchange() -> tuple[Any, Any]:
    """A training message for round 2 and a site's reply to it (Flower's own types)."""
    import numpy as np
    from flwr.app.message.message import make_message
    from flwr.app.metadata import Metadata
    from flwr.common import ArrayRecord, ConfigRecord, RecordDict

    def message(content: RecordDict) -> Any:
        metadata = Metadata(
            run_id=1,
            message_id="",
            src_node_id=7,
            dst_node_id=1,
            reply_to_message_id="m1",
            group_id="2",
            created_at=0.0,
            ttl=60.0,
            message_type="train",
        )
        return make_message(metadata, content)

    incoming = message(RecordDict({"config": ConfigRecord({"round": 2})}))
    reply = message(
        RecordDict(
            {
                "fitres.parameters": ArrayRecord([np.zeros(8, np.float32)]),
                "fitres.metrics": ConfigRecord({"loss": 0.25}),
            }
        )
    )
    return incoming, reply


def _entries(home: Path) -> int:
    with Workspace.open(home).ledger() as ledger:
        return len(ledger)


def test_a_deployed_clientapp_spools_its_reply_and_writes_no_ledger(site_home: Path) -> None:
    from flwr.common import Context, RecordDict

    from insitu.federated import FederationConfig, deployed_egress_mod
    from insitu.federated._plan import SharedPlan, SiteSetup

    shared = SharedPlan(
        run_id="run-7",
        config=FederationConfig(sites=3),
        dataset="adult",
        schema_sha256="0" * 64,
        n_features=3,
        site_noise_multiplier=0.0,
    )
    setup = SiteSetup("site-a", "adult", "0" * 64, site_home / "train", site_home / "test")
    setup_path = Workspace.layout(site_home).site_setup_path
    setup_path.parent.mkdir(exist_ok=True)
    setup_path.write_text(json.dumps(setup.to_json()))
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"insitu-home": str(site_home)},
        state=RecordDict(),
        run_config={"insitu": shared.dumps()},
    )
    incoming, reply = _exchange()
    before = _entries(site_home)
    assert deployed_egress_mod(incoming, context, lambda m, c: reply) is reply
    assert _entries(site_home) == before  # the ClientApp process wrote no ledger entry
    (spooled,) = spool_dir(site_home).iterdir()
    assert json.loads(spooled.read_text())["model_update_bytes"] > 8 * 4
    assert EgressSpool(site_home).ingest() == ["run-7"]
    (recorded,) = _egress(site_home)
    assert (recorded["site"], recorded["round"]) == ("site-a", 2)
    assert recorded["metrics_sent"] == {"fitres.metrics.loss": 0.25}


def test_a_simulated_site_still_records_its_egress_itself(site_home: Path) -> None:
    incoming, reply = _exchange()
    mod = egress_mod(lambda context: EgressSite(site_home, "run-7", "site-a"))
    assert mod(incoming, None, lambda m, c: reply) is reply
    (recorded,) = _egress(site_home)
    assert "spool" not in recorded
    assert not spool_dir(site_home).exists()


# --------------------------------------------------------------------------- a site


@pytest.fixture
def schema_file(tmp_path: Path) -> Path:
    text = builtin_schema("adult").read_text()
    text = text.replace(
        "required = true", 'required = false\nlegal_basis = "GDPR art. 6(1)(f), test"'
    )
    path = tmp_path / "adult.schema.toml"
    path.write_text(text)
    return path


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "site-a.csv"
    read_table(builtin_data("adult")).head(60).to_csv(path, index=False)
    return path


_FAKE_SUPERNODE = """\
import json, os, sys, time
from pathlib import Path
home, run, payload, mark_done = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
def put(path, text):  # as the ClientApp writes: a dot-named file, then a rename
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / ("." + path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
put(home / "federation" / "egress-spool" / f"{time.time_ns():020d}-fake.json", payload)
if mark_done == "1":
    put(home / "federation" / "done" / run, "done\\n")
print("ready", flush=True)
time.sleep(600)
"""


class FakeNodes:
    """The fake SuperNodes a test's sites started, and whether they mark run-1 done."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []
        self.mark_done = True

    def start(self, ws: Workspace, *, log_path: Path, **_: Any) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-c", _FAKE_SUPERNODE, str(ws.home.absolute()), "run-1"]
        command += [json.dumps(_payload()), "1" if self.mark_done else "0"]
        process = spawn(command, log_path=log_path, env=dict(os.environ), cwd=ws.home)
        self.started.append(process)
        return process


@pytest.fixture
def fake_supernode(monkeypatch: pytest.MonkeyPatch) -> FakeNodes:
    """Replace Flower's SuperNode with a fake that takes part in run-1 (see above)."""
    nodes = FakeNodes()
    monkeypatch.setattr(supernode, "_start_supernode", nodes.start)
    return nodes


def _join(
    tmp_path: Path,
    certs: FederationCerts,
    gateway: FakeGateway,
    data: Path,
    schema: Path,
    **kw: Any,
) -> Any:
    return join(
        tmp_path / "site",
        data,
        schema=DataSchema.load(schema),
        server=gateway.address,
        ca=certs.ca,
        key=certs.site_key("site-a"),
        retries=0,
        poll_interval=0.05,
        **kw,
    )


def _ledger_types(home: Path) -> list[str]:
    with Workspace.open(home).ledger() as ledger:
        return [e.type for e in ledger.entries(event_type="federation.")]


def test_a_site_keeps_its_supernode_up_until_the_server_ends_the_run(
    tmp_path: Path,
    certs: FederationCerts,
    gateway: FakeGateway,
    data_file: Path,
    schema_file: Path,
    fake_supernode: FakeNodes,
) -> None:
    gateway.states["run-1"] = ["running", "running", "finished"]
    result = _join(tmp_path, certs, gateway, data_file, schema_file, once=True)
    # Its part was done (marker) from the start; it stopped only once the server said so.
    assert gateway.served == [("run-1", "running")] * 2 + [("run-1", "finished")]
    assert result.runs == ("run-1",)
    (process,) = fake_supernode.started
    assert process.returncode == -signal.SIGTERM  # alive until the site stopped it
    assert _ledger_types(result.home) == [
        "federation.site_joined",
        "federation.egress",
        "federation.site_left",
    ]
    assert list(spool_dir(result.home).iterdir()) == []


def test_a_run_that_failed_at_the_server_ends_a_once_site_with_one_error(
    tmp_path: Path,
    certs: FederationCerts,
    gateway: FakeGateway,
    data_file: Path,
    schema_file: Path,
    fake_supernode: FakeNodes,
) -> None:
    gateway.states["run-1"] = ["failed"]
    with pytest.raises(FederationError, match="run run-1 failed at the server"):
        _join(tmp_path, certs, gateway, data_file, schema_file, once=True)
    assert _ledger_types(tmp_path / "site")[-1] == "federation.site_left"


def test_a_site_whose_server_is_gone_for_good_stops_its_supernode_and_says_so(
    tmp_path: Path,
    certs: FederationCerts,
    gateway: FakeGateway,
    data_file: Path,
    schema_file: Path,
    fake_supernode: FakeNodes,
) -> None:
    fake_supernode.mark_done = False  # mid-run
    gateway.states["run-1"] = ["running"]
    gateway.stop_after = 2
    with pytest.raises(ServerUnreachableError, match=f"at {gateway.address} has not answered"):
        _join(tmp_path, certs, gateway, data_file, schema_file, give_up_after=1.0)
    (process,) = fake_supernode.started
    assert process.returncode is not None
    assert _ledger_types(tmp_path / "site") == [
        "federation.site_joined",
        "federation.egress",
        "federation.site_left",
    ]


def test_a_second_site_with_the_same_key_is_told_the_key_is_in_use(
    tmp_path: Path, certs: FederationCerts
) -> None:
    key = certs.site_key("site-a")
    in_use = (
        rf"already in use by an active node: another 'insitu federate site' \(pid {os.getpid()}\)"
    )
    with supernode._one_site_per_key("sha256:ab", "127.0.0.1:9092", key):
        with (
            pytest.raises(SiteRefusedError, match=in_use),
            supernode._one_site_per_key("sha256:ab", "127.0.0.1:9092", key),
        ):
            pass
        with supernode._one_site_per_key("sha256:ab", "127.0.0.1:9093", key):
            pass  # the same key towards another server is another node
    with supernode._one_site_per_key("sha256:ab", "127.0.0.1:9092", key):
        pass  # released when the first site ended


def test_a_second_site_process_with_the_same_key_exits_1_before_writing(
    tmp_path: Path,
    certs: FederationCerts,
    gateway: FakeGateway,
    data_file: Path,
    schema_file: Path,
) -> None:
    fingerprint = supernode.key_fingerprint(supernode._load_site_key(certs.site_key("site-a")))
    with (
        supernode._one_site_per_key(fingerprint, gateway.address, certs.site_key("site-a")),
        pytest.raises(SiteRefusedError, match="is already in use by an active node"),
    ):
        _join(tmp_path, certs, gateway, data_file, schema_file)
    assert not (tmp_path / "site").exists()


def test_flowers_refusal_of_the_key_is_read_from_the_supernodes_log(tmp_path: Path) -> None:
    log = tmp_path / "supernode.log"
    log.write_text(
        "INFO :      Starting Flower SuperNode\n"
        "ERROR :     Failed to initialize the connection to the SuperLink.\n"
        "[code: 2004] Failed to activate SuperNode.\n"
    )
    assert supernode._activation_refused(log)
    log.write_text("WARNING :   Connection attempt failed, retrying in 0.74 seconds (port 2004)\n")
    assert not supernode._activation_refused(log)


@pytest.mark.slow
def test_a_site_whose_key_the_server_will_not_activate_records_a_refusal(
    tmp_path: Path,
    certs: FederationCerts,
    gateway: FakeGateway,
    data_file: Path,
    schema_file: Path,
) -> None:
    """Flower's real SuperNode, refused as Flower's SuperLink refuses (HTTP 412, 2004)."""
    with pytest.raises(
        SiteRefusedError,
        match="refused this site: its key sha256:[0-9a-f]+ .* is not registered there, or is "
        r"in use by an active node \(another 'insitu federate site' with the same key",
    ):
        _join(tmp_path, certs, gateway, data_file, schema_file, once=True)
    home = tmp_path / "site"
    assert _ledger_types(home) == ["federation.site_joined", "federation.site_refused"]
    with Workspace.open(home).ledger() as ledger:
        (refused,) = ledger.entries(event_type=events.FEDERATION_SITE_REFUSED.name)
    assert refused.payload["site"] == "site-a"
    assert "not registered, or in use by an active node" in refused.payload["reason"]


def _descendants(root: int) -> set[int]:
    found, todo = set(), [root]
    while todo:
        for child in _children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stopping_the_site_command_stops_every_process_it_started(
    tmp_path: Path,
    certs: FederationCerts,
    data_file: Path,
    schema_file: Path,
    sig: int,
    code: int,
) -> None:
    gateway = FakeGateway(certs, fleet="hold")  # the SuperNode waits on its first call
    site = subprocess.Popen(
        [
            INSITU,
            "federate",
            "site",
            "--home",
            str(tmp_path / "site"),
            "--data",
            str(data_file),
            "-s",
            str(schema_file),
            "--ca",
            str(certs.ca),
            "--key",
            str(certs.site_key("site-a")),
            "--server",
            gateway.address,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    started: dict[int, str] = {}

    def flower_up() -> bool:
        for pid in _descendants(site.pid):
            with contextlib.suppress(OSError):
                started[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
        return {"flower-supernod", "flower-superexe"} <= set(started.values())

    try:
        assert _wait_until(flower_up, 120), started  # the SuperNode and its SuperExec
        site.send_signal(sig)
        _, err = site.communicate(timeout=60)
        assert site.returncode == code, err.decode()[-2000:]
        assert _wait_until(lambda: not any(_running(p) for p in started)), [
            (p, _state(p)) for p in started
        ]
        assert _ledger_types(tmp_path / "site")[-1] == "federation.site_left"
    finally:
        if site.poll() is None:
            site.kill()
            site.communicate()
        gateway.stop()
