"""Running the API with uvicorn: the CLI's foreground server and an in-process one.

Binding rules (checked before anything is loaded): loopback by default; any other
address is refused unless ``expose`` is set *and* a TLS certificate and key are given,
because the bearer token must not cross a network in the clear. ``--host`` must be an
IP address or ``localhost``: resolving a name would itself be refused by the egress
guard.

:func:`running` starts the server on a background thread (uvicorn only installs signal
handlers on the main thread) and yields a :class:`RunningServer` once it accepts
connections; the quickstart and the tests use it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from insitu.errors import (
    CannotListenError,
    InsituError,
    InvalidInputError,
    MissingDependencyError,
    UsageError,
)
from insitu.runtime import LoadedModel, ModelRuntime
from insitu.serve._app import Background, create_app
from insitu.serve._metrics import MetricsSnapshot, ServeMetrics

if TYPE_CHECKING:
    from fastapi import APIRouter, FastAPI

    from insitu.workspace import Workspace

__all__ = ["DEFAULT_HOST", "RunningServer", "check_bind", "running", "serve", "site_background"]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
_BACKGROUND_ROWS = 100


def check_bind(
    host: str, *, expose: bool = False, certfile: Path | None = None, keyfile: Path | None = None
) -> bool:
    """Refuse a bind the operator did not ask for explicitly; returns whether TLS is on.

    Raises:
        UsageError: a non-loopback host without ``expose`` and TLS, or a bad host.

    """
    if host != "localhost":
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(
                f"--host {host!r} is not an IP address; give one (127.0.0.1 by default)"
            ) from None
        loopback = address.is_loopback
    else:
        loopback = True
    if (certfile is None) != (keyfile is None):
        raise UsageError("give --tls-cert and --tls-key together")
    for path in (certfile, keyfile):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"TLS file {path} does not exist")
    if not loopback:
        if not expose:
            raise UsageError(
                f"refusing to listen on {host}, beyond this machine; the API is for local "
                "use. Add --expose with --tls-cert and --tls-key if you really mean it"
            )
        if certfile is None:
            raise UsageError(
                f"--expose on {host} needs --tls-cert and --tls-key: the bearer token must "
                "not cross a network in the clear"
            )
    return certfile is not None


def site_background(workspace: Workspace) -> Any:
    """A function giving a model's background sample from this site's prepared data.

    Looks for a sealed release under ``<home>/prepared/<model name>/`` (what ``insitu
    data prepare`` and the federated sites write) and takes up to 100 records of it,
    with consent applied (recorded in the ledger as any use of the data is).
    """

    def find(name: str) -> Background | None:
        try:
            from insitu.data import SiteDataset
        except ModuleNotFoundError as exc:  # a device install: no pandas to read a release
            raise MissingDependencyError(
                "explanations read this site's prepared records with pandas, which this "
                "install lacks; install the extra that brings it: pip install 'insitu[serve]'"
            ) from exc

        base = workspace.prepared_dir(name)
        releases = sorted(p.parent for p in base.glob("*/manifest.json")) if base.is_dir() else []
        if (base / "manifest.json").is_file():
            releases.insert(0, base)
        empty: list[str] = []
        for directory in releases:
            try:
                data = SiteDataset.open(workspace, directory).for_round(role="explanation")
            except InsituError as exc:
                logger.warning("cannot use %s as a background sample (%s)", directory, exc)
                continue
            if data.rows:
                picks = np.random.default_rng(0).permutation(data.rows)[:_BACKGROUND_ROWS]
                return data.features[np.sort(picks)], data.feature_names
            empty.append(str(directory))
        if empty:
            raise InvalidInputError(
                f"no record of the prepared data of {name!r} ({', '.join(empty)}) may be used "
                "for explanations: consent left 0 rows; record consent for the purpose "
                "'explanation' ('insitu consent'), or prepare records whose subjects consented"
            )
        return None

    return find


def _site_extras(
    workspace: Workspace, runtime: ModelRuntime, app_options: dict[str, Any]
) -> tuple[list[APIRouter], Any]:
    """The site dashboard's router and the drift monitor, wired to this runtime.

    The monitor registers each version as it loads (from the reference profile in its
    card) and counts every batch (``DriftMonitor.on_batch``, an observer).
    """
    from insitu.dashboard import router as dashboard_router
    from insitu.drift import DriftMonitor

    monitor = DriftMonitor(workspace)

    def register(model: LoadedModel) -> None:
        monitor.register_card(model.card)

    runtime.on_swap(register)
    runtime.add_observer(monitor.on_batch)
    metrics = app_options.setdefault("metrics", ServeMetrics())
    metrics.registry.register(monitor)  # the drift gauges in /metrics
    return [dashboard_router(workspace, metrics.live_figures, drift_monitor=monitor)], monitor


@dataclass
class RunningServer:
    """A server started by :func:`running`."""

    url: str
    token: str
    app: FastAPI

    @property
    def metrics(self) -> ServeMetrics:
        """The server's metrics (``snapshot()`` gives p50 latency, rate, versions)."""
        metrics: ServeMetrics = self.app.state.metrics
        return metrics

    def snapshot(self) -> MetricsSnapshot:
        """Shortcut for ``metrics.snapshot()``."""
        return self.metrics.snapshot()

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header to send."""
        return {"Authorization": f"Bearer {self.token}"}

    def __str__(self) -> str:
        return self.url


def _uvicorn_config(app: FastAPI, host: str, port: int, **tls: Any) -> Any:
    import uvicorn

    from insitu.serve._codec import BODY_TIMEOUT
    from insitu.serve._protocol import head_deadline_protocol

    # A client has as long to send its request head as the app gives it for its body.
    state = getattr(app.state, "insitu", None)
    timeout = state.body_timeout if state is not None else BODY_TIMEOUT
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # the library never configures logging
        log_level="warning",
        access_log=False,
        lifespan="on",
        ws="none",  # no WebSocket endpoints: none of their code is loaded
        # httptools or h11 as uvicorn picks, closing connections whose request head is
        # late (uvicorn has no such timeout: slowloris); the body's deadline is the app's.
        http=head_deadline_protocol(timeout),
        timeout_keep_alive=5,  # idle between requests (uvicorn's default, made explicit)
        # CPython's asyncio loop, never uvloop: uvloop's connect() and getaddrinfo() are
        # libuv's and never pass through the socket module, so the egress guard's audit
        # hook would not see code on the serving loop reach another host.
        loop="asyncio",
        timeout_graceful_shutdown=5,
        **tls,
    )


@contextlib.contextmanager
def running(
    workspace: Workspace | None = None,
    *,
    port: int = 0,
    host: str = DEFAULT_HOST,
    runtime: ModelRuntime | None = None,
    token: str | None = None,
    routers: Sequence[APIRouter] = (),
    startup_timeout: float = 60.0,
    dashboard: bool = True,
    **app_options: Any,
) -> Iterator[RunningServer]:
    """Serve ``workspace``'s installed model on ``host:port`` (0: an ephemeral port).

    Yields a :class:`RunningServer` (``.url``, ``.token``, ``.snapshot()``) once the
    server accepts connections; stops it (and closes the runtime) on exit. With a
    workspace, the site dashboard is mounted at ``/dashboard`` and the drift monitor
    observes every batch (``dashboard=False`` leaves both out).
    ``app_options`` go to :func:`create_app` (``max_batch_rows``, ``max_wait``, ...).

    Raises:
        UsageError: a non-loopback ``host`` (use the CLI with --expose for that).
        InsituError: the server did not start (port in use).

    """
    import uvicorn

    check_bind(host)
    if runtime is None:
        if workspace is None:
            raise UsageError("give a workspace or a runtime")
        runtime = ModelRuntime.for_workspace(workspace)
    if token is None:
        if workspace is None:
            raise UsageError("give the API token, or the workspace that holds it")
        token = workspace.api_token()
    monitor = None
    if workspace is not None:
        app_options.setdefault("backgrounds", site_background(workspace))
        if dashboard:
            extra, monitor = _site_extras(workspace, runtime, app_options)
            routers = [*extra, *routers]
    app = create_app(runtime, token=token, routers=routers, **app_options)
    server = uvicorn.Server(_uvicorn_config(app, host, port))
    thread = threading.Thread(target=server.run, name="insitu-serve", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise InsituError(f"the server did not start on {host}:{port}; is the port in use?")
            time.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()[1]
        url_host = f"[{host}]" if ":" in host else host
        yield RunningServer(url=f"http://{url_host}:{bound}", token=token, app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        runtime.close()
        if monitor is not None:
            monitor.flush()


def serve(
    workspace: Workspace,
    *,
    host: str = DEFAULT_HOST,
    port: int = 8765,
    expose: bool = False,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    routers: Sequence[APIRouter] = (),
    on_started: Callable[[], None] | None = None,
    uds: Path | None = None,
    **app_options: Any,
) -> None:
    """Serve in the foreground until interrupted (``insitu serve``).

    ``on_started`` is called once the models are loaded and the socket is listening,
    never before an error that stops the server from starting. With ``uds`` the API
    listens on that Unix socket instead of ``host:port`` (``insitu serve --isolate``).

    Raises:
        CannotListenError: uvicorn could not bind ``host:port``.

    """
    tls = uds is None and check_bind(host, expose=expose, certfile=certfile, keyfile=keyfile)
    runtime = ModelRuntime.for_workspace(workspace)
    app_options.setdefault("backgrounds", site_background(workspace))
    extra, monitor = _site_extras(workspace, runtime, app_options)
    app = create_app(
        runtime, token=workspace.api_token(), routers=[*extra, *routers], **app_options
    )
    options = {"ssl_certfile": str(certfile), "ssl_keyfile": str(keyfile)} if tls else {}
    if uds is not None:
        options = {"uds": str(uds)}
    server = _announcing_server(_uvicorn_config(app, host, port, **options), on_started)
    try:
        server.run()
    except SystemExit as exc:
        # uvicorn logs why it cannot bind, then exits the process: one error of ours.
        where = f"unix:{uds}" if uds is not None else f"{host}:{port}"
        raise CannotListenError(
            f"the server could not listen on {where} (the reason is above); choose "
            "another --port (or --uds), or stop what holds this one"
        ) from exc
    finally:
        runtime.close()
        monitor.flush()


def _announcing_server(config: Any, on_started: Callable[[], None] | None) -> Any:
    """A ``uvicorn.Server`` that calls ``on_started`` once it is listening."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and on_started is not None:
                on_started()

    return _Server(config)
