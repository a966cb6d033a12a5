"""A site of a deployed federation: checks, its prepared data, and its SuperNode process.

:func:`join` checks that the server answers and presents a certificate signed by the
federation's CA (retrying with exponential backoff), prepares the site's own file under
the schema into its own workspace (sealed, pseudonymized with the site's key), and starts
a SuperNode that authenticates with the site's key. An unreachable server or a
certificate that does not match fails before anything is written to the site's
workspace; an unregistered key is found when the SuperNode tries to activate, recorded in
the site's ledger, and the command exits 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from insitu._atomic import atomic_write_text, open_no_follow
from insitu.audit import events
from insitu.data import DataSchema, read_table
from insitu.errors import (
    CertificateError,
    FederationError,
    ServerUnreachableError,
    SiteRefusedError,
    UsageError,
)
from insitu.federated._plan import SiteSetup
from insitu.federated._processes import (
    child_env,
    flower_bin,
    free_port,
    key_fingerprint,
    log_tail,
    split_address,
    stop,
    unwinds_on_sigterm,
)
from insitu.federated._site_app import prepare_site_data
from insitu.workspace import Workspace

__all__ = ["JoinResult", "join", "probe_server"]

logger = logging.getLogger(__name__)


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
    host, port = split_address(address)
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


@dataclass(frozen=True)
class JoinResult:
    """What a site did while it was joined: the runs it completed, where its record is."""

    site: str
    home: Path
    runs: tuple[str, ...]
    supernode_log: Path

    def to_json(self) -> dict[str, Any]:
        """A JSON summary."""
        return {
            "site": self.site,
            "home": str(self.home),
            "runs": list(self.runs),
            "supernode_log": str(self.supernode_log),
        }


@unwinds_on_sigterm
def join(
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
) -> JoinResult:
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
    site = name or key.stem
    ws, created = _prepare_site(
        ws_home, frame, schema, site=site, source=data.name, test_fraction=test_fraction
    )
    with ws.ledger() as ledger:
        events.FEDERATION_SITE_JOINED.record(
            ledger,
            site=site,
            server=server,
            ca_sha256=hashlib.sha256(ca.read_bytes()).hexdigest(),
            key=key_fingerprint(site_key),
            dataset=schema.name,
            workspace_created=created,
        )
    log_path = ws.supernode_log_path.absolute()
    if on_status:
        on_status(f"{site}: SuperNode connecting to https://{server}")
    runs: tuple[str, ...] = ()
    process = _start_supernode(
        ws, server=server, ca=ca, key=key, retries=retries, log_path=log_path
    )
    try:
        runs = _serve_runs(process, ws.runs_done_dir.absolute(), log_path=log_path, once=once)
    finally:
        stop(process)
        with ws.ledger() as ledger:
            events.FEDERATION_SITE_LEFT.record(ledger, site=site, runs=list(runs))
    if not runs and process.returncode not in (0, -signal.SIGTERM):
        raise _supernode_failure(
            process.returncode, log_path, server=server, key=key, site_key=site_key
        )
    return JoinResult(site=site, home=ws.home.absolute(), runs=runs, supernode_log=log_path)


def _prepare_site(
    ws_home: Path,
    frame: Any,
    schema: DataSchema,
    *,
    site: str,
    source: str,
    test_fraction: float,
) -> tuple[Workspace, bool]:
    """The site's workspace (and whether this call created it), its data prepared.

    A workspace this call created is removed again when preparation fails: nothing
    half-made stays behind.
    """
    ws, created = Workspace.init(ws_home, name=site)  # opens an existing one
    try:
        train_dir, test_dir = prepare_site_data(
            ws, frame, schema, test_fraction=test_fraction, source=source
        )
    except BaseException:
        if created:
            shutil.rmtree(ws.home, ignore_errors=True)
        raise
    setup = SiteSetup(
        site=site,
        dataset=schema.name,
        schema_sha256=schema.digest(),
        train_dir=train_dir,
        test_dir=test_dir,
    )
    path = ws.site_setup_path.absolute()
    path.parent.mkdir(exist_ok=True)
    atomic_write_text(path, json.dumps(setup.to_json(), indent=2) + "\n")
    return ws, created


def _start_supernode(
    ws: Workspace, *, server: str, ca: Path, key: Path, retries: int, log_path: Path
) -> subprocess.Popen[bytes]:
    """Flower's SuperNode for this site, authenticating with the site's key."""
    command = [
        flower_bin("flower-supernode"),
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
        str(free_port()),
        "--max-retries",
        str(retries),
    ]
    with open_no_follow(log_path) as log:
        return subprocess.Popen(  # noqa: S603 -- our own executable, fixed arguments
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(ws.flower_home.absolute()),
            cwd=ws.federation_dir.absolute(),
            start_new_session=True,
        )


def _serve_runs(
    process: subprocess.Popen[bytes], done_dir: Path, *, log_path: Path, once: bool
) -> tuple[str, ...]:
    """Wait while the SuperNode takes part in runs; the runs completed meanwhile."""
    before = set(done_dir.iterdir()) if done_dir.exists() else set()
    runs: tuple[str, ...] = ()
    while process.poll() is None:
        if done_dir.exists():
            # A marker is written atomically (a dot-named temporary file, then a
            # rename): only the renamed files are runs.
            done = {p for p in done_dir.iterdir() if not p.name.startswith(".")}
            runs = tuple(sorted(p.name for p in done - before))
            if runs and once:
                _wait_for_last_reply(process, log_path, sent_before=_sent(log_path))
                break
        time.sleep(0.5)
    return runs


def _supernode_failure(
    code: int | None, log_path: Path, *, server: str, key: Path, site_key: bytes
) -> FederationError:
    """The error for a SuperNode that stopped before completing any run."""
    tail = log_tail(log_path)
    if "2004" in tail or "Failed to activate SuperNode" in tail:
        return SiteRefusedError(
            f"the server at {server} refused this site: its key {key_fingerprint(site_key)}"
            f" ({key}) is not registered; ask the operator to register {key.stem}.pub"
        )
    return FederationError(
        f"the SuperNode stopped with code {code}; see {log_path}: "
        f"{tail.splitlines()[-1] if tail else 'no output'}"
    )


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
