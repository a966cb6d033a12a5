"""Federated training across real sites on Flower's deployment engine (SuperLink/SuperNode).

Processes (every one of them Flower's own, started from this environment)::

    insitu federate server                       insitu federate site  (one per site)
      └─ flower-superlink  (TLS, SuperNode auth)   └─ flower-supernode  (TLS, site key)
           └─ flower-superexec                          └─ flower-superexec
                └─ flwr-serverapp                           └─ flwr-clientapp
                   (insitu._flower_app.server_app)             (insitu._flower_app.client_app)

* :func:`serve` checks the server certificate against the CA and the address sites dial,
  starts the SuperLink with ``--enable-supernode-auth`` (only keys registered through its
  Control API may join), registers the federation's site keys, submits one run (a Flower
  App Bundle whose only code imports ``insitu._flower_app``: its dependency list is
  empty and runtime dependency installation is off, so the run uses this environment,
  never a fresh one with a CUDA build of torch), waits for it and stops the SuperLink.
* :func:`run_server_app` (the ServerApp, via ``insitu._flower_app``) is the legacy-path
  ServerApp of simulation (ADR 0008): ``build_strategy`` inside ``RoundRecorder``,
  SecAgg+ through ``SecAggPlusWorkflow``.
  It records ``federation.started`` / ``federation.round`` / ``federation.completed`` in
  the server's workspace and saves the model as simulation does.
* :func:`join` checks that the server answers and presents a certificate signed by the
  federation's CA (retrying with exponential backoff), prepares the site's own file under
  the schema into its own workspace (sealed, pseudonymized with the site's key), and
  starts a SuperNode that authenticates with the site's key.
* :func:`site_client` (the ClientApp, via ``insitu._flower_app``) is
  :class:`~insitu.federated.SiteClient`: the site enforces its own privacy budget in its
  own ledger exactly as in simulation. It refuses a run whose schema digest differs from
  the one its data was prepared under.

Invariants: every process listens on and dials the loopback address unless the operator
gives another; every child process gets :data:`insitu._privacy_env.NO_TELEMETRY_ENV`
forced into its environment; an unreachable server or a certificate that does not match
fails before anything is written to the site's workspace. (An unregistered key is found
only when the SuperNode tries to activate, after the site's data is prepared: the
refusal is recorded in the site's ledger and the command exits 1.)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Grid

from insitu._atomic import atomic_write_text
from insitu._privacy_env import NO_TELEMETRY_ENV
from insitu.audit import events
from insitu.data import DataSchema, FeatureEncoder, read_table
from insitu.errors import (
    CertificateError,
    FederationError,
    SchemaError,
    ServerUnreachableError,
    SiteRefusedError,
    UsageError,
)
from insitu.federated._certs import FederationCerts, check_server_pair, load_site_public_key
from insitu.federated._config import FederationConfig
from insitu.federated._server_app import (
    RoundRecord,
    RoundRecorder,
    build_strategy,
    record_completed,
    record_failed,
    run_rounds,
)
from insitu.federated._site_app import SiteClient, SitePlan, prepare_site_data
from insitu.privacy import calibrate_noise
from insitu.training import (
    build_model,
    get_weights,
    onnx_parity,
    set_weights,
    weights_digest,
)
from insitu.workspace import Workspace

__all__ = [
    "DEFAULT_ADDRESS",
    "DeployResult",
    "join",
    "probe_server",
    "run_server_app",
    "serve",
    "site_client",
]

logger = logging.getLogger(__name__)
_P = ParamSpec("_P")
_R = TypeVar("_R")

#: Where the SuperLink listens (Fleet, Control and ServerAppIo share one HTTPS port).
DEFAULT_ADDRESS = "127.0.0.1:9092"
_APP_MODULE = "insitu_federation_app"
_RUN_DIR_ENV = "INSITU_RUN_DIR"
_PYPROJECT = """\
# A Flower App Bundle whose code is insitu's (installed in the environment that runs it).
[project]
name = "insitu-federation"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "insitu"

[tool.flwr.app.components]
serverapp = "{module}:server_app"
clientapp = "{module}:client_app"

[tool.flwr.app.config]
insitu = ""
"""


# --------------------------------------------------------------------------- processes


def _flower_bin(name: str) -> str:
    """A Flower executable of *this* environment (never one found elsewhere on PATH)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FederationError(
            f"{name} is not installed next to {sys.executable}; reinstall insitu with "
            "its federated extra (pip install 'insitu[federated]')"
        )
    return str(path)


def child_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process insitu starts (telemetry forced off)."""
    env = dict(os.environ)
    env.update(NO_TELEMETRY_ENV)
    # Flower's processes start their own children (flower-superexec, flwr-serverapp,
    # flwr-clientapp) by name: this environment's bin directory comes first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"address {address!r}: give HOST:PORT, e.g. {DEFAULT_ADDRESS}")
    return host.strip("[]"), int(port)


def _stop(process: subprocess.Popen[bytes], *, grace: float = 10.0) -> None:
    """Stop a Flower process insitu started, and the processes it started.

    Each is started in a session of its own (``start_new_session``), so its process
    group holds exactly it and its descendants (SuperExec, ServerApp or ClientApps):
    SIGTERM to the group, then SIGKILL to whatever is left after ``grace`` seconds.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while a Flower process runs, so it is stopped too."""

    def unwind(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, unwind)
    except ValueError:  # not the main thread: the caller handles its own signals
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _unwinds_on_sigterm(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` with SIGTERM unwinding (its ``finally`` blocks stop what it started)."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with _sigterm_unwinds():
            return fn(*args, **kwargs)

    return wrapper


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def probe_server(
    address: str,
    ca: Path,
    *,
    retries: int = 5,
    first_delay: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Open a TLS connection to the server and verify its certificate against ``ca``.

    Retries connection failures with exponential backoff (``first_delay``, doubling, at
    most 8 s between attempts); a certificate that does not verify is not retried.

    Raises:
        CertificateError: the CA cannot be read, or the server's certificate is not
            signed by it or does not name the host.
        ServerUnreachableError: no TLS connection after ``retries`` retries.

    """
    host, port = _split_address(address)
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(
            f"cannot load the federation CA {ca}: {exc}; give the ca.pem the server operator sent"
        ) from exc
    delay, last = first_delay, ""
    for attempt in range(retries + 1):
        try:
            with (
                socket.create_connection((host, port), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname=host),
            ):
                return
        except ssl.SSLCertVerificationError as exc:
            raise CertificateError(
                f"the server at {address} presented a certificate that {ca} does not "
                f"verify ({exc.verify_message}); get the federation's ca.pem from the "
                "server operator, or check the address"
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            last = exc.strerror or str(exc) or type(exc).__name__
        if attempt < retries:
            logger.info("server %s: %s; retrying in %.1f s", address, last, delay)
            sleep(delay)
            delay = min(delay * 2, 8.0)
    raise ServerUnreachableError(
        f"cannot reach the federation server at {address} after {retries + 1} attempts "
        f"({last}); check the address and that 'insitu federate server' is running there"
    )


# --------------------------------------------------------------------------- server side


@dataclass
class DeployResult:
    """The outcome of one deployed run, as the server saw it."""

    run_id: str
    config: FederationConfig
    sites_registered: list[str]
    rounds: list[dict[str, Any]]
    model_dir: Path
    model_sha256: str
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON summary."""
        return {
            "run_id": self.run_id,
            "config": self.config.to_json(),
            "sites_registered": self.sites_registered,
            "rounds": self.rounds,
            "model_dir": str(self.model_dir),
            "model_sha256": self.model_sha256,
            "seconds": round(self.seconds, 2),
        }


def _n_features(schema: DataSchema) -> int:
    try:
        return len(FeatureEncoder.for_schema(schema).names)
    except ValueError as exc:
        raise SchemaError(
            f"{exc}: in a deployment every site must encode alike, so the schema must "
            "declare the categories of every categorical feature (features.categories)"
        ) from exc


def _control_client(address: str, ca: Path) -> Any:
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

    return ControlHttpClient.from_server_address(
        server_address=address,
        insecure=False,
        root_certificates=ca.read_bytes(),
        interceptors=[
            CliClientHttpInterceptor(),
            RuntimeVersionHttpInterceptor(component_name="insitu"),
        ],
    )


def _key_fingerprint(openssh_public: bytes) -> str:
    """``sha256:<hex>`` of a public key's OpenSSH blob (the bytes ``ssh-keygen -l`` hashes)."""
    import base64

    blob = base64.b64decode(openssh_public.split()[1])
    return "sha256:" + hashlib.sha256(blob).hexdigest()


@_unwinds_on_sigterm
def serve(  # noqa: PLR0915 -- the run, step by step
    ws: Workspace,
    config: FederationConfig,
    *,
    schema: DataSchema,
    certs: Path,
    site_keys: list[Path] | None = None,
    address: str = DEFAULT_ADDRESS,
    timeout: float = 3600.0,
    on_status: Callable[[str], None] | None = None,
) -> DeployResult:
    """Run the SuperLink and one federated run to the end; see the module docstring.

    ``config.sites`` is the number of sites that must connect; every key in
    ``site_keys`` (default: ``<certs>/sites/*.pub``) is registered.

    Raises:
        CertificateError: a server certificate that does not match its key, the CA or the
            address; a site key that is not an EC public key.
        FederationError: the SuperLink does not start, or the run fails.

    """
    started = time.perf_counter()
    host, port = _split_address(address)
    files = FederationCerts(certs.absolute())
    # A wildcard bind address is not what sites dial: its SAN cannot be checked here.
    san_host = None if host in ("0.0.0.0", "::") else host  # noqa: S104 -- compared, not bound
    check_server_pair(files.ca, files.server_cert, files.server_key, host=san_host)
    keys = {p.stem: p for p in site_keys} if site_keys is not None else dict(files.site_publics())
    if not keys:
        raise CertificateError(
            f"no site keys in {files.directory / 'sites'}; run 'insitu federate certs "
            "--site NAME ...' or give --site-key"
        )
    registered = {name: load_site_public_key(path) for name, path in keys.items()}
    if len(registered) < config.sites:
        raise UsageError(
            f"--sites {config.sites} but only {len(registered)} site key(s) are registered; "
            "register more keys or lower --sites"
        )
    n_features = _n_features(schema)
    with contextlib.closing(socket.socket()) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise FederationError(
                f"cannot listen on {address}: {exc.strerror}; choose another --address"
            ) from exc

    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    base = ws.home.absolute() / "federation"
    run_dir = base / "runs" / run_id
    app_dir = base / "app"
    run_dir.mkdir(parents=True, exist_ok=True)
    app_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(app_dir / "pyproject.toml", _PYPROJECT.format(module=_APP_MODULE))
    atomic_write_text(
        app_dir / f"{_APP_MODULE}.py",
        '"""The Flower app of an insitu federation: its code is insitu\'s."""\n\n'
        "from insitu._flower_app import client_app, server_app\n\n"
        '__all__ = ["client_app", "server_app"]\n',
    )
    site_sigma = 0.0
    if config.privacy == "site":
        site_sigma = calibrate_noise(
            target_epsilon=config.epsilon, delta=config.delta, sample_rate=1.0, steps=config.rounds
        )
    plan = {
        "run_id": run_id,
        "home": str(ws.home.absolute()),
        "run_dir": str(run_dir.absolute()),
        "config": config.to_json(),
        "dataset": schema.name,
        "schema_sha256": schema.digest(),
        "n_features": n_features,
        "feature_names": FeatureEncoder.for_schema(schema).names,
        "schema_source": schema.source,
        "site_noise_multiplier": site_sigma,
        "sites_registered": sorted(registered),
    }
    atomic_write_text(run_dir / "plan.json", json.dumps(plan, indent=2) + "\n")
    with ws.ledger() as ledger:
        events.FEDERATION_SITES_REGISTERED.record(
            ledger,
            run=run_id,
            address=address,
            ca_sha256=hashlib.sha256(files.ca.read_bytes()).hexdigest(),
            sites={name: _key_fingerprint(key) for name, key in sorted(registered.items())},
        )

    log_path = run_dir / "superlink.log"
    command = [
        _flower_bin("flower-superlink"),
        "--ssl-ca-certfile",
        str(files.ca),
        "--ssl-certfile",
        str(files.server_cert),
        "--ssl-keyfile",
        str(files.server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 -- our own executable, fixed arguments
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(base / "flwr") | {_RUN_DIR_ENV: str(run_dir)},
            cwd=run_dir,
            start_new_session=True,
        )
    try:
        if on_status:
            on_status(f"SuperLink starting on https://{address}")
        client = _wait_for_control(process, address, files.ca, log_path)
        try:
            _register(client, registered)
            flower_run = _start_run(client, app_dir, plan)
            if on_status:
                on_status(f"run {run_id}: waiting for {config.sites} site(s)")
            _wait_for_run(
                client,
                process,
                flower_run,
                run_dir,
                timeout=timeout,
                log_path=log_path,
                on_status=on_status,
            )
        finally:
            client.close()
    finally:
        _stop(process)
    result = json.loads((run_dir / "result.json").read_text())
    if "error" in result:
        raise FederationError(f"run {run_id} failed: {result['error']}")
    return DeployResult(
        run_id=run_id,
        config=config,
        sites_registered=sorted(registered),
        rounds=result["rounds"],
        model_dir=Path(result["model_dir"]),
        model_sha256=result["model_sha256"],
        seconds=time.perf_counter() - started,
    )


def _for_sites(plan: dict[str, Any]) -> dict[str, Any]:
    """What every site receives of the plan (never the server's paths)."""
    keys = ("run_id", "config", "dataset", "schema_sha256", "n_features", "site_noise_multiplier")
    return {key: plan[key] for key in keys}


def _wait_for_control(
    process: subprocess.Popen[bytes], address: str, ca: Path, log_path: Path
) -> Any:
    from flwr.proto.control_pb2 import ListRunsRequest

    delay = 0.2
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FederationError(
                f"the SuperLink exited with code {process.returncode}; its log "
                f"({log_path}) ends with:\n{_log_tail(log_path, 8)}"
            )
        client = _control_client(address, ca)
        try:
            client.ListRuns(ListRunsRequest())
        except Exception:  # noqa: BLE001 -- not up yet: any transport error
            client.close()
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
            continue
        return client
    raise FederationError(f"the SuperLink did not answer on {address} within 60 s; see {log_path}")


def _register(client: Any, keys: dict[str, bytes]) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.proto.control_pb2 import RegisterNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    for name, openssh in sorted(keys.items()):
        public = serialization.load_ssh_public_key(openssh)
        if not isinstance(public, ec.EllipticCurvePublicKey):  # checked on load; for mypy
            raise CertificateError(f"site {name}: not an EC public key")
        response = client.RegisterNode(
            RegisterNodeRequest(public_key=public_key_to_bytes(public), name=name)
        )
        if not response.node_id:
            raise FederationError(f"the SuperLink did not register site {name}")


def _start_run(client: Any, app_dir: Path, plan: dict[str, Any]) -> int:
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab = build_fab_from_disk(app_dir)
    response = client.StartRun(
        StartRunRequest(
            fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
            override_config=user_config_to_proto({"insitu": json.dumps(_for_sites(plan))}),
        )
    )
    if not response.HasField("run_id"):
        raise FederationError("the SuperLink did not start the run")
    return int(response.run_id)


def _wait_for_run(
    client: Any,
    process: subprocess.Popen[bytes],
    flower_run: int,
    run_dir: Path,
    *,
    timeout: float,
    log_path: Path,
    on_status: Callable[[str], None] | None,
) -> None:
    from flwr.proto.control_pb2 import ListRunsRequest

    deadline = time.monotonic() + timeout
    shown = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FederationError(
                f"the SuperLink exited with code {process.returncode} during the run; see "
                f"{log_path}"
            )
        status = client.ListRuns(ListRunsRequest(run_id=flower_run)).run_dict[flower_run].status
        if status.status == "finished":
            if not (run_dir / "result.json").exists():
                raise FederationError(
                    f"the run ended ({status.sub_status}: {status.details or 'no details'}) "
                    f"without a result; see {log_path}"
                )
            return
        progress = run_dir / "progress.txt"
        if on_status and progress.exists():
            text = progress.read_text().strip()
            if text != shown:
                shown = text
                on_status(text)
        time.sleep(0.5)
    raise FederationError(
        f"the run did not finish within {timeout:.0f} s; are all sites running "
        "'insitu federate site'? (see each site's output)"
    )


def run_server_app(grid: Grid, context: Context) -> None:
    """The ServerApp of a deployed run (in ``flwr-serverapp``; see ``insitu._flower_app``).

    The server's own plan (its workspace, paths) comes from the run directory named in
    ``INSITU_RUN_DIR``, which :func:`serve` sets on the SuperLink it starts; the run
    config, which every site also receives, carries only what sites need.
    """
    run_dir = Path(os.environ[_RUN_DIR_ENV])
    plan = json.loads((run_dir / "plan.json").read_text())
    try:
        if json.loads(str(context.run_config["insitu"]))["run_id"] != plan["run_id"]:
            raise FederationError("the run submitted is not the run this server planned")
        _run_server(grid, context, plan)
    except BaseException as exc:
        if isinstance(exc, FederationError):
            with Workspace.open(Path(plan["home"])).ledger() as ledger:
                record_failed(ledger, run_id=plan["run_id"], error=exc)
        atomic_write_text(run_dir / "result.json", json.dumps({"error": str(exc)}) + "\n")
        raise


def _run_server(grid: Grid, context: Context, plan: dict[str, Any]) -> None:
    config = FederationConfig(**plan["config"])
    ws = Workspace.open(Path(plan["home"]))
    run_id, run_dir = plan["run_id"], Path(plan["run_dir"])
    n_features = int(plan["n_features"])
    torch.manual_seed(config.seed)
    model = build_model(config.model, n_features, hidden=config.hidden)
    initial = ndarrays_to_parameters(get_weights(model))
    with ws.ledger() as ledger:
        events.FEDERATION_STARTED.record(
            ledger,
            run=run_id,
            dataset=plan["dataset"],
            schema_sha256=plan["schema_sha256"],
            site_names=plan["sites_registered"],
            engine="deployment",
            **{k: v for k, v in config.to_json().items() if k != "secagg_clipping_range"},
        )
    rounds: list[dict[str, Any]] = []

    def record_round(record: RoundRecord) -> None:
        epsilon_run = max(record.epsilon_by_site.values(), default=0.0)
        with ws.ledger() as ledger:
            events.FEDERATION_ROUND.record(
                ledger,
                run=run_id,
                round=record.round,
                sites_ok=record.sites_ok,
                failures=record.failures,
                sites_evaluated=record.sites_evaluated,
                accuracy=record.accuracy,
                central_accuracy=None,
                epsilon_run_max=epsilon_run,
            )
        rounds.append(record.to_json() | {"seen_by_strategy": record.seen_by_strategy})
        accuracy = "-" if record.accuracy is None else f"{record.accuracy:.4f}"
        atomic_write_text(
            run_dir / "progress.txt",
            f"round {record.round}/{config.rounds}: {record.sites_ok} site(s), accuracy "
            f"{accuracy}, epsilon this run {epsilon_run:.3f}\n",
        )

    strategy = RoundRecorder(
        build_strategy(
            config,
            initial,
            evaluate_fn=None,
            site_noise_multiplier=float(plan["site_noise_multiplier"]),
        ),
        config=config,
        on_round=record_round,
    )
    weights = run_rounds(grid, context, config, strategy)
    set_weights(model, weights)
    model_dir = _save_deployed_model(ws, run_id=run_id, model=model, plan=plan)
    digest = weights_digest(weights)
    epsilon_run = max(
        (max(r["epsilon_by_site"].values(), default=0.0) for r in rounds), default=0.0
    )
    with ws.ledger() as ledger:
        record_completed(
            ledger,
            run_id=run_id,
            rounds=len(rounds),
            central_accuracy=None,
            weights=weights,
            onnx=(model_dir / "model.onnx").read_bytes(),
            epsilon_run=epsilon_run if config.privacy != "none" else None,
            delta=config.delta if config.privacy != "none" else None,
        )
    result = {"rounds": rounds, "model_dir": str(model_dir), "model_sha256": digest}
    atomic_write_text(model_dir / "record.json", json.dumps(result | plan, indent=2) + "\n")
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2) + "\n")


def _save_deployed_model(
    ws: Workspace, *, run_id: str, model: torch.nn.Module, plan: dict[str, Any]
) -> Path:
    """Model files as simulation writes them; the ONNX parity probe is synthetic here.

    The server holds no records, so the parity of the ONNX export with PyTorch is
    checked on 256 rows drawn uniformly from [0, 1] (the range of encoded features).
    """
    import io

    from insitu._atomic import atomic_write_bytes
    from insitu.training import export_onnx

    model_dir = ws.home / "models" / run_id
    model_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    n_features = int(plan["n_features"])
    onnx_bytes = export_onnx(model, n_features)
    probe = np.random.default_rng(0).random((256, n_features), dtype=np.float32)
    parity = onnx_parity(model, onnx_bytes, probe)
    atomic_write_bytes(model_dir / "model.pt", buffer.getvalue())
    atomic_write_bytes(model_dir / "model.onnx", onnx_bytes)
    atomic_write_text(
        model_dir / "features.json",
        json.dumps(
            {
                "features": plan["feature_names"],
                "schema": plan["schema_source"],
                "schema_sha256": plan["schema_sha256"],
                "onnx_parity_max_abs_diff": parity.max_abs_diff,
                "onnx_parity_relative": parity.relative,
                "onnx_parity_probe": "uniform [0, 1], 256 rows (the server holds no records)",
            },
            indent=2,
        )
        + "\n",
    )
    return model_dir


# --------------------------------------------------------------------------- site side


class _DeployedSite(SiteClient):
    """A :class:`SiteClient` that marks the end of a run for ``insitu federate site --once``."""

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        """Evaluate as a site does; after the last round, mark the run done."""
        result = super().evaluate(parameters, config)
        if int(config.get("round", 0)) >= self.plan.config.rounds:
            done = self.plan.home / "federation" / "done"
            done.mkdir(parents=True, exist_ok=True)
            atomic_write_text(done / self.plan.run_id, "done\n")
        return result


def _site_plan(context: Context) -> SitePlan:
    home = Path(str(context.node_config["insitu-home"]))
    run = json.loads(str(context.run_config["insitu"]))
    site = json.loads((home / "federation" / "site.json").read_text())
    if site["schema_sha256"] != run["schema_sha256"]:
        raise FederationError(
            f"{site['site']}: the run's schema ({run['schema_sha256'][:12]}) is not the one "
            f"this site prepared its data under ({site['schema_sha256'][:12]}); refusing"
        )
    return SitePlan(
        run_id=run["run_id"],
        site=site["site"],
        home=home,
        train_dir=Path(site["train_dir"]),
        test_dir=Path(site["test_dir"]),
        dataset=site["dataset"],
        n_features=int(run["n_features"]),
        config=FederationConfig(**run["config"]),
        site_noise_multiplier=float(run["site_noise_multiplier"]),
    )


def site_client(context: Context) -> Any:
    """The site's Flower client for one message (in ``flwr-clientapp``)."""
    return _DeployedSite(_site_plan(context)).to_client()


@_unwinds_on_sigterm
def join(  # noqa: PLR0915 -- checks, preparation, the node's life: in order
    ws_home: Path,
    data: Path,
    *,
    schema: DataSchema,
    server: str,
    ca: Path,
    key: Path,
    name: str | None = None,
    retries: int = 5,
    once: bool = False,
    test_fraction: float = 0.2,
    on_status: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Take part in federated runs as one site; see the module docstring.

    Returns when the SuperNode stops: after the first completed run with ``once``, or
    when interrupted.

    Raises:
        ServerUnreachableError: the server does not answer (after retries).
        CertificateError: the server's certificate does not verify against ``ca``, or
            ``key`` is not a site key.
        SiteRefusedError: the server does not know this site's key.

    """
    # Checks first: nothing is written when the server, CA or key is wrong.
    if not data.is_file():
        raise UsageError(f"--data {data}: no such file")
    site_key = _load_site_key(key)
    probe_server(server, ca, retries=retries)
    frame = read_table(data)
    schema.check_columns(frame.columns, source=data.name)

    created = False
    if (ws_home / "config.toml").exists():
        ws = Workspace.open(ws_home)
    else:
        ws, created = Workspace.init(ws_home, name=name or key.stem)
    site = name or key.stem
    try:
        train_dir, test_dir = prepare_site_data(
            ws, frame, schema, test_fraction=test_fraction, source=data.name
        )
    except BaseException:
        if created:  # nothing half-made: a workspace this call created goes with it
            shutil.rmtree(ws.home, ignore_errors=True)
        raise
    fed = ws.home.absolute() / "federation"
    fed.mkdir(exist_ok=True)
    atomic_write_text(
        fed / "site.json",
        json.dumps(
            {
                "site": site,
                "dataset": schema.name,
                "schema_sha256": schema.digest(),
                "train_dir": str(train_dir),
                "test_dir": str(test_dir),
            },
            indent=2,
        )
        + "\n",
    )
    with ws.ledger() as ledger:
        events.FEDERATION_SITE_JOINED.record(
            ledger,
            site=site,
            server=server,
            ca_sha256=hashlib.sha256(ca.read_bytes()).hexdigest(),
            key=_key_fingerprint(site_key),
            dataset=schema.name,
            workspace_created=created,
        )
    done_dir = fed / "done"
    before = set(done_dir.iterdir()) if done_dir.exists() else set()
    log_path = fed / "supernode.log"
    command = [
        _flower_bin("flower-supernode"),
        "--superlink",
        server,
        "--root-certificates",
        str(ca.absolute()),
        "--auth-supernode-private-key",
        str(key.absolute()),
        "--node-config",
        f'insitu-home="{ws.home.absolute()}"',
        "--host",
        "127.0.0.1",
        "--port",
        str(_free_port()),
        "--max-retries",
        str(retries),
    ]
    if on_status:
        on_status(f"{site}: SuperNode connecting to https://{server}")
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 -- our own executable, fixed arguments
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(fed / "flwr"),
            cwd=fed,
            start_new_session=True,
        )
    runs: list[str] = []
    try:
        while process.poll() is None:
            if done_dir.exists():
                runs = sorted(p.name for p in set(done_dir.iterdir()) - before)
                if runs and once:
                    _wait_for_last_reply(process, log_path, sent_before=_sent(log_path))
                    break
            time.sleep(0.5)
    finally:
        _stop(process)
        with ws.ledger() as ledger:
            events.FEDERATION_SITE_LEFT.record(ledger, site=site, runs=runs)
    code = process.returncode
    if not runs and code not in (0, -signal.SIGTERM):
        tail = _log_tail(log_path)
        if "2004" in tail or "Failed to activate SuperNode" in tail:
            raise SiteRefusedError(
                f"the server at {server} refused this site: its key {_key_fingerprint(site_key)}"
                f" ({key}) is not registered; ask the operator to register {key.stem}.pub"
            )
        raise FederationError(
            f"the SuperNode stopped with code {code}; see {log_path}: "
            f"{tail.splitlines()[-1] if tail else 'no output'}"
        )
    return {
        "site": site,
        "home": str(ws.home.absolute()),
        "runs": runs,
        "supernode_log": str(log_path),
    }


def _sent(log_path: Path) -> int:
    """How many replies the SuperNode has sent (its log says "Sent successfully")."""
    try:
        return log_path.read_text(errors="replace").count("Sent successfully")
    except OSError:
        return 0


def _wait_for_last_reply(
    process: subprocess.Popen[bytes], log_path: Path, *, sent_before: int, limit: float = 60.0
) -> None:
    """Let the SuperNode send the last round's evaluation before it is stopped.

    The ClientApp marks the run done inside its last evaluation, before Flower sends
    the reply; stopping the SuperNode at once would drop it (the round would count the
    site as failed).
    """
    deadline = time.monotonic() + limit
    while process.poll() is None and time.monotonic() < deadline:
        if _sent(log_path) > sent_before:
            return
        time.sleep(0.2)


def _load_site_key(path: Path) -> bytes:
    """The OpenSSH public blob of a site's private key (checked: a NIST EC key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except OSError as exc:
        raise CertificateError(f"cannot read the site key {path}: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise CertificateError(
            f"{path} is not an OpenSSH private key; give sites/NAME.key written by "
            "'insitu federate certs'"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path} is not an EC key; Flower authenticates sites with EC keys")
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
