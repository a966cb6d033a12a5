"""The server's one public port: Flower's Fleet API, and nothing else, in front of the SuperLink.

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (register keys, start,
list and stop runs) and the ServerAppIo/Runtime API (the ServerApp's own calls) on one
HTTPS port, and its open-source build authenticates only SuperNodes on it: anyone who
reaches that port with the public ``ca.pem`` could register a key of their own through
the Control API (``flwr supernode register``), read every run's configuration, start runs
and stop them. Flower's separate Control and ServerAppIo addresses were removed when the
APIs moved to HTTP, and its account authentication (OIDC) is in the enterprise build
only. So insitu writes this piece by hand (no maintained library filters Flower's routes):

* the SuperLink listens on ``127.0.0.1`` (a private port, a throw-away TLS identity for
  loopback only: :func:`~insitu.federated._certs.make_loopback_identity`), where only
  the operator's ``insitu federate server`` and Flower's processes on the server dial it;
* this gateway listens where sites dial, with the federation's server certificate, and
  forwards exactly the Fleet operations a SuperNode makes (``POST /v1/fleet/<op>``),
  headers and body untouched, so Flower's own SuperNode authentication (a signed
  timestamp per request, checked against the registered keys) still decides who is a
  site. Every other path, method or operation is answered 404 here and never reaches
  the SuperLink;
* insitu's own routes: ``GET /insitu/v1/runs/<run id>`` says whether a run is
  ``running``, ``finished`` or ``failed``, so that sites keep their SuperNode up until
  the server has collected their last reply (a SuperNode that leaves early has its
  stored reply replaced by ``NODE_UNAVAILABLE``); ``GET /insitu/v1/attest/challenge``
  says whether this server requires attestation (``required`` and the PCRs, and
  whether the AK must be bound to a certified EK, or ``off``), so a site without a
  TPM is told in one line before it starts a SuperNode;
  with ``--attest``, ``POST`` on the challenge and quote routes runs the exchange
  (:mod:`insitu.federated._attest`).

The gateway runs on uvicorn in a thread of the server's process, with the plain asyncio
loop (uvloop's sockets would bypass the egress guard), and connects to nothing but the
SuperLink's loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from insitu.errors import FederationError

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from insitu.federated._attest import SiteAdmission

__all__ = ["FLEET_OPERATIONS", "FleetGateway", "RunStates"]

logger = logging.getLogger(__name__)

#: The Fleet API operations a SuperNode makes (``flwr.supernode.fleet_http_client``).
FLEET_OPERATIONS = frozenset(
    {
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    }
)

#: Request headers that belong to one connection, not to the request (RFC 9110 7.6.1).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
#: A Fleet request's body at most (Flower splits models into objects far smaller).
MAX_BODY = 256 * 1024 * 1024
#: The Fleet request header that carries a SuperNode's public key (base64 PEM).
_NODE_KEY_HEADER = "flwr-public-key"
#: An attestation request's body at most.
_MAX_ATTEST_BODY = 64 * 1024
_RUN_STATES = ("running", "finished", "failed")


class RunStates:
    """The state of each run this server knows, as the gateway reports it to sites."""

    def __init__(self) -> None:
        self._states: dict[str, str] = {}
        self._told: dict[str, int] = {}
        self._changed = threading.Condition()

    def set(self, run_id: str, state: str) -> None:
        """Set ``run_id``'s state: ``running``, ``finished`` or ``failed``."""
        if state not in _RUN_STATES:
            raise ValueError(f"run state {state!r}: use one of {', '.join(_RUN_STATES)}")
        with self._changed:
            self._states[run_id] = state
            self._told[run_id] = 0

    def get(self, run_id: str) -> str | None:
        """The state of ``run_id`` (None for a run this server does not know), as told."""
        with self._changed:
            state = self._states.get(run_id)
            if state is not None and state != "running":
                self._told[run_id] += 1
                self._changed.notify_all()
            return state

    def wait_told(self, run_id: str, sites: int, *, timeout: float) -> bool:
        """Wait until ``sites`` answers have told ``run_id``'s final state, or ``timeout``.

        Requests are not authenticated, so this counts answers, not sites: it only
        shortens the wait when every site polls at once.
        """
        with self._changed:
            return self._changed.wait_for(lambda: self._told.get(run_id, 0) >= sites, timeout)


@dataclass(frozen=True)
class _Upstream:
    url: str
    ca: Path


def _json(status: int, body: dict[str, Any]) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status)


def _app(upstream: _Upstream, states: RunStates, admission: SiteAdmission | None = None) -> Any:
    """The gateway's ASGI application (Starlette); with ``admission``, sites must attest."""
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    client: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        context = ssl.create_default_context(cafile=str(upstream.ca))
        async with httpx.AsyncClient(
            base_url=upstream.url, verify=context, timeout=httpx.Timeout(120.0, connect=10.0)
        ) as http:
            client["http"] = http
            yield

    async def fleet(request: Request) -> Response:
        operation = request.path_params["operation"]
        if operation not in FLEET_OPERATIONS:
            return _refuse(request)
        if admission is not None and not admission.admits(request.headers.get(_NODE_KEY_HEADER)):
            return _json(
                403,
                {
                    "error": "this site has not attested: this server admits a site after a "
                    "fresh TPM quote (set INSITU_TPM_TCTI at the site)"
                },
            )
        body = await request.body()
        if len(body) > MAX_BODY:
            return _json(413, {"error": f"a Fleet request of at most {MAX_BODY} bytes"})
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            answer = await client["http"].post(
                f"/v1/fleet/{operation}", content=body, headers=headers
            )
        except httpx.HTTPError as exc:
            logger.warning("gateway: the SuperLink did not answer %s: %s", operation, exc)
            return _json(503, {"error": "the federation server is not ready; retry"})
        kept = {
            k: v
            for k, v in answer.headers.items()
            if k.lower() not in _HOP_BY_HOP | {"content-encoding"}
        }
        return Response(answer.content, status_code=answer.status_code, headers=kept)

    async def run_state(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        state = states.get(run_id)
        if state is None:
            return _json(404, {"error": f"this server has no run {run_id[:64]!r}"})
        return _json(200, {"run": run_id, "state": state})

    async def refuse(request: Request) -> Response:
        return _refuse(request)

    async def attest(request: Request) -> Response:
        if admission is None:  # routed only with an admission
            return _refuse(request)
        body = await request.body()
        if len(body) > _MAX_ATTEST_BODY:
            return _json(413, {"error": f"at most {_MAX_ATTEST_BODY} bytes of attestation"})
        try:
            document = json.loads(body)
        except ValueError:
            return _json(400, {"error": "an attestation request is a JSON object"})
        step = admission.challenge if request.url.path.endswith("/challenge") else admission.check
        status, answer = await asyncio.to_thread(step, document)
        return _json(status, answer)

    async def attest_required(_: Request) -> Response:
        # Served by every server, so a site without a TPM learns before it starts its
        # SuperNode that this one requires attestation (and an older site, the 403).
        if admission is None:
            return _json(200, {"attestation": "off"})
        required: dict[str, Any] = {"attestation": "required", "pcrs": admission.pcrs}
        if admission.binds_ek:
            required["ek"] = "required"
        return _json(200, required)

    attestation = (
        [Route("/insitu/v1/attest/{step:str}", attest, methods=["POST"])] if admission else []
    )

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(
        routes=[
            Route("/v1/fleet/{operation}", fleet, methods=["POST"]),
            Route("/insitu/v1/runs/{run_id}", run_state, methods=["GET"]),
            Route("/insitu/v1/attest/challenge", attest_required, methods=["GET"]),
            *attestation,
            Route("/{path:path}", refuse, methods=methods),
        ],
        lifespan=lifespan,
    )


def _refuse(request: Request) -> Response:
    client = request.client.host if request.client else "?"
    logger.warning("gateway: refused %s %s from %s", request.method, request.url.path, client)
    return _json(
        404,
        {"error": "not served on this port: it carries the Fleet API of SuperNodes only"},
    )


class FleetGateway:
    """The public port of a deployed server: see the module docstring.

    Use as a context manager: the port is bound on entry (an address this machine cannot
    listen on raises :class:`~insitu.errors.FederationError` there) and the gateway
    stops on exit.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        certfile: Path,
        keyfile: Path,
        upstream: str,
        upstream_ca: Path,
        states: RunStates,
        admission: SiteAdmission | None = None,
    ) -> None:
        self.address = f"{host}:{port}"
        self._host, self._port = host, port
        self._certfile, self._keyfile = certfile, keyfile
        self._app = _app(_Upstream(upstream, upstream_ca), states, admission)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        #: What stopped the gateway's thread, if anything did.
        self.error: BaseException | None = None

    def __enter__(self) -> FleetGateway:
        import uvicorn

        sock = _listen(self._host, self._port)
        config = uvicorn.Config(
            self._app,
            ssl_certfile=str(self._certfile),
            ssl_keyfile=str(self._keyfile),
            loop="asyncio",
            http="h11",
            ws="none",
            lifespan="on",
            log_config=None,
            access_log=False,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._serve, args=(sock,), name="insitu-fleet-gateway", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise FederationError(
                    f"the Fleet gateway did not start on {self.address}: "
                    f"{self.error or 'no answer within 30 s'}"
                )
            time.sleep(0.02)
        return self

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            try:
                asyncio.run(self._server.serve(sockets=[sock]))
            except BaseException as exc:  # reported by __enter__, or logged
                self.error = exc
                logger.exception("the Fleet gateway on %s stopped", self.address)

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise FederationError(
            f"cannot listen on {host}:{port}: {exc.strerror}; choose another --address"
        ) from exc
    sock.set_inheritable(False)
    return sock
