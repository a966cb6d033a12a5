"""Process control for the deployment engine: Flower's executables, their environment, stops.

Shared by the server side (``_superlink``) and the site side (``_supernode``): every child
process gets :data:`insitu._privacy_env.NO_TELEMETRY_ENV` forced into its environment,
listens on loopback unless told otherwise, and is stopped with SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
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
    "flower_bin",
    "free_port",
    "key_fingerprint",
    "log_tail",
    "sigterm_unwinds",
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"address {address!r}: give HOST:PORT, e.g. {DEFAULT_ADDRESS}")
    return host.strip("[]"), int(port)


def stop(process: subprocess.Popen[bytes], *, grace: float = 10.0) -> None:
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
