"""A deployed federation (Flower SuperLink / SuperNodes over TLS): soak, crash and resume, cost.

Every run is the real multi-process path on loopback, as tests/federated/test_deploy.py
drives it: ``insitu federate certs``, one ``insitu federate server ... --json`` and one
``insitu federate site ... --once --json`` per site, each a separate process on a free
port, each site with its own rows of the carried Adult table (the carried schema, with a
stated legal basis instead of per-record consent), a fresh workspace per run. Each part
runs its anchor and insitu side by side in one run and writes the ratio:

* ``soak``: ten consecutive clean runs at the defaults (3 sites, 3 rounds, record-level
  DP at epsilon 3, SecAgg+ on). Tally, per run and round, how many sites' results the
  server has: ``sites_ok`` (updates aggregated) on every round and ``sites_evaluated`` on
  the rounds where sites evaluate (under record-level DP only the final round), runs
  that completed, each site's exit code, wall time per run (server started to every
  process ended). The issue's requirement: every round of every run has results from
  every site. Anchor: plain Flower FedAvg deployed the same way (below), the same three
  sites and rounds, run after insitu runs 1, 4, 7 and 10; its tally and wall time beside
  insitu's.
* ``resume``: a server killed with SIGKILL once ``progress.txt`` (in
  ``<server home>/federation/runs/<id>/``) says round 2 of 4 is done, and restarted at
  once with ``--resume <id>`` and the same arguments. Measured from the kill: (a) the
  resumed server's Fleet gateway accepting a TLS handshake verified against ``ca.pem``;
  (b) the "first reply": the resumed run's first ``federation.round`` in the server's
  ledger (the round after the one ``federation.resumed`` names; ``progress.txt``'s
  rewrite is timed too, as a cross-check). Whether all 4 rounds completed. Anchors,
  from the same run: the fresh server's start to its gateway accepting TLS, and a normal
  round (the ledger's round 1 to round 2).
* ``overhead``: wall time per round of insitu (DP-SGD, SecAgg+, sealed data, consent,
  budgets, ledgers, the Fleet gateway) against plain Flower FedAvg *deployed*: a
  minimal ServerApp/ClientApp module written to a temporary directory, run with
  ``flower-superlink`` (TLS, SuperNode authentication with the same site keys, on the
  port the sites dial) and one ``flower-supernode`` per site (TLS, its key), the run
  submitted through the SuperLink's Control API. The same logistic model, the same
  local SGD (1 epoch, batch 256, learning rate 2.0; no DP), the same rows per site split
  80/20 like an insitu site, evaluation only at the final round as insitu does under
  record-level DP; heavy imports wait for the work, as in insitu's app. Per round:
  (server time from the first round's start to the last round's end) / rounds, the
  start being ``federation.started`` in insitu's ledger and the strategy's
  ``initialize_parameters`` in the plain ServerApp, the ends ``federation.round``
  entries and the plain strategy's own marks; and, without the first round (which waits
  for every site to prepare and connect), (last end - first end) / (rounds - 1). At 5
  sites (two interleaved repetitions each), and at 20 sites only if one insitu run of
  20 sites x 2 rounds finishes within 15 minutes on this machine (tried once; otherwise
  "not measured" with what was seen). The issue's goal: at most 2x at 20 sites.

    flock /tmp/insitu-pytest.lock timeout 3000 .venv/bin/python benchmarks/deploy_bench.py \\
        [soak] [resume] [overhead]

Hold the lock: two federations must never run at once on this 2-CPU machine. Writes
benchmarks/results/deploy.json (parts not run keep their previous figures). A failed
run's directory is kept under /tmp/deploy-bench-kept/ and named in the JSON.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from insitu.data import DataSchema, FeatureEncoder, read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.workspace import Workspace

OUT = Path(__file__).parent / "results" / "deploy.json"
KEPT = Path(tempfile.gettempdir()) / "deploy-bench-kept"
BIN = Path(sys.executable).parent
INSITU = str(BIN / "insitu")
#: Connection retries of a site (backoff 0.5 s doubling to 8 s: about a minute): server
#: and sites start together, and at 20 sites the server's start takes a while.
SITE_RETRIES = "10"

PLAIN_MODULE = "plain_fedavg"
PLAIN_PYPROJECT = f"""\
[project]
name = "plain-fedavg"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "deploy-bench"

[tool.flwr.app.components]
serverapp = "{PLAIN_MODULE}:server_app"
clientapp = "{PLAIN_MODULE}:client_app"

[tool.flwr.app.config]
rounds = 3
sites = 3
n-features = 1
local-epochs = 1
batch-size = 256
learning-rate = 2.0
schema = ""
timing = ""
"""

PLAIN_APP = textwrap.dedent(
    '''
    """Plain Flower FedAvg, deployed: the anchor of benchmarks/deploy_bench.py.

    The logistic model, local SGD and rows of an insitu site, without DP, SecAgg+,
    sealed data, consent, budgets or ledgers. Evaluation at the final round only (what
    insitu does under record-level DP). Heavy imports wait for the work.
    """

    import json
    import os
    import time
    from pathlib import Path

    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg


    def _split(context):
        import numpy as np

        from insitu.data import DataSchema, FeatureEncoder, read_table

        schema = DataSchema.load(str(context.run_config["schema"]))
        frame = read_table(Path(str(context.node_config["data-path"])))
        encoder = FeatureEncoder.for_schema(schema)
        x, y = encoder.encode(frame), encoder.labels(frame)
        order = np.random.default_rng(0).permutation(len(x))
        test, train = order[: int(len(x) * 0.2)], order[int(len(x) * 0.2) :]
        return (x[train], y[train]), (x[test], y[test])


    def _model(context, parameters):
        import torch

        from insitu.training import build_model, set_weights

        torch.set_num_threads(1)
        model = build_model("logistic", int(context.run_config["n-features"]))
        set_weights(model, parameters)
        return model


    class Plain(NumPyClient):
        def __init__(self, context):
            self.context = context

        def fit(self, parameters, config):
            from insitu.training import get_weights, train

            (x, y), _ = _split(self.context)
            model = _model(self.context, parameters)
            run = self.context.run_config
            train(
                model,
                x,
                y,
                epochs=int(run["local-epochs"]),
                batch_size=int(run["batch-size"]),
                learning_rate=float(run["learning-rate"]),
                event=None,
                max_grad_norm=1.0,
                seed=0,
            )
            return get_weights(model), len(x), {}

        def evaluate(self, parameters, config):
            from insitu.training import evaluate

            _, (x, y) = _split(self.context)
            loss, accuracy = evaluate(_model(self.context, parameters), x, y)
            return float(loss), len(x), {"accuracy": float(accuracy)}


    client_app = ClientApp(client_fn=lambda context: Plain(context).to_client())


    class Timed(FedAvg):
        """FedAvg that writes its own clock: start, and each round's fit and end."""

        def __init__(self, *, path, rounds, **kwargs):
            super().__init__(**kwargs)
            self.path, self.rounds = Path(path), rounds
            self.marks = {"start": None, "fit_end": [], "round_end": [], "sites_ok": []}
            self.marks["sites_evaluated"] = []

        def _save(self):
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.marks))
            os.replace(tmp, self.path)

        def initialize_parameters(self, client_manager):
            self.marks["start"] = time.time()
            return super().initialize_parameters(client_manager)

        def aggregate_fit(self, server_round, results, failures):
            aggregated = super().aggregate_fit(server_round, results, failures)
            self.marks["fit_end"].append(time.time())
            self.marks["sites_ok"].append(len(results))
            return aggregated

        def configure_evaluate(self, server_round, parameters, client_manager):
            if server_round < self.rounds:
                self.marks["sites_evaluated"].append(0)
                self.marks["round_end"].append(time.time())
                self._save()
                return []
            return super().configure_evaluate(server_round, parameters, client_manager)

        def aggregate_evaluate(self, server_round, results, failures):
            aggregated = super().aggregate_evaluate(server_round, results, failures)
            self.marks["sites_evaluated"].append(len(results))
            self.marks["round_end"].append(time.time())
            self._save()
            return aggregated


    def _server_fn(context: Context):
        from insitu.training import build_model, get_weights

        run = context.run_config
        sites, rounds = int(run["sites"]), int(run["rounds"])
        model = build_model("logistic", int(run["n-features"]))
        strategy = Timed(
            path=str(run["timing"]),
            rounds=rounds,
            fraction_fit=1.0,
            fraction_evaluate=1.0,
            min_fit_clients=sites,
            min_evaluate_clients=sites,
            min_available_clients=sites,
            initial_parameters=ndarrays_to_parameters(get_weights(model)),
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))


    server_app = ServerApp(server_fn=_server_fn)
    '''
).lstrip()


# --------------------------------------------------------------------------- small tools


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tls_up(address: str, ca: Path) -> bool:
    """Whether ``address`` completes a TLS handshake verified against ``ca``."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection((host, int(port)), timeout=1) as sock,
            context.wrap_socket(sock, server_hostname=host),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False


def epoch(iso: str) -> float:
    """A ledger time (ISO 8601 UTC with a ``Z``) as seconds since the epoch."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _pdeathsig() -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGTERM when this process dies (Linux)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def start(
    command: list[str], *, out: Path, err: Path, group: bool = False, **kw: Any
) -> subprocess.Popen[bytes]:
    """A process writing to files (never a pipe nobody reads), dying with this one.

    ``group``: in a session of its own, stopped as a group (Flower's processes start
    their own children).
    """
    with out.open("wb") as stdout, err.open("wb") as stderr:
        return subprocess.Popen(
            command,
            stdout=stdout,
            stderr=stderr,
            start_new_session=group,
            preexec_fn=_pdeathsig(),  # noqa: PLW1509 -- no threads of ours run here
            **kw,
        )


def finish(process: subprocess.Popen[bytes], *, group: bool = False) -> None:
    """Stop a process this benchmark started (by its id; its group if it has one)."""
    if process.poll() is None:
        if group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    if group:  # whatever the group leader left behind
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


# --------------------------------------------------------------------------- a federation


@dataclass
class Federation:
    """Certificates, schema and one CSV per site, shared by the runs of one part."""

    root: Path
    sites: list[str]
    schema: Path
    certs: Path
    data: dict[str, Path]

    @property
    def ca(self) -> Path:
        return self.certs / "ca.pem"

    def key(self, site: str) -> Path:
        return self.certs / "sites" / f"{site}.key"

    @property
    def n_features(self) -> int:
        return len(FeatureEncoder.for_schema(DataSchema.load(self.schema)).names)


def make_federation(root: Path, sites: int, rows_per_site: int) -> Federation:
    """``insitu federate certs`` for ``sites`` sites, the schema, each site's rows."""
    root.mkdir(parents=True)
    names = [f"site-{i:02d}" for i in range(sites)]
    certs = root / "certs"
    subprocess.run(
        [INSITU, "federate", "certs", "--out", str(certs), "--json"]
        + [arg for name in names for arg in ("--site", name)],
        check=True,
        capture_output=True,
    )
    schema = root / "adult.schema.toml"
    schema.write_text(
        builtin_schema("adult")
        .read_text()
        .replace("required = true", 'required = false\nlegal_basis = "GDPR art. 6(1)(f), bench"')
    )
    frame = read_table(builtin_data("adult"))
    if sites * rows_per_site > len(frame):
        raise SystemExit(f"{sites} sites x {rows_per_site} rows: the table has {len(frame)}")
    data = {}
    for index, name in enumerate(names):
        data[name] = root / f"{name}.csv"
        frame.iloc[index * rows_per_site : (index + 1) * rows_per_site].to_csv(
            data[name], index=False
        )
    return Federation(root=root, sites=names, schema=schema, certs=certs, data=data)


# --------------------------------------------------------------------------- insitu runs


@dataclass
class InsituRun:
    """One deployed insitu run: a server process and one process per site."""

    fed: Federation
    root: Path
    address: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    server: subprocess.Popen[bytes] | None = None
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    sites: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started: float = 0.0

    @property
    def home(self) -> Path:
        return self.root / "server"

    def server_args(self, *extra: str) -> list[str]:
        return [
            INSITU,
            "federate",
            "server",
            "--home",
            str(self.home),
            "-s",
            str(self.fed.schema),
            "--certs",
            str(self.fed.certs),
            "--address",
            self.address,
            "--timeout",
            "1200",
            "--json",
            *extra,
        ]

    def start_server(self, *extra: str) -> subprocess.Popen[bytes]:
        n = len(self.servers)
        self.server = start(
            self.server_args(*extra),
            out=self.root / f"server-{n}.out",
            err=self.root / f"server-{n}.err",
        )
        self.servers.append(self.server)
        return self.server

    def start(self, *extra: str) -> None:
        """The server with ``extra`` arguments, then every site."""
        self.root.mkdir(parents=True)
        Workspace.init(self.home, name="server")
        self.started = time.time()
        self.start_server(*extra)
        for name in self.fed.sites:
            self.sites[name] = start(
                [
                    INSITU,
                    "federate",
                    "site",
                    "--home",
                    str(self.root / name),
                    "--data",
                    str(self.fed.data[name]),
                    "-s",
                    str(self.fed.schema),
                    "--ca",
                    str(self.fed.ca),
                    "--key",
                    str(self.fed.key(name)),
                    "--server",
                    self.address,
                    "--retries",
                    SITE_RETRIES,
                    "--once",
                    "--json",
                ],
                out=self.root / f"{name}.out",
                err=self.root / f"{name}.err",
            )

    def run_dir(self) -> Path | None:
        runs = self.home / "federation" / "runs"
        found = sorted(runs.iterdir()) if runs.is_dir() else []
        return found[0] if found else None

    def progress(self) -> str:
        run_dir = self.run_dir()
        path = run_dir / "progress.txt" if run_dir else None
        return path.read_text().strip() if path and path.exists() else ""

    def wait(self, deadline: float) -> bool:
        """Wait for every process until ``deadline`` (monotonic); whether all ended."""
        for process in (self.server, *self.sites.values()):
            assert process is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(deadline - time.monotonic(), 0.1))
        return all(p.poll() is not None for p in (*self.servers, *self.sites.values()))

    def stop(self) -> None:
        for process in (*self.servers, *self.sites.values()):
            finish(process)

    def result(self) -> dict[str, Any] | None:
        """The last server's ``--json`` document, if it printed one."""
        n = len(self.servers) - 1
        text = (self.root / f"server-{n}.out").read_text()
        try:
            doc: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError:
            return None
        return doc

    def failure(self) -> dict[str, Any]:
        """Which process failed, its exit code and the tail of its stderr; the run kept."""
        failed: dict[str, Any] = {}
        for n, process in enumerate(self.servers):
            if process.returncode not in (0, -signal.SIGKILL):
                failed[f"server-{n}"] = {
                    "command": " ".join(process.args),  # type: ignore[arg-type]
                    "returncode": process.returncode,
                    "stderr_tail": tail(self.root / f"server-{n}.err"),
                }
        for name, process in self.sites.items():
            if process.returncode != 0:
                failed[name] = {
                    "returncode": process.returncode,
                    "stderr_tail": tail(self.root / f"{name}.err"),
                }
        KEPT.mkdir(exist_ok=True)
        kept = KEPT / f"{self.root.name}-{int(time.time())}"
        shutil.copytree(self.root, kept, ignore=shutil.ignore_patterns("*.sock"))
        failed["kept"] = str(kept)
        return failed

    def ledger_times(self) -> dict[str, Any]:
        """``federation.started``, ``.resumed`` and each ``.round``: time and payload."""
        with Workspace.open(self.home).ledger() as ledger:
            return {
                kind: [
                    (epoch(e.time), e.payload)
                    for e in ledger.entries(event_type=f"federation.{kind}")
                ]
                for kind in ("started", "resumed", "round")
            }


def per_round(start: float, ends: list[float]) -> dict[str, float | None]:
    """Seconds per round, with and without the first round."""
    return {
        "s_per_round": round((ends[-1] - start) / len(ends), 2),
        "s_per_round_after_first": (
            round((ends[-1] - ends[0]) / (len(ends) - 1), 2) if len(ends) > 1 else None
        ),
        "first_round_s": round(ends[0] - start, 2),
    }


def run_insitu(fed: Federation, root: Path, *extra: str, limit: float = 900.0) -> dict[str, Any]:
    """One insitu run to its end (or ``limit`` seconds): its result, tally and timing."""
    run = InsituRun(fed, root)
    try:
        run.start(*extra)
        ended = run.wait(time.monotonic() + limit)
        wall = time.time() - run.started
        seen = run.progress()
    finally:
        run.stop()
    result = run.result()
    codes = {name: p.returncode for name, p in run.sites.items()}
    ok = ended and run.servers[0].returncode == 0 and result is not None and not any(codes.values())
    out: dict[str, Any] = {
        "completed": ok,
        "wall_s": round(wall, 1),
        "site_exit_codes": codes,
        "run_id": result["run_id"] if result else None,
    }
    if not ended:
        out["not_ended_within_s"] = limit
        out["progress_at_limit"] = seen
    if result is not None:
        out["rounds"] = [
            {
                "round": r["round"],
                "sites_ok": r["sites_ok"],
                "sites_evaluated": r["sites_evaluated"],
                "evaluation_missing": r.get("evaluation_missing", {}),
                "missing": r.get("missing", {}),
                "accuracy": r["accuracy"],
            }
            for r in result["rounds"]
        ]
        times = run.ledger_times()
        out["timing"] = per_round(times["started"][0][0], [t for t, _ in times["round"]])
    if not ok:
        out["failure"] = run.failure()
    return out


# --------------------------------------------------------------------------- plain Flower


def _flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_HOME=str(flwr_home),
        PYTHONUNBUFFERED="1",
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
    )
    return env


def _control(address: str, ca: Path, deadline: float) -> Any:
    """A Control API client of the plain SuperLink, once it answers."""
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.proto.control_pb2 import ListRunsRequest
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

    while time.monotonic() < deadline:
        client = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=False,
            root_certificates=ca.read_bytes(),
            interceptors=[
                CliClientHttpInterceptor(),
                RuntimeVersionHttpInterceptor(component_name="flwr-cli"),
            ],
        )
        try:
            client.ListRuns(ListRunsRequest())
        except Exception:  # noqa: BLE001 -- not up yet
            client.close()
            time.sleep(0.2)
            continue
        return client
    raise RuntimeError(f"the plain SuperLink did not answer on {address}")


def _register(client: Any, fed: Federation) -> None:
    """Register each site's public key (SuperNode authentication)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.proto.control_pb2 import RegisterNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    for name in fed.sites:
        public = serialization.load_ssh_public_key(
            (fed.certs / "sites" / f"{name}.pub").read_bytes()
        )
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise SystemExit(f"{name}.pub is not an EC key")
        client.RegisterNode(RegisterNodeRequest(public_key=public_key_to_bytes(public), name=name))


def _submit(client: Any, app: Path, config: dict[str, Any]) -> int:
    import hashlib

    from flwr.cli.build import build_fab_from_disk
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab = build_fab_from_disk(app)
    response = client.StartRun(
        StartRunRequest(
            fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
            override_config=user_config_to_proto(config),
        )
    )
    return int(response.run_id)


@contextlib.contextmanager
def _plain_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The plain run's processes, each stopped as a group (last started first)."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for process in reversed(procs):
            finish(process, group=True)


def run_plain(fed: Federation, root: Path, rounds: int, *, limit: float = 900.0) -> dict[str, Any]:
    """One plain Flower FedAvg run deployed like insitu's: tally and the ServerApp's clock."""
    from flwr.proto.control_pb2 import ListRunsRequest

    root.mkdir(parents=True)
    app = root / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(PLAIN_PYPROJECT)
    (app / f"{PLAIN_MODULE}.py").write_text(PLAIN_APP)
    address = f"127.0.0.1:{free_port()}"
    host, port = address.rsplit(":", 1)
    timing = root / "timing.json"
    started = time.time()
    deadline = time.monotonic() + limit
    status: Any = None
    with _plain_processes() as procs:
        procs.append(
            start(
                [
                    str(BIN / "flower-superlink"),
                    "--ssl-ca-certfile",
                    str(fed.ca),
                    "--ssl-certfile",
                    str(fed.certs / "server.pem"),
                    "--ssl-keyfile",
                    str(fed.certs / "server.key"),
                    "--enable-supernode-auth",
                    "--disable-runtime-dependency-installation",
                    "--database",
                    str(root / "superlink.db"),
                    "--host",
                    host,
                    "--port",
                    port,
                ],
                out=root / "superlink.log",
                err=root / "superlink.err",
                group=True,
                env=_flower_env(root / "flwr-superlink"),
                cwd=root,
            )
        )
        client = _control(address, fed.ca, deadline)
        try:
            _register(client, fed)
            for name in fed.sites:
                procs.append(
                    start(
                        [
                            str(BIN / "flower-supernode"),
                            "--superlink",
                            address,
                            "--root-certificates",
                            str(fed.ca),
                            "--auth-supernode-private-key",
                            str(fed.key(name)),
                            "--node-config",
                            f'data-path="{fed.data[name]}"',
                            "--host",
                            "127.0.0.1",
                            "--port",
                            str(free_port()),
                        ],
                        out=root / f"{name}.log",
                        err=root / f"{name}.err",
                        group=True,
                        env=_flower_env(root / f"flwr-{name}"),
                        cwd=root,
                    )
                )
            flower_run = _submit(
                client,
                app,
                {
                    "rounds": rounds,
                    "sites": len(fed.sites),
                    "n-features": fed.n_features,
                    "schema": str(fed.schema),
                    "timing": str(timing),
                },
            )
            while time.monotonic() < deadline:
                runs = client.ListRuns(ListRunsRequest(run_id=flower_run)).run_dict
                status = runs[flower_run].status
                if status.status == "finished":
                    break
                time.sleep(0.5)
        finally:
            client.close()
    wall = time.time() - started
    marks = json.loads(timing.read_text()) if timing.exists() else None
    complete = (
        status is not None
        and status.status == "finished"
        and marks is not None
        and len(marks["round_end"]) == rounds
    )
    out: dict[str, Any] = {
        "completed": complete,
        "flower_status": None if status is None else f"{status.status}:{status.sub_status}",
        "wall_s": round(wall, 1),
    }
    if marks is not None:
        out["rounds"] = [
            {"round": i + 1, "sites_ok": ok, "sites_evaluated": ev}
            for i, (ok, ev) in enumerate(
                zip(marks["sites_ok"], marks["sites_evaluated"], strict=False)
            )
        ]
        if marks["round_end"]:
            out["timing"] = per_round(marks["start"], marks["round_end"])
    if not complete:
        KEPT.mkdir(exist_ok=True)
        kept = KEPT / f"{root.name}-{int(time.time())}"
        shutil.copytree(root, kept)
        out["kept"] = str(kept)
        out["superlink_log_tail"] = tail(root / "superlink.log")
    return out


# --------------------------------------------------------------------------- parts


def _all_sites(run: dict[str, Any], sites: int, rounds: int) -> bool:
    """Every round aggregated every site; the evaluated (final) round covers every site."""
    records = run.get("rounds", [])
    return (
        run["completed"]
        and len(records) == rounds
        and all(r["sites_ok"] == sites for r in records)
        and records[-1]["sites_evaluated"] == sites
    )


def _tally(runs: list[dict[str, Any]], sites: int, rounds: int) -> dict[str, Any]:
    walls = [r["wall_s"] for r in runs]
    records = [record for r in runs for record in r.get("rounds", [])]
    return {
        "runs": len(runs),
        "runs_completed": sum(r["completed"] for r in runs),
        "runs_with_every_round_from_every_site": sum(_all_sites(r, sites, rounds) for r in runs),
        "rounds_recorded": len(records),
        "rounds_with_every_site_aggregated": sum(r["sites_ok"] == sites for r in records),
        "final_rounds_with_every_site_evaluated": sum(
            r["rounds"][-1]["sites_evaluated"] == sites for r in runs if r.get("rounds")
        ),
        "sites_ok_by_run": [[x["sites_ok"] for x in r.get("rounds", [])] for r in runs],
        "sites_evaluated_by_run": [
            [x["sites_evaluated"] for x in r.get("rounds", [])] for r in runs
        ],
        "wall_s_median": round(statistics.median(walls), 1),
        "wall_s_min": min(walls),
        "wall_s_max": max(walls),
    }


#: The soak's anchor runs after insitu runs 1, 4, 7 and 10 (an insitu run takes about two
#: minutes here, a plain one one: ten of each would double the part's time).
ANCHOR_EVERY = 3


def soak_part(tmp: Path, runs: int = 10) -> dict[str, Any]:
    sites, rounds = 3, 3
    fed = make_federation(tmp / "soak", sites, 3000)
    insitu_runs: list[dict[str, Any]] = []
    plain_runs: list[dict[str, Any]] = []
    for i in range(runs):
        ours = run_insitu(fed, tmp / f"soak-{i}", "--sites", "3", "--rounds", "3")
        ours["run"] = i + 1
        insitu_runs.append(ours)
        anchor = ""
        if i % ANCHOR_EVERY == 0:
            plain = run_plain(fed, tmp / f"soak-plain-{i}", rounds)
            plain["run"] = i + 1
            plain_runs.append(plain)
            anchor = f"; plain {'ok' if plain['completed'] else 'FAILED'} {plain['wall_s']} s"
        print(
            f"soak {i + 1}/{runs}: insitu {'ok' if ours['completed'] else 'FAILED'} "
            f"{ours['wall_s']} s, sites_ok {[r['sites_ok'] for r in ours.get('rounds', [])]}, "
            f"sites_evaluated {[r['sites_evaluated'] for r in ours.get('rounds', [])]}" + anchor,
            flush=True,
        )
        for path in (tmp / f"soak-{i}", tmp / f"soak-plain-{i}"):
            shutil.rmtree(path, ignore_errors=True)
    ours_tally, plain_tally = _tally(insitu_runs, sites, rounds), _tally(plain_runs, sites, rounds)
    return {
        "settings": {
            "sites": sites,
            "rounds": rounds,
            "privacy": "record",
            "epsilon": 3.0,
            "secure_aggregation": True,
            "rows_per_site": 3000,
            "evaluated_rounds": "the final round only (record-level DP); the anchor likewise",
        },
        "requirement": "every round of every run has evaluation results from every site",
        "requirement_met": ours_tally["runs_with_every_round_from_every_site"] == runs,
        "insitu": ours_tally,
        "plain_flower_deployed": plain_tally,
        "insitu_over_anchor_wall_median": round(
            ours_tally["wall_s_median"] / plain_tally["wall_s_median"], 2
        ),
        "insitu_runs": insitu_runs,
        "plain_runs": plain_runs,
    }


def _wait_for(check: Callable[[], bool], timeout: float, step: float = 0.05) -> float | None:
    """``time.time()`` when ``check`` first holds, or None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.time()
        time.sleep(step)
    return None


def resume_part(tmp: Path) -> dict[str, Any]:
    rounds = 4
    fed = make_federation(tmp / "resume", 3, 3000)
    run = InsituRun(fed, tmp / "resume-run")
    extra = ("--sites", "3", "--rounds", str(rounds))
    out: dict[str, Any] = {"settings": {"sites": 3, "rounds": rounds, "killed_after": 2}}
    try:
        run.start(*extra)
        first = run.server
        assert first is not None
        fresh_tls = _wait_for(lambda: tls_up(run.address, fed.ca), 300)
        after_two = _wait_for(
            lambda: run.progress().startswith(f"round 2/{rounds}") or first.poll() is not None,
            600,
        )
        if after_two is None or first.poll() is not None:
            out["failure"] = run.failure() if first.poll() is not None else "no round 2 in 600 s"
            return out
        run_dir = run.run_dir()
        assert run_dir is not None
        progress = run_dir / "progress.txt"
        crash = time.time()
        first.send_signal(signal.SIGKILL)
        run.start_server(*extra, "--resume", run_dir.name)
        tls = _wait_for(lambda: tls_up(run.address, fed.ca), 300)
        rewritten = _wait_for(lambda: progress.stat().st_mtime > crash, 600, step=0.1)
        ended = run.wait(time.monotonic() + 600)
    finally:
        run.stop()
    result = run.result()
    times = run.ledger_times()
    resumed_at, resumed = times["resumed"][0] if times["resumed"] else (None, {})
    after = [(t, p) for t, p in times["round"] if resumed_at is not None and t > resumed_at]
    before = [t for t, _ in times["round"] if resumed_at is None or t < resumed_at]
    normal_round = before[1] - before[0] if len(before) > 1 else None
    first_reply = after[0][0] - crash if after else None
    out.update(
        {
            "first_reply_is": "the resumed run's first federation.round in the server's ledger",
            "resumed_from_checkpoint_round": resumed.get("from_round"),
            "first_round_after_resume": after[0][1]["round"] if after else None,
            "crash_to_gateway_tls_s": None if tls is None else round(tls - crash, 2),
            "crash_to_first_round_recorded_s": None
            if first_reply is None
            else round(first_reply, 2),
            "crash_to_progress_rewritten_s": None
            if rewritten is None
            else round(rewritten - crash, 2),
            "anchor_fresh_start_to_gateway_tls_s": (
                None if fresh_tls is None else round(fresh_tls - run.started, 2)
            ),
            "anchor_normal_round_s": None if normal_round is None else round(normal_round, 2),
            "resumed_tls_over_fresh_tls": (
                None
                if tls is None or fresh_tls is None
                else round((tls - crash) / (fresh_tls - run.started), 2)
            ),
            "first_reply_over_normal_round": (
                None
                if first_reply is None or not normal_round
                else round(first_reply / normal_round, 2)
            ),
            "rounds_completed": [r["round"] for r in result["rounds"]] if result else [],
            "completed_all_rounds": bool(
                ended and result and [r["round"] for r in result["rounds"]] == [1, 2, 3, 4]
            ),
            "site_exit_codes": {name: p.returncode for name, p in run.sites.items()},
            "sites_ok_by_round": [r["sites_ok"] for r in result["rounds"]] if result else [],
            "sites_evaluated_by_round": (
                [r["sites_evaluated"] for r in result["rounds"]] if result else []
            ),
        }
    )
    if not out["completed_all_rounds"] or any(out["site_exit_codes"].values()):
        out["failure"] = run.failure()
    return out


def _ratio(ours: dict[str, Any], plain: dict[str, Any], key: str) -> float | None:
    a, b = ours.get("timing", {}).get(key), plain.get("timing", {}).get(key)
    return round(a / b, 2) if a and b else None


def _compare(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Mean per-round figures of the repetitions, and insitu over the anchor."""

    def mean(runs: list[dict[str, Any]], key: str) -> float | None:
        values = [r["timing"][key] for r in runs if r.get("timing", {}).get(key) is not None]
        return round(statistics.mean(values), 2) if values else None

    ours = [o for o, _ in pairs]
    plain = [p for _, p in pairs]
    summary: dict[str, Any] = {}
    for key in ("s_per_round", "s_per_round_after_first"):
        a, b = mean(ours, key), mean(plain, key)
        summary[f"insitu_dp_secagg_{key}"] = a
        summary[f"plain_flower_{key}"] = b
        summary[f"insitu_over_anchor_{key}"] = round(a / b, 2) if a and b else None
    summary["repetitions"] = [
        {
            "insitu": o,
            "plain_flower": p,
            "ratio_s_per_round": _ratio(o, p, "s_per_round"),
            "ratio_s_per_round_after_first": _ratio(o, p, "s_per_round_after_first"),
        }
        for o, p in pairs
    ]
    return summary


def overhead_part(tmp: Path) -> dict[str, Any]:
    results: dict[str, Any] = {
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "model": "logistic",
            "local_epochs": 1,
            "batch_size": 256,
            "learning_rate": 2.0,
            "insitu": "record-level DP-SGD epsilon 3, SecAgg+",
            "plain": "FedAvg, no DP, no secure aggregation, TLS + SuperNode auth",
            "evaluation": "final round only, both",
        },
    }
    fed5 = make_federation(tmp / "fed5", 5, 3000)
    pairs = []
    for i in range(2):
        plain = run_plain(fed5, tmp / f"plain5-{i}", 4)
        ours = run_insitu(fed5, tmp / f"insitu5-{i}", "--sites", "5", "--rounds", "4")
        print(
            f"5 sites, repetition {i + 1}: plain {plain.get('timing')}, "
            f"insitu {ours.get('timing')}",
            flush=True,
        )
        pairs.append((ours, plain))
    results["5_sites_4_rounds"] = _compare(pairs)
    print(
        "5 sites:",
        {k: v for k, v in results["5_sites_4_rounds"].items() if k != "repetitions"},
        flush=True,
    )

    fed20 = make_federation(tmp / "fed20", 20, 1500)
    started = time.monotonic()
    trial = run_insitu(fed20, tmp / "insitu20", "--sites", "20", "--rounds", "2", limit=900)
    trial_s = round(time.monotonic() - started, 1)
    print(f"20 sites x 2 rounds, insitu: {trial_s} s, completed {trial['completed']}", flush=True)
    if trial["completed"]:
        plain = run_plain(fed20, tmp / "plain20", 2)
        print(f"20 sites x 2 rounds, plain: {plain.get('timing')}", flush=True)
        results["20_sites_2_rounds"] = _compare([(trial, plain)])
    else:
        results["20_sites_2_rounds"] = {
            "not_measured": (
                f"one insitu run of 20 sites x 2 rounds did not finish within 15 minutes "
                f"on this 2-CPU machine ({trial_s} s; progress: "
                f"{trial.get('progress_at_limit') or 'none'})"
            ),
            "insitu_trial": trial,
        }
    results["goal"] = "insitu at most 2x plain Flower per round at 20 sites"
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def main() -> None:
    parts = sys.argv[1:] or ["soak", "resume", "overhead"]
    unknown = set(parts) - {"soak", "resume", "overhead"}
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(sorted(unknown))}: soak, resume, overhead")
    # SIGTERM (timeout, flock's holder) unwinds, so every process started here is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as tmp:
        for part in parts:
            started = time.perf_counter()
            results[part] = globals()[f"{part}_part"](Path(tmp))
            results[part]["benchmark_seconds"] = round(time.perf_counter() - started, 1)
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(results, indent=2) + "\n")
            print(f"{part}: written to {OUT}", flush=True)


if __name__ == "__main__":
    main()
