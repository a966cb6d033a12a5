"""``insitu serve --isolate``: the server in a network namespace with no interface up.

The egress guard (:mod:`insitu.runtime._guard`) sees what goes through CPython's
``socket`` module; native code (a C extension, ONNX Runtime's own code) and subprocesses
are outside it. The kernel's complement is a network namespace: a process in a new one
has a loopback interface that is down and no other, so nothing it runs, native or not,
can reach any host. An unprivileged user can make one inside a new user namespace
(``unshare --user --map-root-user --net``) where the kernel allows it.

The API then cannot listen on a TCP port that the host sees (the namespace's loopback is
its own), so it listens on a Unix socket, a file the host's clients connect to
(``curl --unix-socket``, ``httpx.HTTPTransport(uds=...)``); the bearer token is still
required. The isolated process re-checks its namespace before serving: an
``INSITU_ISOLATED`` set by hand in an ordinary shell is refused.

Written by hand: no library starts a process in a network namespace for us; the work is
the ``unshare(1)`` command line (util-linux) and reading ``/proc/net/dev``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

from insitu.errors import IsolationError

__all__ = [
    "ISOLATED_ENV",
    "check_isolated",
    "isolated_environment",
    "isolation_command",
    "network_interfaces",
]

#: Set in the environment of the process started in the new namespace.
ISOLATED_ENV = "INSITU_ISOLATED"

_UNSHARE = ["--user", "--map-root-user", "--net"]
_SIOCGIFFLAGS = 0x8913  # linux/sockios.h
_IFF_UP = 0x1


def network_interfaces() -> dict[str, bool]:
    """The network interfaces this process sees, and whether each is up.

    Both from this process's own network namespace: ``/proc/net/dev`` and the
    ``SIOCGIFFLAGS`` ioctl (``/sys/class/net`` would show the host's, as sysfs is not
    remounted in a new namespace).
    """
    names = [
        line.split(":", 1)[0].strip()
        for line in Path("/proc/net/dev").read_text(encoding="ascii").splitlines()[2:]
    ]
    found: dict[str, bool] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for name in names:
            request = struct.pack("16sH14s", name.encode()[:15], 0, b"")
            try:
                reply = fcntl.ioctl(probe.fileno(), _SIOCGIFFLAGS, request)
                found[name] = bool(struct.unpack("16sH14s", reply)[1] & _IFF_UP)
            except OSError:
                found[name] = True  # unknown: assume the worst
    return found


def isolation_command(argv: list[str]) -> list[str]:
    """The command line that runs ``insitu`` with ``argv`` in a new network namespace.

    Raises:
        IsolationError: ``unshare`` is missing, or the kernel refuses the namespaces
            (unprivileged user namespaces switched off).

    """
    unshare = shutil.which("unshare")
    if unshare is None:
        raise IsolationError(
            "cannot isolate the server: the 'unshare' command (util-linux) is not installed; "
            "install it, or run 'insitu serve' in a unit with PrivateNetwork=yes"
        )
    probe = subprocess.run(  # noqa: S603 -- a fixed command line
        [unshare, *_UNSHARE, "true"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        reason = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "refused"
        raise IsolationError(
            f"cannot isolate the server: the kernel refused a new user and network "
            f"namespace ({reason}); allow unprivileged user namespaces "
            "(sysctl user.max_user_namespaces, kernel.apparmor_restrict_unprivileged_userns), "
            "or run 'insitu serve' in a unit with PrivateNetwork=yes"
        )
    entry = "from insitu.cli import main; main()"
    return [unshare, *_UNSHARE, "--", sys.executable, "-c", entry, *argv]


def check_isolated() -> None:
    """Refuse to serve as isolated unless no network interface is up here.

    Raises:
        IsolationError: an interface is up (the namespace is not a fresh one).

    """
    up = sorted(name for name, is_up in network_interfaces().items() if is_up)
    if up:
        raise IsolationError(
            f"{ISOLATED_ENV} is set but this process sees network interfaces up "
            f"({', '.join(up)}); start the server with 'insitu serve --isolate', not by "
            f"setting {ISOLATED_ENV}"
        )


def isolated_environment() -> dict[str, str]:
    """The environment of the isolated process."""
    return {**os.environ, ISOLATED_ENV: "1"}
