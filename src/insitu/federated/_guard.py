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
_PR_SET_CHILD_SUBREAPER = 36


def _end_group(child: subprocess.Popen[bytes] | None, signum: int) -> None:
    """SIGTERM to every descendant, ``GRACE`` seconds for ``child``, SIGKILL to the rest.

    The guard then ends by ``signum`` itself, so its caller sees how it was stopped.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    _signal_all(_descendants(), signal.SIGTERM)
    deadline = time.monotonic() + GRACE
    ended = child is None or _reaped(child.pid)
    while not ended and time.monotonic() < deadline:
        time.sleep(0.05)
        ended = child is None or _reaped(child.pid)
    _signal_all(_descendants(), signal.SIGKILL)
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


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            continue


def _descendants() -> list[int]:
    """Every process below the guard (Linux: from /proc; elsewhere none are found).

    Flower's SuperExec starts a session of its own (its ServerApps leave the guard's
    group), so the guard follows parents, not groups; as a child subreaper it inherits
    every orphan below it, so a process whose parent died is still found.
    """
    try:
        entries = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    except OSError:
        return []
    children: dict[int, list[int]] = {}
    for entry in entries:
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            found.append(pid)
            todo.append(pid)
    return found


def _become_subreaper() -> None:
    """Orphans below the guard become its children, not init's (Linux 3.4+)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def main(argv: list[str]) -> int:
    """Run ``argv`` under the guard; its exit code, unless the group had to be ended."""
    if not argv:
        print("usage: python -m insitu.federated._guard COMMAND [ARG...]", file=sys.stderr)
        return 2
    started: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        _end_group(started[0] if started else None, signum)

    _become_subreaper()
    # Before the command starts: a stop that comes first still ends the group.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    started.append(subprocess.Popen(argv))  # noqa: S603 -- the caller's command, as given
    code = started[0].wait()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The command ended by itself: what it started must not outlive it.
    _signal_all(_descendants(), signal.SIGKILL)
    if code < 0:  # ended by a signal: end the same way, so the caller sees what it was
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
