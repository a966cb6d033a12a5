"""The egress guard: while insitu runs a model, nothing in the process talks to another host.

Built on Python's audit hooks (PEP 578). Every socket operation that reaches another
machine raises an audit event before it happens (``socket.connect``, ``socket.sendto``,
``socket.sendmsg``) and so does every name lookup (``socket.getaddrinfo``,
``socket.gethostbyname``, ``socket.gethostbyname_ex``, ``socket.gethostbyaddr``,
``socket.getnameinfo``). The hook raises :class:`~insitu.errors.EgressBlockedError` for
those events while the guard is *engaged*, which aborts the operation in whatever code
called it (a library, a plugin, a model's custom operator written in Python), and queues
a record; a writer thread appends ``egress.blocked`` entries to the ledger (the hook
itself never does I/O: it may run on any thread, inside any lock).

Allowed while engaged: loopback (``127.0.0.0/8``, ``::1``), Unix sockets, and lookups of
``localhost`` or of a literal IP address (no DNS query is made for those; connecting to
a non-loopback literal is still refused at ``connect``).

Limits (``docs/serving.md`` says what to do about them):

* an audit hook sees only what goes through CPython's ``socket`` module. Native code
  that calls ``connect(2)`` itself (a C extension, ONNX Runtime's own code, a
  subprocess) is not seen. The complement is the operating system: run the server in
  a network namespace that has only a loopback interface;
* audit hooks cannot be removed (PEP 578, by design), so the hook is installed once per
  process and switched on and off with a counter: :func:`engaged` nests.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from insitu.audit import events
from insitu.audit.events import Event
from insitu.errors import EgressBlockedError

__all__ = ["EgressGuard", "egress_guard"]

logger = logging.getLogger(__name__)

_CONNECT_EVENTS = {"socket.connect": 1, "socket.sendto": 1, "socket.sendmsg": 1}
_LOOKUP_EVENTS = {
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.gethostbyname_ex",
    "socket.gethostbyaddr",
    "socket.getnameinfo",
}

Recorder = Callable[[Event, dict[str, Any]], None]


def _loopback_host(host: Any) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _literal_ip(host: Any) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    try:
        ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False
    return True


def _destination(address: Any) -> tuple[bool, str]:
    """(allowed, what) for a socket address."""
    if isinstance(address, str | bytes):
        return True, "unix socket"  # AF_UNIX path: this machine
    if isinstance(address, tuple) and address:
        host = address[0]
        if isinstance(host, str | bytes) and _literal_ip(host):
            return _loopback_host(host), str(host if isinstance(host, str) else host.decode())
        return _loopback_host(host), str(host)
    return False, type(address).__name__


class EgressGuard:
    """The process's one guard (use :data:`egress_guard`); see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._installed = False
        self._local = threading.local()
        self._pending: Counter[tuple[str, str]] = Counter()
        self._recorders: list[Recorder] = []
        self._wake = threading.Event()
        self._writer: threading.Thread | None = None
        self.blocked = 0

    @property
    def active(self) -> bool:
        """Whether connections and lookups are being refused now."""
        return self._depth > 0

    def add_recorder(self, recorder: Recorder) -> None:
        """Call ``recorder(event, payload)`` for each batch of blocked attempts."""
        with self._lock:
            if recorder not in self._recorders:
                self._recorders.append(recorder)

    def remove_recorder(self, recorder: Recorder) -> None:
        """Stop calling ``recorder``."""
        with self._lock, contextlib.suppress(ValueError):
            self._recorders.remove(recorder)

    def engage(self) -> None:
        """Start refusing (nests: each call needs a :meth:`release`)."""
        with self._lock:
            if not self._installed:
                sys.addaudithook(self._hook)
                self._installed = True
                self._writer = threading.Thread(
                    target=self._write_loop, name="insitu-egress-ledger", daemon=True
                )
                self._writer.start()
            self._depth += 1

    def release(self) -> None:
        """Undo one :meth:`engage`."""
        with self._lock:
            self._depth = max(0, self._depth - 1)

    @contextlib.contextmanager
    def engaged(self) -> Iterator[EgressGuard]:
        """Refuse egress inside the ``with`` block."""
        self.engage()
        try:
            yield self
        finally:
            self.release()

    # -- the hook ------------------------------------------------------------------

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        # Called for every audited event of the process: return fast when it is not ours.
        if self._depth <= 0 or not event.startswith("socket."):
            return
        if event in _CONNECT_EVENTS:
            address = args[_CONNECT_EVENTS[event]] if len(args) > 1 else None
            if event == "socket.sendmsg" and address is None:
                return  # a connected socket: its connect was checked
            allowed, target = _destination(address)
        elif event in _LOOKUP_EVENTS:
            host = args[0] if args else None
            if event == "socket.getnameinfo" and isinstance(host, tuple):
                host = host[0] if host else None
            allowed = _loopback_host(host) or (event == "socket.getaddrinfo" and _literal_ip(host))
            target = str(host)
        else:
            return
        if allowed:
            return
        self.blocked += 1
        with self._lock:
            self._pending[(event, target)] += 1
        self._wake.set()
        raise EgressBlockedError(
            f"{event.removeprefix('socket.')} to {target} refused: insitu is running a model "
            "and allows loopback only (the egress guard; see docs/serving.md)"
        )

    # -- recording -----------------------------------------------------------------

    def flush(self) -> int:
        """Hand pending records to the recorders now; returns how many attempts."""
        with self._lock:
            pending, self._pending = self._pending, Counter()
            recorders = list(self._recorders)
        for (event, target), count in sorted(pending.items()):
            payload = {"event": event, "destination": target[:200], "attempts": count}
            for recorder in recorders:
                try:
                    recorder(events.EGRESS_BLOCKED, payload)
                except Exception:
                    logger.exception("cannot record a blocked egress attempt")
        return sum(pending.values())

    def _write_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self.flush()


#: The guard of this process.
egress_guard = EgressGuard()
