"""A site of a deployed federation: checks, its prepared data, and its SuperNode process.

:func:`join` checks that no other site process of this machine uses the same key towards
the same server, that the server answers and presents a certificate signed by the
federation's CA (retrying with exponential backoff), prepares the site's own file under
the schema into its own workspace (sealed, pseudonymized with the site's key; array data
under an array schema becomes rows of its values, as in simulation), and starts
a SuperNode that authenticates with the site's key. An unreachable server, a certificate
that does not match or a key in use fails before anything is written to the site's
workspace.

While the SuperNode runs, the site process is the one writer of the site's ledger for
what the ClientApps spool (``federation.egress``, see :mod:`._egress`), and it watches the
server (:mod:`._status`): it keeps the SuperNode up until the server ends the run the site
took part in (stopping earlier could lose its last reply, issue 15), and gives up with a
clear error when the server stops answering. A key the server will not activate (not
registered, or in use by an active node) is read from the SuperNode's log, recorded as
``federation.site_refused``, and the command exits 1. The SuperNode dies with the site
process, even one killed with SIGKILL (:func:`~._processes.die_with_parent`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from insitu._atomic import atomic_write_text
from insitu.audit import events
from insitu.data import ArraySchema, DataSchema, array_table, read_table
from insitu.errors import (
    CertificateError,
    FederationError,
    ServerUnreachableError,
    SiteRefusedError,
    UsageError,
)
from insitu.federated._attest import attest_to_server
from insitu.federated._egress import EgressSpool
from insitu.federated._plan import ArrayInput, SiteSetup, refusals_dir
from insitu.federated._processes import (
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
from insitu.federated._site_app import prepare_site_data
from insitu.federated._status import ENDED, NoAnswerError, ServerWatch, check_tls, tls_context
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
    split_address(address)  # a malformed address is a usage error, not retried
    context = tls_context(ca)
    delay, last = first_delay, ""
    for attempt in range(retries + 1):
        try:
            check_tls(address, ca, context)
        except NoAnswerError as exc:
            last = str(exc)
        else:
            return
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
    schema: DataSchema | ArraySchema,
    server: str,
    ca: Path,
    key: Path,
    name: str | None = None,
    retries: int = 5,
    once: bool = False,
    test_fraction: float = 0.2,
    on_status: Callable[[str], None] | None = None,
    poll_interval: float = 2.0,
    give_up_after: float = 60.0,
) -> JoinResult:
    """Take part in federated runs as one site; see the module docstring.

    Returns when the SuperNode stops: with ``once``, once the server has ended the first
    run this site took part in; otherwise when interrupted or when the SuperNode stops
    by itself. The server is polled every ``poll_interval`` seconds; after
    ``give_up_after`` seconds without an answer the site stops.

    Raises:
        ServerUnreachableError: the server does not answer (after retries), or stopped
            answering for ``give_up_after`` seconds.
        CertificateError: the server's certificate does not verify against ``ca``, or
            ``key`` is not a site key.
        AttestationRefusedError: the server asks for attestation and refused this
            site's TPM quote (one line, naming the PCR whose value it does not allow).
        AttestationRequiredError: the server asks for attestation and this site has no
            TPM configured (``INSITU_TPM_TCTI``).
        SiteRefusedError: the server would not activate this site's key (not
            registered, or in use by an active node), or another site process of this
            machine uses it.
        FederationError: with ``once``, the run this site took part in failed; or the
            server does not know the run; or this site refused a run (its records have
            another shape than the run's, or another schema).
        SchemaError: array records whose shape is not the schema's (nothing written).

    """
    # Checks first: nothing is written when the server, CA or key is wrong.
    folder = isinstance(schema, ArraySchema) and data.is_dir()  # a folder of images
    if not data.is_file() and not folder:
        raise UsageError(f"--data {data}: no such file")
    site_key = _load_site_key(key)
    fingerprint = key_fingerprint(site_key)
    watch = ServerWatch(server, ca, interval=poll_interval, give_up_after=give_up_after)
    with _one_site_per_key(fingerprint, server, key):
        probe_server(server, ca, retries=retries)
        # A server that requires attestation gets this site's quote (INSITU_TPM_TCTI),
        # or, with no TPM here, one line saying so, before anything is written.
        attest_to_server(server, ca, key, context=tls_context(ca))
        frame, schema, array_input = _read_data(data, schema)
        site = name or key.stem
        ws, created = _prepare_site(
            ws_home,
            frame,
            schema,
            site=site,
            source=data.name,
            test_fraction=test_fraction,
            array_input=array_input,
        )
        with ws.ledger() as ledger:
            events.FEDERATION_SITE_JOINED.record(
                ledger,
                site=site,
                server=server,
                ca_sha256=hashlib.sha256(ca.read_bytes()).hexdigest(),
                key=fingerprint,
                dataset=schema.name,
                workspace_created=created,
            )
        node = _Node(ws=ws, site=site, server=server, ca=ca, key=key, fingerprint=fingerprint)
        return _take_part(node, watch, retries=retries, once=once, on_status=on_status)


def _read_data(
    data: Path, schema: DataSchema | ArraySchema
) -> tuple[Any, DataSchema, ArrayInput | None]:
    """The site's records as a table, the table's schema, and the array input (if any).

    Array data becomes rows of its values (``insitu.data.array_table``); records whose
    shape is not the schema's are refused there, in one line, before anything is written.
    """
    if isinstance(schema, ArraySchema):
        table = array_table(data, schema)
        return table.frame, table.schema, ArrayInput.of(schema)
    frame = read_table(data)
    schema.check_columns(frame.columns, source=data.name)
    return frame, schema, None


@dataclass(frozen=True)
class _Node:
    """A joined site: its workspace, name, server, CA and key."""

    ws: Workspace
    site: str
    server: str
    ca: Path
    key: Path
    fingerprint: str


@dataclass
class _Served:
    """What the site saw while its SuperNode ran (filled in as it goes)."""

    #: Runs this site finished its part of (the ClientApp's markers).
    done: tuple[str, ...] = ()
    #: Runs this site took part in (from its egress spool and markers), first seen first.
    taken: list[str] = field(default_factory=list)
    #: The server's last word on the latest of them.
    state: str | None = None

    def note(self, runs: Iterable[str]) -> None:
        """Add runs not seen before, in their order."""
        for run in runs:
            if run not in self.taken:
                self.taken.append(run)


def _take_part(
    node: _Node,
    watch: ServerWatch,
    *,
    retries: int,
    once: bool,
    on_status: Callable[[str], None] | None,
) -> JoinResult:
    """Run the SuperNode until it stops or the server ends the run; stop it; record."""
    ws, log_path = node.ws, node.ws.supernode_log_path.absolute()

    def say(text: str) -> None:
        if on_status:
            on_status(f"{node.site}: {text}")

    spool = EgressSpool(ws.home.absolute())
    spool.ingest()  # what an earlier site process left unrecorded (it crashed)
    say(f"SuperNode connecting to https://{node.server}")
    process = _start_supernode(
        ws, server=node.server, ca=node.ca, key=node.key, retries=retries, log_path=log_path
    )
    served, refused, alone = _Served(), False, False
    try:
        _serve_runs(
            process,
            ws.runs_done_dir.absolute(),
            watch,
            spool,
            served,
            once=once,
            say=say,
            refusals=refusals_dir(ws.home.absolute()),
        )
    finally:
        alone = process.poll() is not None  # it stopped before the site stopped it
        stop(process)
        spool.ingest()
        refused = alone and not served.done and _activation_refused(log_path)
        with ws.ledger() as ledger:
            if refused:
                events.FEDERATION_SITE_REFUSED.record(
                    ledger,
                    site=node.site,
                    server=node.server,
                    key=node.fingerprint,
                    reason=_REFUSED,
                )
            else:
                events.FEDERATION_SITE_LEFT.record(ledger, site=node.site, runs=list(served.done))
    if refused:
        raise SiteRefusedError(
            f"the server at {node.server} refused this site: its key {node.fingerprint} "
            f"({node.key}) is not registered there, or is in use by an active node (another "
            "'insitu federate site' with the same key, maybe on another machine); ask the "
            f"operator to register {node.key.stem}.pub, or stop the other site"
        )
    if alone and not served.done and process.returncode not in (0, -signal.SIGTERM):
        tail = log_tail(log_path)
        raise FederationError(
            f"the SuperNode stopped with code {process.returncode}; see {log_path}: "
            f"{tail.splitlines()[-1] if tail else 'no output'}"
        )
    if once and served.state == "failed":
        raise FederationError(
            f"run {served.taken[-1]} failed at the server at {node.server} (its ledger says "
            "why: federation.failed); this site's part is in its own ledger"
        )
    return JoinResult(
        site=node.site, home=ws.home.absolute(), runs=served.done, supernode_log=log_path
    )


#: Why a refusal is recorded: Flower answers alike for both causes (see _activation_refused).
_REFUSED = (
    "the server would not activate the site's key: not registered, or in use by an active node"
)


def _prepare_site(
    ws_home: Path,
    frame: Any,
    schema: DataSchema,
    *,
    site: str,
    source: str,
    test_fraction: float,
    array_input: ArrayInput | None = None,
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
        array_input=array_input,
    )
    path = ws.site_setup_path.absolute()
    path.parent.mkdir(exist_ok=True)
    atomic_write_text(path, json.dumps(setup.to_json(), indent=2) + "\n")
    return ws, created


def _start_supernode(
    ws: Workspace, *, server: str, ca: Path, key: Path, retries: int, log_path: Path
) -> subprocess.Popen[bytes]:
    """Flower's SuperNode for this site, authenticating with the site's key.

    In a session of its own (stopped as a group with its SuperExec and ClientApps), and
    dying with this process (:func:`~._processes.spawn`).
    """
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
    return spawn(
        command,
        log_path=log_path,
        env=child_env(ws.flower_home.absolute()),
        cwd=ws.federation_dir.absolute(),
    )


def _done_runs(done_dir: Path) -> set[str]:
    """The runs marked done (a marker is written atomically: dot-named files are not yet)."""
    if not done_dir.exists():
        return set()
    return {p.name for p in done_dir.iterdir() if not p.name.startswith(".")}


def _serve_runs(
    process: subprocess.Popen[bytes],
    done_dir: Path,
    watch: ServerWatch,
    spool: EgressSpool,
    served: _Served,
    *,
    once: bool,
    say: Callable[[str], None],
    refusals: Path | None = None,
) -> None:
    """Watch the SuperNode and the server; return when the SuperNode stops.

    With ``once``, also return when the server has ended the run this site took part in.
    A run a ClientApp refused (its records are not this site's: ``refusals``) ends it
    with :class:`FederationError`, saying why.

    Each turn records what the ClientApps spooled, reads the run markers, asks the
    server about the latest run (or only whether it answers, before any run), then
    waits (``watch.pause``: the poll interval, or a backoff step).
    """
    before = _done_runs(done_dir)
    refused_before = _done_runs(refusals) if refusals else set()
    while process.poll() is None:
        if refusals is not None:
            _raise_refusal(refusals, refused_before)
        served.note(spool.ingest())
        done = tuple(sorted(_done_runs(done_dir) - before))
        for run in done:
            if run not in served.done:
                say(f"run {run}: this site's part is done; waiting for the server to end it")
        served.done = done
        served.note(done)
        current = served.taken[-1] if served.taken else None
        served.state = watch.poll(current)
        if once and current is not None and served.state in ENDED:
            say(f"run {current}: {served.state} at the server")
            return
        watch.pause()


def _raise_refusal(refusals: Path, before: set[str]) -> None:
    """Raise the reason of a run this site's ClientApp refused since ``before``."""
    for run in sorted(_done_runs(refusals) - before):
        reason = (refusals / run).read_text().strip()
        raise FederationError(reason or f"this site refused run {run}")


def _activation_refused(log_path: Path) -> bool:
    """Whether the SuperLink refused to activate the SuperNode's key (Flower's code 2004).

    Flower 1.41 answers alike for a key it never registered and for one an active node
    already uses ("[code: 2004] Failed to activate SuperNode."): its log cannot tell the
    two apart, so the message names both (a second site process of this machine with
    the same key is caught before, by :func:`_one_site_per_key`).
    """
    tail = log_tail(log_path)
    return "[code: 2004]" in tail or "Failed to activate SuperNode" in tail


def _lock_dir() -> Path | None:
    """The private directory of this user's site locks; None if there is none to trust."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    directory = base / f"insitu-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(directory)
    except OSError:
        return None
    private = stat.S_ISDIR(info.st_mode) and not info.st_mode & 0o077
    return directory if private and info.st_uid == os.getuid() else None


@contextlib.contextmanager
def _one_site_per_key(fingerprint: str, server: str, key: Path) -> Iterator[None]:
    """Hold this machine's lock on (key, server) while the site runs.

    The server refuses to activate a key an active node already uses, in the words it
    uses for an unregistered key; the likely cause, a second ``insitu federate site``
    with the same key, is found here before anything starts. The lock is ``flock``'s:
    released by the kernel however the holder ends. Without a private directory to keep
    it in, the check is skipped.

    Raises:
        SiteRefusedError: another process of this machine holds the lock.

    """
    directory = _lock_dir()
    digest = hashlib.sha256(f"{fingerprint}\n{server}".encode()).hexdigest()[:32]
    try:
        if directory is None:
            raise OSError(errno.EACCES, "no private directory")
        fd = os.open(
            directory / f"site-{digest}.lock",
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
    except OSError as exc:
        logger.info("not checking for another site with this key: %s", exc.strerror)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise SiteRefusedError(
                f"this site's key {fingerprint} ({key}) is already in use by an active "
                f"node: another 'insitu federate site' (pid {holder}) runs with it towards "
                f"{server}; stop that one, or give this site its own key"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


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
