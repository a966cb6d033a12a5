"""Deployment on Flower's SuperLink / SuperNode: TLS, SuperNode auth, clean failures.

The federation test runs the real thing: ``insitu federate server`` and three
``insitu federate site`` as separate processes on loopback, each starting Flower's own
processes (SuperLink, SuperNodes, SuperExec, ServerApp, ClientApps). One of the sites
keeps its node signing key in a SoftHSM2 token (``insitu init --key-uri``): its
ClientApps, fresh processes Flower starts per message, sign its ledger there. The
failure tests need no federation and are quick.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from insitu.cli import run
from insitu.data import read_table
from insitu.datasets import builtin_data
from insitu.errors import CertificateError, ServerUnreachableError
from insitu.federated import probe_server
from insitu.federated._certs import check_server_pair, make_certs
from insitu.workspace import PIN_ENV, Workspace
from tests.workspace.test_pkcs11 import MODULE, PIN, softhsm_store

from .test_attack_control_plane import attack_control_plane

INSITU = str(Path(sys.executable).parent / "insitu")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_error_line(err: str) -> str:
    """The command's error: exactly one line, ``error: ...``, and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- certificates


def test_certs_verify_and_private_keys_are_0600(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "c", sites=["a", "b"])
    check_server_pair(certs.ca, certs.server_cert, certs.server_key, host="127.0.0.1")
    check_server_pair(certs.ca, certs.server_cert, certs.server_key, host="localhost")
    for private in (certs.ca_key, certs.server_key, certs.site_key("a"), certs.site_key("b")):
        assert private.stat().st_mode & 0o777 == 0o600
    assert certs.site_public("a").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_server_certificate_that_does_not_match_is_named(tmp_path: Path) -> None:
    ours = make_certs(tmp_path / "ours", sites=["a"])
    theirs = make_certs(tmp_path / "theirs", sites=["a"])
    with pytest.raises(CertificateError, match="does not match the certificate"):
        check_server_pair(ours.ca, ours.server_cert, theirs.server_key, host="127.0.0.1")
    with pytest.raises(CertificateError, match="is not signed by the CA"):
        check_server_pair(theirs.ca, ours.server_cert, ours.server_key, host="127.0.0.1")
    with pytest.raises(CertificateError, match=r"does not name 10\.0\.0\.7"):
        check_server_pair(ours.ca, ours.server_cert, ours.server_key, host="10.0.0.7")


def test_certs_command_refuses_to_overwrite_a_federation(tmp_path: Path, capsys) -> None:
    args = ["federate", "certs", "--out", str(tmp_path / "c"), "--site", "a", "--json"]
    assert run(args) == 0
    ca = (tmp_path / "c" / "ca.pem").read_bytes()
    assert run(args) == 2
    assert "exists already" in capsys.readouterr().err
    assert (tmp_path / "c" / "ca.pem").read_bytes() == ca


def test_server_with_a_key_that_does_not_match_exits_1_before_starting(
    tmp_path: Path, schema_file: Path, capsys
) -> None:
    ours = make_certs(tmp_path / "ours", sites=["a", "b", "c"])
    theirs = make_certs(tmp_path / "theirs", sites=["x"])
    ours.server_key.write_bytes(theirs.server_key.read_bytes())
    ws, _ = Workspace.init(tmp_path / "srv", name="srv")
    code = run(
        [
            "federate",
            "server",
            "--home",
            str(ws.home),
            "-s",
            str(schema_file),
            "--certs",
            str(ours.directory),
            "--address",
            f"127.0.0.1:{free_port()}",
        ]
    )
    err = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert "does not match the certificate" in err
    assert not (ws.home / "federation").exists()  # nothing written, nothing started


# --------------------------------------------------------------------------- site checks


def test_probe_backs_off_exponentially_then_names_the_address(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "c", sites=["a"])
    address = f"127.0.0.1:{free_port()}"
    delays: list[float] = []
    with pytest.raises(ServerUnreachableError, match=f"at {address} after 7 attempts"):
        probe_server(address, certs.ca, retries=6, sleep=delays.append)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]


def test_site_that_cannot_reach_the_server_exits_1_and_writes_nothing(
    tmp_path: Path, schema_file: Path, capsys
) -> None:
    certs = make_certs(tmp_path / "c", sites=["a"])
    data = tmp_path / "a.csv"
    read_table(builtin_data("adult")).head(50).to_csv(data, index=False)
    address = f"127.0.0.1:{free_port()}"
    home = tmp_path / "site-a"
    code = run(
        [
            "federate",
            "site",
            "--home",
            str(home),
            "--data",
            str(data),
            "-s",
            str(schema_file),
            "--ca",
            str(certs.ca),
            "--key",
            str(certs.site_key("a")),
            "--server",
            address,
            "--retries",
            "2",
        ]
    )
    err = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert f"cannot reach the federation server at {address} after 3 attempts" in err
    assert not home.exists()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A TLS listener presenting a federation's server certificate (not a SuperLink)."""
    certs = make_certs(tmp_path / "served", sites=["a"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}", certs.ca
    stop.set()
    thread.join()
    listener.close()


def test_a_server_certificate_from_another_ca_is_refused_at_once(
    tmp_path: Path, schema_file: Path, tls_server: tuple[str, Path], capsys
) -> None:
    address, right_ca = tls_server
    probe_server(address, right_ca, retries=0)  # control: the right CA verifies
    other = make_certs(tmp_path / "other", sites=["a"])
    data = tmp_path / "a.csv"
    read_table(builtin_data("adult")).head(50).to_csv(data, index=False)
    home = tmp_path / "site-a"
    started = time.monotonic()
    code = run(
        [
            "federate",
            "site",
            "--home",
            str(home),
            "--data",
            str(data),
            "-s",
            str(schema_file),
            "--ca",
            str(other.ca),
            "--key",
            str(other.site_key("a")),
            "--server",
            address,
        ]
    )
    err = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert f"the server at {address} presented a certificate that" in err
    assert time.monotonic() - started < 5  # not retried
    assert not home.exists()


# --------------------------------------------------------------------------- the app


@pytest.mark.parametrize(
    ("privacy", "secure", "expected"),
    [
        ("record", True, ["secaggplus", "app"]),
        ("site", True, ["secaggplus", "clipping", "app"]),
        ("site", False, ["clipping", "app"]),
        ("none", False, ["app"]),
    ],
)
def test_the_client_mods_follow_the_runs_settings(
    monkeypatch: pytest.MonkeyPatch, privacy: str, secure: bool, expected: list[str]
) -> None:
    from flwr.common import Context, RecordDict

    import insitu._flower_app as flower_app

    calls: list[str] = []

    def recording(name: str):
        def mod(msg, context, call_next):
            calls.append(name)
            return call_next(msg, context)

        return mod

    monkeypatch.setattr(flower_app, "secaggplus_mod", recording("secaggplus"))
    monkeypatch.setattr(flower_app, "fixedclipping_mod", recording("clipping"))
    run_config = {
        "insitu": json.dumps({"config": {"privacy": privacy, "secure_aggregation": secure}})
    }
    context = Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config
    )
    flower_app._privacy_mods("msg", context, lambda m, c: calls.append("app") or m)
    assert calls == expected


def test_sites_receive_the_runs_settings_but_not_the_servers_paths(tmp_path: Path) -> None:
    from insitu.federated import FederationConfig
    from insitu.federated._plan import RunPlan, SharedPlan

    shared = SharedPlan(
        run_id="r",
        config=FederationConfig(sites=3),
        dataset="d",
        schema_sha256="0" * 64,
        n_features=3,
        site_noise_multiplier=0.0,
    )
    plan = RunPlan(
        shared=shared,
        home=Path("/srv/insitu"),
        run_dir=Path("/srv/insitu/federation/runs/r"),
        feature_names=("a", "b", "c"),
        schema_source={"source": "/srv/schema.toml"},
        sites_registered=("a",),
    )
    assert "/srv" not in plan.shared.dumps()
    assert SharedPlan.loads(plan.shared.dumps()) == shared
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_json()))
    assert RunPlan.read(tmp_path) == plan


def test_a_plan_from_another_insitu_is_refused_with_the_field_named() -> None:
    from insitu.errors import FederationError
    from insitu.federated._plan import SharedPlan

    with pytest.raises(FederationError, match="version None"):
        SharedPlan.loads(json.dumps({"run_id": "r"}))
    with pytest.raises(FederationError, match="has no 'config'"):
        SharedPlan.loads(json.dumps({"version": 1, "run_id": "r"}))
    with pytest.raises(FederationError, match="'n_features' is str"):
        SharedPlan.loads(
            json.dumps(
                {
                    "version": 1,
                    "run_id": "r",
                    "config": {},
                    "dataset": "d",
                    "schema_sha256": "0",
                    "n_features": "3",
                    "site_noise_multiplier": 0.0,
                }
            )
        )


# --------------------------------------------------------------------------- a federation


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = str(fd.readlink())
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _non_loopback_endpoints(pids: set[int]) -> set[str]:
    """Local or remote TCP endpoints of ``pids`` that are not loopback (or unbound)."""
    inodes = set().union(*(_socket_inodes(p) for p in pids)) if pids else set()
    bad = set()
    for table, loopback in (
        ("/proc/net/tcp", ("0100007F",)),
        (
            "/proc/net/tcp6",
            ("00000000000000000000000001000000", "0000000000000000FFFF00000100007F"),
        ),
    ):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] not in inodes:
                continue
            for endpoint in (fields[1], fields[2]):
                address = endpoint.split(":")[0]
                if set(address) == {"0"}:
                    if endpoint is fields[1]:
                        bad.add(f"listening on all interfaces: {line}")
                    continue
                if address not in loopback:
                    bad.add(endpoint)
    return bad


def _gateway_up(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def _operator_lists_runs(pids: set[int]) -> list[str]:
    """The operator's side: the SuperLink's loopback port answers the Control API.

    (The control experiment of the attack: the same client that the public port refuses
    does work where the operator stands, so a refusal is not a broken client.)
    """
    from flwr.proto.control_pb2 import ListRunsRequest
    from flwr.supercore.control import ControlHttpClient

    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            cwd = Path(f"/proc/{pid}/cwd").readlink()
        except OSError:
            continue
        if not any(a.endswith("flower-superlink") for a in argv[:2]) or "--port" not in argv:
            continue
        loopback = f"{argv[argv.index('--host') + 1]}:{argv[argv.index('--port') + 1]}"
        client = ControlHttpClient.from_server_address(
            server_address=loopback,
            insecure=False,
            root_certificates=(cwd / "loopback" / "ca.pem").read_bytes(),
            interceptors=[],
        )
        try:
            client.ListRuns(ListRunsRequest())
        finally:
            client.close()
        return ["ListRuns"]
    return []


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_flowers_processes_get_the_token_configuration_and_pin_of_the_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from insitu.federated._processes import child_env

    token = {
        "SOFTHSM2_CONF": "/etc/softhsm/site.conf",
        "TPM2_PKCS11_TCTI": "swtpm:port=2321",
        "TPM2_PKCS11_STORE": "/var/lib/site/tpm2-pkcs11",
        PIN_ENV: PIN,
    }
    for name, value in token.items():
        monkeypatch.setenv(name, value)
    env = child_env(tmp_path / "flwr")
    # Each ClientApp is a process of its own: it signs the site's ledger in the token.
    assert {name: env.get(name) for name in token} == token
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"


#: The site whose node signing key is in a SoftHSM2 token of its own.
IN_TOKEN = "hospital-a"


def _init_in_token(home: Path, root: Path, env: dict[str, str]) -> dict[str, str]:
    """``insitu init --key-uri`` at ``home`` in a new SoftHSM2 store: the site's environment.

    The store is this site's alone ("its machine"); the site process gets the store's
    configuration and the PIN in its environment, as an operator would set them.
    """
    store = softhsm_store(root, label=IN_TOKEN)
    site_env = dict(env, SOFTHSM2_CONF=store["SOFTHSM2_CONF"], **{PIN_ENV: PIN})
    uri = f"pkcs11:token={IN_TOKEN};object=node"
    made = subprocess.run(
        [INSITU, "init", "--home", str(home), "--name", IN_TOKEN, "--key-uri", uri,
         "--pkcs11-module", MODULE],
        capture_output=True, env=site_env, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr.decode()
    return site_env


def _files_holding(home: Path, needle: bytes) -> list[str]:
    """Every file under ``home`` whose bytes hold ``needle``."""
    return [
        str(path.relative_to(home))
        for path in sorted(home.rglob("*"))
        if path.is_file() and needle in path.read_bytes()
    ]


@pytest.mark.slow
def test_server_and_three_sites_over_tls_complete_two_rounds_and_an_unknown_key_is_refused(
    tmp_path: Path, schema_file: Path
) -> None:
    certs = make_certs(tmp_path / "certs", sites=["hospital-a", "hospital-b", "hospital-c"])
    strangers = make_certs(tmp_path / "strangers", sites=["rogue"])
    frame = read_table(builtin_data("adult"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    Workspace.init(tmp_path / "server", name="server")
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="1")  # insitu must force it off anyway
    server = subprocess.Popen(
        [
            INSITU,
            "federate",
            "server",
            "--home",
            str(tmp_path / "server"),
            "-s",
            str(schema_file),
            "--certs",
            str(certs.directory),
            "--address",
            address,
            "--sites",
            "3",
            "--rounds",
            "2",
            "--privacy",
            "record",
            "--epsilon",
            "3",
            "--timeout",
            "600",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    token_env = _init_in_token(tmp_path / IN_TOKEN, tmp_path / "hsm", env)
    try:
        names = ["hospital-a", "hospital-b", "hospital-c", "rogue"]
        for index, name in enumerate(names):
            data = tmp_path / f"{name}.csv"
            frame.iloc[index * 3000 : (index + 1) * 3000].to_csv(data, index=False)
            key = (strangers if name == "rogue" else certs).site_key(name)
            procs[name] = subprocess.Popen(
                [
                    INSITU,
                    "federate",
                    "site",
                    "--home",
                    str(tmp_path / name),
                    "--data",
                    str(data),
                    "-s",
                    str(schema_file),
                    "--ca",
                    str(certs.ca),
                    "--key",
                    str(key),
                    "--server",
                    address,
                    "--retries",
                    "6",
                    "--once",
                    "--json",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=token_env if name == IN_TOKEN else env,
            )
        checked_env = False
        endpoints: set[str] = set()
        attacks: dict[str, list[str]] = {}
        deadline = time.monotonic() + 600
        while server.poll() is None and time.monotonic() < deadline:
            flower = _descendants(os.getpid()) - {server.pid, *(p.pid for p in procs.values())}
            endpoints |= _non_loopback_endpoints(flower | {server.pid})
            if not attacks and _gateway_up(address):
                # While the run goes on: the operator's routes are closed on the public
                # port to an outsider with ca.pem and to a registered site's key alike.
                attacks["outsider"] = attack_control_plane(address, certs.ca, None)
                attacks["site"] = attack_control_plane(
                    address, certs.ca, certs.site_key("hospital-a")
                )
                attacks["operator"] = _operator_lists_runs(flower)
            for pid in flower:
                try:
                    environ = _environ(pid)
                except OSError:  # gone already
                    continue
                if "FLWR_HOME" in environ:  # a Flower process insitu started
                    assert environ["FLWR_TELEMETRY_ENABLED"] == "0"
                    assert environ["FLWR_DISABLE_UPDATE_CHECK"] == "1"
                    checked_env = True
            time.sleep(1)
        out, err = server.communicate(timeout=30)
        assert server.returncode == 0, err.decode()[-3000:]
        results = {name: p.communicate(timeout=60) for name, p in procs.items()}
    finally:
        for process in (server, *procs.values()):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)

    assert checked_env
    assert not endpoints, endpoints
    assert attacks == {"outsider": [], "site": [], "operator": ["ListRuns"]}, attacks

    # The server: two rounds with three sites, through SecAgg+ (one aggregate seen).
    result = json.loads(out)
    assert [r["sites_ok"] for r in result["rounds"]] == [3, 3]
    for record in result["rounds"]:
        assert len(set(record["seen_by_strategy"])) == 1
        assert all(0 < eps <= 3.0 for eps in record["epsilon_by_site"].values())
    # Sites evaluate only at the final round, under DP; each round says what it covers.
    first, last = result["rounds"]
    assert (first["accuracy"], first["sites_evaluated"]) == (None, 0)
    # No final evaluation is lost: sites keep their SuperNode up until the server says
    # the run finished (issue 15: a site that stopped first lost its reply).
    assert last["sites_evaluated"] == 3
    assert last["accuracy"] > 0.6
    assert (Path(result["model_dir"]) / "model.onnx").exists()
    with Workspace.open(tmp_path / "server").ledger() as ledger:
        kinds = [e.type for e in ledger.entries() if e.type.startswith("federation.")]
        assert kinds == [
            "federation.sites_registered",
            "federation.started",
            "federation.round",
            "federation.checkpointed",
            "federation.round",
            "federation.checkpointed",
            "federation.completed",
        ]
        (groups,) = ledger.entries(event_type="evaluation.groups")
        assert groups.payload["sites"] == ["hospital-a", "hospital-b", "hospital-c"]
        assert groups.payload["attributes"] == ["sex", "race"]
        ledger.verify()

    # Each registered site: its own ledger, its own budget charged twice.
    for name in ("hospital-a", "hospital-b", "hospital-c"):
        site_out, site_err = results[name]
        assert procs[name].returncode == 0, site_err.decode()[-2000:]
        assert json.loads(site_out)["runs"] == [result["run_id"]]
        with Workspace.open(tmp_path / name).ledger() as ledger:
            spent = [e.payload["mechanism"] for e in ledger.entries(event_type="privacy.spent")]
            # The final evaluation, and its counts per group of persons (the schema's
            # [groups]), each a release of its own.
            assert spent == ["dp-sgd", "dp-sgd", "evaluation", "evaluation-groups"]
            assert len(ledger.entries(event_type="federation.site_round")) == 2
            assert len(ledger.entries(event_type="federation.site_joined")) == 1
            assert len(ledger.entries(event_type="federation.site_left")) == 1
            # What each reply carried out of the site, recorded by the site process.
            assert ledger.entries(event_type="federation.egress")
            ledger.verify()

    # The site whose key is in its token: every entry above was signed there, by its
    # ClientApps (site rounds, budget) and by its site process (egress), and verifies
    # against the token key's public half (the command needs no token). Nothing under
    # its home could sign: no signing.key, no PEM private key in any file.
    with Workspace.open(tmp_path / IN_TOKEN).ledger() as ledger:
        (init,) = ledger.entries(event_type="workspace.init")
        assert init.payload["signing_key_store"] == "pkcs11"
    verified = subprocess.run(
        [INSITU, "audit", "verify", "--home", str(tmp_path / IN_TOKEN)],
        capture_output=True, env=env, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr.decode()
    assert not (tmp_path / IN_TOKEN / "keys" / "signing.key").exists()
    assert _files_holding(tmp_path / IN_TOKEN, b"PRIVATE KEY") == []
    # The PIN went to the site's processes through their environment only: into no file
    # of the site (Flower's logs included).
    assert _files_holding(tmp_path / IN_TOKEN, PIN.encode()) == []

    # The stranger's key was never registered: refused, one line, exit 1.
    rogue_err = results["rogue"][1].decode()
    assert procs["rogue"].returncode == 1
    assert "refused this site" in rogue_err
    assert "is not registered" in rogue_err
    with Workspace.open(tmp_path / "rogue").ledger() as ledger:
        assert not ledger.entries(event_type="privacy.spent")
