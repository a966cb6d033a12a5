"""Process control for the deployment engine: Flower's executables, their environment, stops.

Shared by the server side (``_superlink``) and the site side (``_supernode``): every child
process gets :data:`insitu._privacy_env.NO_TELEMETRY_ENV` forced into its environment,
listens on loopback unless told otherwise, runs in a session of its own and is stopped as
a group with SIGTERM, then SIGKILL. A process started with :func:`spawn` also dies with
the insitu process that started it, even one killed with SIGKILL (:func:`die_with_parent`).

A child gets the rest of the insitu process's environment unchanged (no allow-list): a
site whose node key is in a token needs that. Two kinds of process write a deployed
site's ledger, and every entry is signed with the node key: the site process
(``federation.site_joined``, ``federation.site_left``, the spooled ``federation.egress``
entries) and Flower's ``flwr-clientapp``, a fresh process per message
(``federation.site_round``, ``privacy.spent``). A token's library reads its configuration
once per process (``SOFTHSM2_CONF``; ``TPM2_PKCS11_TCTI`` and ``TPM2_PKCS11_STORE`` for
tpm2-pkcs11) and each process logs in for itself, so every ClientApp needs them and the
PIN (``INSITU_PKCS11_PIN``), as a passphrase-sealed key file needs ``INSITU_PASSPHRASE``.
Handing the PIN on is deliberate: it is already in the site process's environment, which
any process of the same user can read (``/proc/PID/environ``); Flower's processes run as
that user, running insitu's own code, and learn nothing they could not read anyway. The
PIN goes into no file, command line or log.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ParamSpec, TypeVar

from insitu._atomic import open_no_follow
from insitu._privacy_env import NO_TELEMETRY_ENV
from insitu.errors import (
    FederationError,
    UsageError,
)

__all__ = [
    "APP_MODULE",
    "DEFAULT_ADDRESS",
    "PYPROJECT",
    "RUN_DIR_ENV",
    "child_env",
    "die_with_parent",
    "flower_bin",
    "free_port",
    "key_fingerprint",
    "log_tail",
    "signal_group",
    "sigterm_unwinds",
    "spawn",
    "split_address",
    "stop",
    "unwinds_on_sigterm",
]

logger = logging.getLogger(__name__)


#: Where the SuperLink listens (Fleet, Control and ServerAppIo share one HTTPS port).
DEFAULT_ADDRESS = "127.0.0.1:9092"

_P = ParamSpec("_P")
_R = TypeVar("_R")

APP_MODULE = "insitu_federation_app"
RUN_DIR_ENV = "INSITU_RUN_DIR"
PYPROJECT = """\
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


def flower_bin(name: str) -> str:
    """A Flower executable of *this* environment (never one found elsewhere on PATH)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FederationError(
            f"{name} is not installed next to {sys.executable}; reinstall insitu with "
            "its federated extra (pip install 'insitu[federated]')"
        )
    return str(path)


def child_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process insitu starts (telemetry forced off).

    Everything else is passed on as it is, a token's configuration and PIN included
    (see the module docstring): a site's ClientApps sign its ledger with its node key.
    """
    env = dict(os.environ)
    env.update(NO_TELEMETRY_ENV)
    # Flower's processes start their own children (flower-superexec, flwr-serverapp,
    # flwr-clientapp) by name: this environment's bin directory comes first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"address {address!r}: give HOST:PORT, e.g. {DEFAULT_ADDRESS}")
    return host.strip("[]"), int(port)


#: ``prctl(2)`` option: the signal a process gets when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get ``sig`` when this process dies.

    Linux's ``PR_SET_PDEATHSIG``: a site's insitu process killed with SIGKILL (which no
    ``finally`` survives) takes its SuperNode with it, and the SuperNode's own children
    follow (Flower starts ``flower-superexec`` and each ``flwr-clientapp`` with
    ``--parent-pid``: they exit when their parent is gone). A child whose parent died
    before the call is signalled at once.

    Elsewhere ``None`` (macOS has no such call; kqueue's ``NOTE_EXIT`` would need a
    watcher process): SIGTERM and SIGINT still stop the whole group (:func:`stop`), but
    a SIGKILL of the insitu process leaves its SuperNode to be stopped by hand.
    """
    if not sys.platform.startswith("linux"):
        return None
    # Resolved here, in the parent: the child calls it between fork and exec, where
    # loading a library is not safe.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before prctl: act as if it just did
            os.kill(os.getpid(), sig)

    return preexec


def spawn(
    command: list[str], *, log_path: Path, env: dict[str, str], cwd: Path
) -> subprocess.Popen[bytes]:
    """Start a Flower process that dies with this one; stop it with :func:`stop`.

    Its output goes to ``log_path``; it runs in a session of its own (its group: it and
    its descendants) under :mod:`insitu.federated._guard`, which gets
    :func:`die_with_parent`'s signal and then ends the whole group (Flower's own
    children included, which no death signal of ours reaches).
    """
    guarded = [sys.executable, "-m", "insitu.federated._guard", *command]
    with open_no_follow(log_path) as log:
        return subprocess.Popen(  # noqa: S603 -- our own executables, fixed arguments
            guarded,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=die_with_parent(),  # noqa: PLW1509 -- no threads of ours run at a start
        )


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to every process of group ``pgid``; False when none is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def stop(process: subprocess.Popen[bytes], *, grace: float = 10.0) -> None:
    """Stop a Flower process insitu started, and the processes it started.

    Each is started in a session of its own (``start_new_session``), so its process
    group holds exactly it and its descendants (SuperExec, ServerApp or ClientApps):
    SIGTERM to the group, then SIGKILL to whatever is left after ``grace`` seconds.
    """
    signal_group(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(grace)
    signal_group(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
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


def unwinds_on_sigterm(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` with SIGTERM unwinding (its ``finally`` blocks stop what it started)."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with sigterm_unwinds():
            return fn(*args, **kwargs)

    return wrapper


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def key_fingerprint(openssh_public: bytes) -> str:
    """``sha256:<hex>`` of a public key's OpenSSH blob (the bytes ``ssh-keygen -l`` hashes)."""
    import base64

    blob = base64.b64decode(openssh_public.split()[1])
    return "sha256:" + hashlib.sha256(blob).hexdigest()
