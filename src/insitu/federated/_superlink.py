"""The server of a deployed federation: the SuperLink process, its sites' keys, one run.

:func:`serve` checks the server certificate against the CA and the address sites dial,
starts the SuperLink with ``--enable-supernode-auth`` (only keys registered through its
Control API may join) on a private loopback port, registers the federation's site keys,
opens the public port through the Fleet gateway (:mod:`insitu.federated._gateway`:
Fleet operations only, so no site can reach the Control or ServerAppIo API), submits
one run (a Flower App Bundle whose only code imports ``insitu._flower_app``; its
dependency list is empty and runtime dependency installation is off, so the run uses
this environment), waits for it, tells the sites it ended, and stops the SuperLink. The
run's plan crosses to the ServerApp's process as a typed
:class:`~insitu.federated._plan.RunPlan` in ``plan.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from insitu._atomic import atomic_write_text
from insitu.attestation import AllowList, load_ek_cas
from insitu.audit import events
from insitu.data import ArraySchema, DataSchema, FeatureEncoder
from insitu.errors import (
    CertificateError,
    FederationError,
    SchemaError,
    UsageError,
)
from insitu.federated._attest import SiteAdmission, site_attestation_keys
from insitu.federated._certs import (
    FederationCerts,
    LoopbackIdentity,
    check_server_pair,
    load_site_public_key,
    make_loopback_identity,
)
from insitu.federated._config import FederationConfig
from insitu.federated._gateway import FleetGateway, RunStates
from insitu.federated._plan import ArrayInput, RunPlan, SharedPlan, deployed_schema
from insitu.federated._processes import (
    APP_MODULE,
    DEFAULT_ADDRESS,
    PYPROJECT,
    RUN_DIR_ENV,
    child_env,
    flower_bin,
    free_port,
    key_fingerprint,
    log_tail,
    spawn,
    split_address,
    stop,
    unwinds_on_sigterm,
)
from insitu.privacy import calibrate_noise
from insitu.workspace import Workspace

__all__ = ["DEFAULT_ADDRESS", "DeployResult", "serve"]

logger = logging.getLogger(__name__)


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


@unwinds_on_sigterm
def serve(
    ws: Workspace,
    config: FederationConfig,
    *,
    schema: DataSchema | ArraySchema,
    certs: Path,
    site_keys: list[Path] | None = None,
    address: str = DEFAULT_ADDRESS,
    timeout: float = 3600.0,
    resume: str | None = None,
    on_status: Callable[[str], None] | None = None,
    attest: Path | None = None,
    ek_ca: Path | None = None,
) -> DeployResult:
    """Run the SuperLink and one federated run to the end; see the module docstring.

    ``config.sites`` is the number of sites that must connect; every key in
    ``site_keys`` (default: ``<certs>/sites/*.pub``) is registered. With ``resume``, the
    stopped run of that id goes on from its last checkpoint, with its own settings
    (``config`` is not used): the SuperLink's database in the run's directory still
    knows the sites' node ids, so their SuperNodes, retrying, carry on. With ``attest``
    (an allow-list of measured states), a site is admitted only after a fresh TPM quote
    (:mod:`insitu.federated._attest`); without it nothing changes. With ``ek_ca`` too
    (the TPM vendors' CA certificates, PEM), each site's AK must be bound to its TPM's
    certified EK; without it the AK is trusted on first use (a warning says so).

    Raises:
        CertificateError: a server certificate that does not match its key, the CA or the
            address; a site key that is not an EC public key; a resumed run's site
            whose key is no longer given.
        UsageError: ``resume`` names no deployed run of this workspace.
        AllowListError: ``attest`` cannot be read as an allow-list.
        FederationError: the SuperLink does not start, the run fails, or a resumed run
            has no checkpoint to go on from.

    """
    started = time.perf_counter()
    host, port = split_address(address)
    files = FederationCerts(certs.absolute())
    schema, arrays = deployed_schema(schema, config)  # array data: its table, its input
    if resume is None:
        registered = _check_certs_and_keys(files, site_keys, host=host, sites=config.sites)
        plan = _plan_run(ws, config, schema, registered, arrays=arrays)
    else:
        plan = _resumed_plan(ws, resume, schema)
        registered = _check_certs_and_keys(files, site_keys, host=host, sites=plan.config.sites)
        _check_sites_kept(plan, registered)
    admission = _admission(ws, attest, files, registered, run=plan.run_id, ek_ca=ek_ca)
    _check_bindable(host, port, address=address)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    app_dir = _write_app(ws.flower_app_dir.absolute())
    atomic_write_text(plan.run_dir / "plan.json", json.dumps(plan.to_json(), indent=2) + "\n")
    _run_on_superlink(
        ws,
        plan,
        files,
        registered,
        app_dir=app_dir,
        address=address,
        timeout=timeout,
        on_status=on_status,
        admission=admission,
    )
    result = _read_result(plan)
    return DeployResult(
        run_id=plan.run_id,
        config=plan.config,
        sites_registered=list(plan.sites_registered),
        rounds=result["rounds"],
        model_dir=Path(result["model_dir"]),
        model_sha256=result["model_sha256"],
        seconds=time.perf_counter() - started,
    )


def _run_on_superlink(
    ws: Workspace,
    plan: RunPlan,
    files: FederationCerts,
    registered: dict[str, bytes],
    *,
    app_dir: Path,
    address: str,
    timeout: float,
    on_status: Callable[[str], None] | None,
    admission: SiteAdmission | None = None,
) -> None:
    """Start the SuperLink on loopback, register the sites, open the gateway, run, stop."""
    identity = make_loopback_identity(plan.run_dir / "loopback")
    loopback = f"127.0.0.1:{free_port()}"
    process = _start_superlink(identity, loopback=loopback, plan=plan, flwr_home=ws.flower_home)
    states = RunStates()
    states.set(plan.run_id, "running")  # before the gateway opens: never a 404 for it
    host, port = split_address(address)
    try:
        control = _wait_for_control(process, loopback, identity.ca, plan.run_dir / "superlink.log")
        try:
            if plan.resume is not None:
                _stop_previous_flower_run(control, plan.run_dir)
            node_ids = _register(control, registered)
            _record_registration(ws, plan, files, registered, node_ids, address=address)
            gateway = FleetGateway(
                host=host,
                port=port,
                certfile=files.server_cert,
                keyfile=files.server_key,
                upstream=f"https://{loopback}",
                upstream_ca=identity.ca,
                states=states,
                admission=admission,
            )
            with gateway:
                _drive_run(
                    control,
                    process,
                    plan,
                    states,
                    app_dir=app_dir,
                    address=address,
                    timeout=timeout,
                    on_status=on_status,
                )
        finally:
            control.close()
    finally:
        stop(process)


def _admission(
    ws: Workspace,
    attest: Path | None,
    files: FederationCerts,
    registered: dict[str, bytes],
    *,
    run: str,
    ek_ca: Path | None = None,
) -> SiteAdmission | None:
    """The attested admission of sites, when the server was given an allow-list."""
    if attest is None:
        if ek_ca is not None:
            raise UsageError("--ek-ca binds the AKs of attested sites: give --attest too")
        return None
    allow_list = AllowList.load(attest)
    ek_cas = load_ek_cas(ek_ca) if ek_ca is not None else None
    if ek_cas is None:
        logger.warning(
            "attested admission trusts each site's AK on first use (its enrollment in "
            "<certs>/sites/NAME.ak.pem), not its TPM's EK certificate: pin the TPM "
            "vendor's CA with --ek-ca to bind it"
        )
    keys = site_attestation_keys(files.directory / "sites", sorted(registered))
    logger.info(
        "attested admission: %d measured state(s), PCRs %s, %d of %d sites with an AK",
        len(allow_list.states),
        allow_list.pcrs,
        len(keys),
        len(registered),
    )
    return SiteAdmission(ws, allow_list, registered, keys, run=run, ek_cas=ek_cas)


def _check_certs_and_keys(
    files: FederationCerts, site_keys: list[Path] | None, *, host: str, sites: int
) -> dict[str, bytes]:
    """The site keys to register, by name, once the server's certificate is checked.

    Raises:
        CertificateError: the server pair does not match its CA or ``host``; no site key,
            or one that is not an EC public key.
        UsageError: fewer keys than the ``sites`` that must connect.

    """
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
    if len(registered) < sites:
        raise UsageError(
            f"--sites {sites} but only {len(registered)} site key(s) are registered; "
            "register more keys or lower --sites"
        )
    return registered


def _plan_run(
    ws: Workspace,
    config: FederationConfig,
    schema: DataSchema,
    registered: dict[str, bytes],
    *,
    arrays: ArraySchema | None = None,
) -> RunPlan:
    """The plan of a new run: its id, its directory, what every site must agree on.

    Raises:
        SchemaError: the schema does not fix every categorical feature's categories.

    """
    n_features = _n_features(schema)
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    run_dir = ws.deployed_run_dir(run_id).absolute()
    site_sigma = 0.0
    if config.privacy == "site":
        site_sigma = calibrate_noise(
            target_epsilon=config.epsilon, delta=config.delta, sample_rate=1.0, steps=config.rounds
        )
    return RunPlan(
        shared=SharedPlan(
            run_id=run_id,
            config=config,
            dataset=schema.name,
            schema_sha256=schema.digest(),
            n_features=n_features,
            site_noise_multiplier=site_sigma,
            array_input=None if arrays is None else ArrayInput.of(arrays),
        ),
        home=ws.home.absolute(),
        run_dir=run_dir.absolute(),
        feature_names=tuple(FeatureEncoder.for_schema(schema).names),
        schema_source=schema.source,
        sites_registered=tuple(sorted(registered)),
        array_schema_source=None if arrays is None else arrays.source,
    )


def _resumed_plan(ws: Workspace, run_id: str, schema: DataSchema) -> RunPlan:
    """The plan that resumes the stopped run ``run_id`` of this workspace.

    Raises:
        UsageError: no deployed run of that id here.
        SchemaError: ``schema`` is not the one the run was planned under.
        FederationError: the run has no checkpoint, or completed (``RunPlan.resumed``).

    """
    run_dir = ws.deployed_run_dir(run_id).absolute()
    if not (run_dir / "plan.json").is_file():
        raise UsageError(
            f"no deployed run {run_id!r} in {ws.home}; give the id 'insitu federate server' "
            "printed (the folders of federation/runs/)"
        )
    plan = RunPlan.resumed(run_dir)
    if schema.digest() != plan.shared.schema_sha256:
        raise SchemaError(
            f"run {run_id} was planned under schema {plan.shared.schema_sha256[:12]}, not "
            f"{schema.digest()[:12]}; give the schema the run started with"
        )
    log = run_dir / "superlink.log"
    if log.exists():  # the stopped SuperLink's account of what happened, kept
        log.replace(run_dir / "superlink.stopped.log")
    return plan


def _check_sites_kept(plan: RunPlan, registered: dict[str, bytes]) -> None:
    """A resumed run admits the sites it started with; their keys must still be given."""
    missing = sorted(set(plan.sites_registered) - set(registered))
    if missing:
        raise CertificateError(
            f"run {plan.run_id} started with site(s) {', '.join(missing)}, whose key is not "
            "given now; give the same site keys (--site-key or <certs>/sites/)"
        )


def _stop_previous_flower_run(client: Any, run_dir: Path) -> None:
    """Stop the Flower run a crashed server left in the SuperLink's database, if any."""
    from flwr.proto.control_pb2 import StopRunRequest

    marker = run_dir / "flower-run"
    if not marker.is_file():
        return
    try:
        client.StopRun(StopRunRequest(run_id=int(marker.read_text())))
    except Exception as exc:  # noqa: BLE001 -- finished already, or never persisted
        logger.info("the previous Flower run was not stopped: %s", exc)


def _check_bindable(host: str, port: int, *, address: str) -> None:
    """Refuse an address this machine cannot listen on, before anything is written."""
    with contextlib.closing(socket.socket()) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise FederationError(
                f"cannot listen on {address}: {exc.strerror}; choose another --address"
            ) from exc


def _write_app(app_dir: Path) -> Path:
    """The Flower App the run ships: a module that imports ``insitu._flower_app``."""
    app_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(app_dir / "pyproject.toml", PYPROJECT.format(module=APP_MODULE))
    atomic_write_text(
        app_dir / f"{APP_MODULE}.py",
        '"""The Flower app of an insitu federation: its code is insitu\'s."""\n\n'
        "from insitu._flower_app import client_app, server_app\n\n"
        '__all__ = ["client_app", "server_app"]\n',
    )
    return app_dir


def _start_superlink(
    identity: LoopbackIdentity, *, loopback: str, plan: RunPlan, flwr_home: Path
) -> subprocess.Popen[bytes]:
    """The SuperLink process on a private loopback port, admitting only registered keys.

    Its TLS identity is for ``127.0.0.1`` only; sites reach it through the gateway. It
    runs in the run directory and logs to its ``superlink.log``.
    """
    host, port = split_address(loopback)
    run_dir = plan.run_dir
    command = [
        flower_bin("flower-superlink"),
        "--ssl-ca-certfile",
        str(identity.ca),
        "--ssl-certfile",
        str(identity.cert),
        "--ssl-keyfile",
        str(identity.key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        # On disk, so that a restarted server (--resume) finds the sites' node ids and
        # their SuperNodes, still retrying, carry on.
        "--database",
        str(run_dir / "superlink.db"),
        "--host",
        host,
        "--port",
        str(port),
    ]
    return spawn(
        command,
        log_path=run_dir / "superlink.log",
        env=child_env(flwr_home.absolute()) | {RUN_DIR_ENV: str(run_dir)},
        cwd=run_dir,
    )


def _record_registration(
    ws: Workspace,
    plan: RunPlan,
    files: FederationCerts,
    registered: dict[str, bytes],
    node_ids: dict[str, int],
    *,
    address: str,
) -> None:
    """Record which keys the server admits, and the node id Flower gave each."""
    with ws.ledger() as ledger:
        events.FEDERATION_SITES_REGISTERED.record(
            ledger,
            run=plan.run_id,
            address=address,
            ca_sha256=hashlib.sha256(files.ca.read_bytes()).hexdigest(),
            sites={name: key_fingerprint(key) for name, key in sorted(registered.items())},
            node_ids={name: node_ids[name] for name in sorted(node_ids)},
            control="loopback only; the public port serves the Fleet API",
        )


#: How long the gateway stays up after a run ends, for sites to learn it ended.
LINGER_SECONDS = 10.0


def _drive_run(
    client: Any,
    process: subprocess.Popen[bytes],
    plan: RunPlan,
    states: RunStates,
    *,
    app_dir: Path,
    address: str,
    timeout: float,
    on_status: Callable[[str], None] | None,
) -> None:
    """Submit the run, wait for its end, and tell the sites how it ended."""
    log_path = plan.run_dir / "superlink.log"
    if on_status:
        on_status(f"SuperLink on https://{address} (Fleet API only)")
    try:
        flower_run = _start_run(client, app_dir, plan.shared)
        atomic_write_text(plan.run_dir / "flower-run", f"{flower_run}\n")
        if on_status:
            on_status(f"run {plan.run_id}: waiting for {plan.config.sites} site(s)")
        _wait_for_run(
            client,
            process,
            flower_run,
            plan.run_dir,
            timeout=timeout,
            log_path=log_path,
            on_status=on_status,
        )
        finished = "error" not in json.loads((plan.run_dir / "result.json").read_text())
    except FederationError:
        states.set(plan.run_id, "failed")
        states.wait_told(plan.run_id, plan.config.sites, timeout=LINGER_SECONDS)
        raise
    states.set(plan.run_id, "finished" if finished else "failed")
    states.wait_told(plan.run_id, plan.config.sites, timeout=LINGER_SECONDS)


def _read_result(plan: RunPlan) -> dict[str, Any]:
    """The ``result.json`` the ServerApp wrote; a failed run raises its error."""
    result: dict[str, Any] = json.loads((plan.run_dir / "result.json").read_text())
    if "error" in result:
        raise FederationError(f"run {plan.run_id} failed: {result['error']}")
    return result


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
                f"({log_path}) ends with:\n{log_tail(log_path, 8)}"
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


def _register(client: Any, keys: dict[str, bytes]) -> dict[str, int]:
    """Register each site's key with the SuperLink; the node id Flower gave each.

    A key the SuperLink's database holds already (a resumed run) keeps its node id.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    known = {
        bytes(node.public_key): int(node.node_id)
        for node in client.ListNodes(ListNodesRequest()).nodes_info
        if not node.unregistered_at
    }
    node_ids: dict[str, int] = {}
    for name, openssh in sorted(keys.items()):
        public = serialization.load_ssh_public_key(openssh)
        if not isinstance(public, ec.EllipticCurvePublicKey):  # checked on load; for mypy
            raise CertificateError(f"site {name}: not an EC public key")
        raw = public_key_to_bytes(public)
        if raw in known:
            node_ids[name] = known[raw]
            continue
        response = client.RegisterNode(RegisterNodeRequest(public_key=raw, name=name))
        if not response.node_id:
            raise FederationError(f"the SuperLink did not register site {name}")
        node_ids[name] = int(response.node_id)
    return node_ids


def _start_run(client: Any, app_dir: Path, plan: SharedPlan) -> int:
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab = build_fab_from_disk(app_dir)
    response = client.StartRun(
        StartRunRequest(
            fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
            override_config=user_config_to_proto({"insitu": plan.dumps()}),
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
