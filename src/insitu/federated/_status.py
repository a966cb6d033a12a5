"""The server's word on a run, as a site reads it: until when a site keeps its SuperNode up.

A site must not stop its SuperNode when its own part of a run is over. Its last reply
(the final round's evaluation) may still wait in the SuperLink for the ServerApp's next
pull (every 3 s), and a SuperLink replaces the stored reply of a node gone offline with
``NODE_UNAVAILABLE``: the round would lose the site's accuracy (issue 15). So a site asks
the server, on the TLS port it dials (the server's gateway), verifying the server's
certificate against the federation's CA as :func:`~insitu.federated.probe_server` does::

    GET /insitu/v1/runs/<run id>
      200 {"run": "<run id>", "state": "running" | "finished" | "failed"}
      404 {"error": "..."}                       a run the server does not know

and stops its SuperNode only once the run is finished or failed. :class:`ServerWatch`
polls (every ``interval`` seconds, 2 by default) and, while the server does not answer
(refused, reset, timed out, a 5xx), backs off: 0.5 s, doubling, at most 8 s between
attempts. After ``give_up_after`` seconds without an answer (60 by default) the server is
taken for gone: :class:`~insitu.errors.ServerUnreachableError`, naming the address and
how long the site tried. A certificate that does not verify, a 404 or an answer of
another shape are not retried: a clear error at once.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from insitu.errors import CertificateError, FederationError, ServerUnreachableError
from insitu.federated._processes import split_address

__all__ = [
    "ENDED",
    "RUN_STATES",
    "STATUS_PATH",
    "NoAnswerError",
    "ServerWatch",
    "certificate_refused",
    "check_tls",
    "fetch_run_state",
    "tls_context",
]

logger = logging.getLogger(__name__)

#: Where the server's gateway answers for a run (followed by the quoted run id).
STATUS_PATH = "/insitu/v1/runs/"
RUN_STATES = ("running", "finished", "failed")
#: The states after which a site may stop its SuperNode.
ENDED = frozenset({"finished", "failed"})
_MAX_BODY = 64 * 1024


class NoAnswerError(Exception):
    """The server did not answer this time (a retry may do); the message says how.

    Internal to the federated package: callers turn it into ServerUnreachableError.
    """


def tls_context(ca: Path) -> ssl.SSLContext:
    """A client TLS context trusting only the federation's CA (host names checked).

    Raises:
        CertificateError: the CA file cannot be read or holds no certificate.

    """
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(
            f"cannot load the federation CA {ca}: {exc}; give the ca.pem the server operator sent"
        ) from exc


def certificate_refused(
    address: str, ca: Path, exc: ssl.SSLCertVerificationError
) -> CertificateError:
    """The error for a server whose certificate ``ca`` does not verify."""
    return CertificateError(
        f"the server at {address} presented a certificate that {ca} does not "
        f"verify ({exc.verify_message}); get the federation's ca.pem from the "
        "server operator, or check the address"
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def _connection(
    address: str, ca: Path, context: ssl.SSLContext, *, timeout: float
) -> Iterator[ssl.SSLSocket]:
    """A verified TLS connection to the server, closed on the way out whatever happens.

    The socket is wrapped before it connects: CPython's ``wrap_socket`` of a connected
    socket that the peer has just reset raises without closing what it made (a
    server going away while a site dials it does exactly that).

    Raises:
        CertificateError: the server's certificate does not verify against ``ca``.
        NoAnswerError: no connection, or it broke (refused, reset, timed out).

    """
    host, port = split_address(address)
    try:
        family, kind, proto, _, target = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with context.wrap_socket(socket.socket(family, kind, proto), server_hostname=host) as tls:
            tls.settimeout(timeout)
            tls.connect(target)
            yield tls
    except ssl.SSLCertVerificationError as exc:
        raise certificate_refused(address, ca, exc) from exc
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        raise NoAnswerError(_reason(exc)) from exc


def check_tls(address: str, ca: Path, context: ssl.SSLContext, *, timeout: float = 5.0) -> None:
    """One TLS handshake with the server (its certificate verified), then close.

    Raises:
        CertificateError: the server's certificate does not verify against ``ca``.
        NoAnswerError: no handshake (refused, reset, timed out).

    """
    with _connection(address, ca, context, timeout=timeout):
        return


def fetch_run_state(
    address: str, ca: Path, context: ssl.SSLContext, run_id: str, *, timeout: float = 5.0
) -> str:
    """The server's state of ``run_id``: ``running``, ``finished`` or ``failed``.

    One ``GET`` over a connection of its own (``Connection: close``), parsed by
    :class:`http.client.HTTPResponse`, and every file and socket closed explicitly (a
    reset mid-answer leaves nothing for the garbage collector).

    Raises:
        CertificateError: the server's certificate does not verify against ``ca``.
        FederationError: the server does not know the run (404), or answered with
            something other than the status of this run.
        NoAnswerError: no answer this time (refused, reset, timed out, a 5xx).

    """
    host, port = split_address(address)
    path = STATUS_PATH + quote(run_id, safe="")
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: application/json\r\n"
        "User-Agent: insitu-site\r\nConnection: close\r\n\r\n"
    )
    with _connection(address, ca, context, timeout=timeout) as tls:
        tls.sendall(request.encode("ascii"))
        response = http.client.HTTPResponse(tls, method="GET")
        try:
            response.begin()
            status, body = response.status, response.read(_MAX_BODY)
        finally:
            response.close()
    return _state_of(address, run_id, path, status, body)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def _state_of(address: str, run_id: str, path: str, status: int, body: bytes) -> str:
    """The run's state from the server's answer (see the module docstring)."""
    document = _json(body)
    if status == 200:
        if (
            isinstance(document, dict)
            and document.get("run") == run_id
            and document.get("state") in RUN_STATES
        ):
            return str(document["state"])
        raise FederationError(
            f"the server at {address} answered GET {path} with {body[:120]!r}, not the "
            f"state of run {run_id}; run the same insitu version on the server and sites"
        )
    if status == 404:
        if isinstance(document, dict) and "error" in document:
            raise FederationError(
                f"the server at {address} does not know run {run_id} "
                f"({str(document['error'])[:200]}): it was restarted, or this site took "
                "part in another server's run; start the site again"
            )
        raise FederationError(
            f"the server at {address} has no run status endpoint (GET {path}: 404); it "
            "runs an older insitu than this site: run the same version on both"
        )
    if status >= 500:
        raise NoAnswerError(f"HTTP {status}")
    raise FederationError(
        f"the server at {address} answered GET {path} with HTTP {status}; run the same "
        "insitu version on the server and sites"
    )


@dataclass
class ServerWatch:
    """Polls the server for a run's state, backing off while it does not answer.

    Use :meth:`poll` and :meth:`pause` in a loop that has other work (the site's), or
    :meth:`wait_for_end`. ``sleep`` and ``clock`` are injectable for tests.
    """

    address: str
    ca: Path
    interval: float = 2.0
    give_up_after: float = 60.0
    first_delay: float = 0.5
    max_delay: float = 8.0
    timeout: float = 5.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    _context: ssl.SSLContext = field(init=False, repr=False)
    _failing_since: float | None = field(default=None, init=False)
    _delay: float = field(default=0.0, init=False)
    _attempts: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        split_address(self.address)  # a UsageError now, not at the first poll
        self._context = tls_context(self.ca)

    def poll(self, run_id: str | None) -> str | None:
        """The state of ``run_id``, or None if the server did not answer this time.

        Without a run, only checks that the server completes a TLS handshake (None
        either way).

        Raises:
            ServerUnreachableError: no answer for ``give_up_after`` seconds.
            CertificateError: the server's certificate does not verify.
            FederationError: the server does not know the run, or answered oddly.

        """
        try:
            if run_id is None:
                check_tls(self.address, self.ca, self._context, timeout=self.timeout)
                state = None
            else:
                state = fetch_run_state(
                    self.address, self.ca, self._context, run_id, timeout=self.timeout
                )
        except NoAnswerError as exc:
            self._no_answer(str(exc))
            return None
        if self._failing_since is not None:
            logger.info("the server at %s answers again", self.address)
        self._failing_since = None
        return state

    def _no_answer(self, reason: str) -> None:
        now = self.clock()
        if self._failing_since is None:
            self._failing_since, self._delay, self._attempts = now, self.first_delay, 0
        self._attempts += 1
        waited = now - self._failing_since
        if waited >= self.give_up_after:
            raise ServerUnreachableError(
                f"the federation server at {self.address} has not answered for "
                f"{waited:.0f} s ({self._attempts} attempts; last: {reason}); this site "
                "stopped its SuperNode: check that 'insitu federate server' runs there, "
                "then start the site again"
            )
        logger.warning(
            "the server at %s does not answer (%s); trying again for %.0f s more",
            self.address,
            reason,
            self.give_up_after - waited,
        )

    def pause(self) -> None:
        """Wait before the next poll: ``interval``, or the next backoff step."""
        if self._failing_since is None:
            self.sleep(self.interval)
            return
        left = self.give_up_after - (self.clock() - self._failing_since)
        delay = min(self._delay, max(left, 0.0))
        self._delay = min(self._delay * 2, self.max_delay)
        self.sleep(delay)

    def wait_for_end(self, run_id: str, *, between: Callable[[], None] | None = None) -> str:
        """Poll until ``run_id`` is finished or failed; that state.

        ``between`` runs before every poll (the site ingests its egress spool there).
        """
        while True:
            if between is not None:
                between()
            state = self.poll(run_id)
            if state in ENDED:
                return str(state)
            self.pause()
