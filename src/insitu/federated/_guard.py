"""A guard process: a Flower process tree that ends when the insitu process that started it dies.

``python -m insitu.federated._guard COMMAND...`` leads a process group of its own (the
caller starts it in a new session, with ``PR_SET_PDEATHSIG``: see
:func:`~insitu.federated._processes.spawn`) and runs ``COMMAND`` in that group. When the
guard is told to stop (SIGTERM or SIGINT: by :func:`~insitu.federated._processes.stop`,
or by the kernel because the insitu process died, even of SIGKILL), it sends SIGTERM to
the whole group, waits up to :data:`GRACE` seconds for the command, SIGKILLs whatever
is left of the group (itself too, if the command did not stop) and ends by the signal it
got. When the command ends by itself, whatever it left in the group is killed too.

Why a process of its own: the death signal set with ``prctl`` is not inherited across
``fork``, and Flower's own watch of a parent (``--parent-pid``) is polled by a process
that may be busy: a ``flwr-serverapp`` waiting on replies outlived its killed server by
minutes in a test run. Only a process whose one job is to wait can promise the group ends.
Standard library only, so that it costs a bare interpreter's start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

__all__ = ["GRACE", "main"]

#: Seconds the command gets to stop after SIGTERM before the group is killed.
GRACE = 5.0


def _end_group(child: subprocess.Popen[bytes] | None, signum: int) -> None:
    """SIGTERM to the group, ``GRACE`` seconds for ``child``, SIGKILL to what is left.

    The guard then ends by ``signum`` itself, so its caller sees how it was stopped (or by
    SIGKILL with the group, when the command did not stop within ``GRACE``).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + GRACE
    ended = child is not None and _reaped(child.pid)
    while child is not None and not ended and time.monotonic() < deadline:
        time.sleep(0.05)
        ended = _reaped(child.pid)
    if not ended:
        os.killpg(0, signal.SIGKILL)  # the guard too: nothing of the group survives
    _kill_rest()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _reaped(pid: int) -> bool:
    """Whether ``pid`` has ended, reaping it here.

    ``Popen.poll`` cannot reap inside the signal handler that interrupted its ``wait``,
    whose lock it holds.
    """
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def _kill_rest() -> None:
    for pid in _rest_of_group():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue


def main(argv: list[str]) -> int:
    """Run ``argv`` under the guard; its exit code, unless the group had to be ended."""
    if not argv:
        print("usage: python -m insitu.federated._guard COMMAND [ARG...]", file=sys.stderr)
        return 2
    started: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        _end_group(started[0] if started else None, signum)

    # Before the command starts: a stop that comes first still ends the group.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    started.append(subprocess.Popen(argv))  # noqa: S603 -- the caller's command, as given
    code = started[0].wait()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _kill_rest()  # the command ended by itself: what it started must not outlive it
    if code < 0:  # ended by a signal: end the same way, so the caller sees what it was
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _rest_of_group() -> list[int]:
    """The other processes of this group (Linux: from /proc; elsewhere none are found)."""
    try:
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    except OSError:
        return []
    group, own = os.getpgrp(), os.getpid()
    rest = []
    for pid in pids:
        try:
            if pid != own and os.getpgid(pid) == group:
                rest.append(pid)
        except OSError:
            continue
    return rest


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
