"""The localhost API (``insitu serve``): FastAPI and uvicorn over a model runtime.

:func:`create_app` builds the app (extra routers, e.g. the site dashboard's, are
included; ``app.state.metrics`` is a :class:`ServeMetrics`), :func:`running` serves it
in-process on an ephemeral loopback port, :func:`serve` in the foreground. See
``docs/serving.md``.

Layer 10: imports ``insitu.runtime``, ``insitu.dashboard``, ``insitu.drift``,
``insitu.data`` and below.
"""

from __future__ import annotations

from insitu.serve._app import Background, BackgroundSource, create_app
from insitu.serve._batching import MicroBatcher
from insitu.serve._isolate import (
    ISOLATED_ENV,
    check_isolated,
    isolated_environment,
    isolation_command,
)
from insitu.serve._metrics import MetricsSnapshot, ServeMetrics
from insitu.serve._server import (
    DEFAULT_HOST,
    RunningServer,
    check_bind,
    running,
    serve,
    site_background,
)

__all__ = [
    "DEFAULT_HOST",
    "ISOLATED_ENV",
    "Background",
    "BackgroundSource",
    "MetricsSnapshot",
    "MicroBatcher",
    "RunningServer",
    "ServeMetrics",
    "check_bind",
    "check_isolated",
    "create_app",
    "isolated_environment",
    "isolation_command",
    "running",
    "serve",
    "site_background",
]
