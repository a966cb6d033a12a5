"""Server metrics: Prometheus text at ``/metrics``, and a snapshot for the dashboard.

The Prometheus collectors live in the server's own ``CollectorRegistry`` (never the
process-wide default registry: two servers in one process, as in the tests and the
quickstart, must not share or clash). ``/metrics`` exposes:

* ``insitu_requests_total{model,endpoint,status}``, a counter;
* ``insitu_request_seconds{endpoint}``, a latency histogram;
* ``insitu_batch_rows{model}``, a histogram of micro-batch sizes (rows);
* ``insitu_model_info{model,version}``, 1 for the version being served.

:meth:`ServeMetrics.snapshot` is what the site dashboard reads from
``app.state.metrics``: request rate and latency quantiles over a sliding window (the
last ``window`` requests, at most ``horizon`` seconds old) and the versions served.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["MetricsSnapshot", "ServeMetrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


@dataclass(frozen=True)
class MetricsSnapshot:
    """A read-only view of the server's recent activity."""

    requests_total: int
    errors_total: int
    requests_per_second: float
    latency_p50_ms: float | None
    latency_p90_ms: float | None
    latency_p99_ms: float | None
    mean_batch_rows: float | None
    models: dict[str, str] = field(default_factory=dict)
    uptime_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """As a JSON object."""
        return {
            "requests_total": self.requests_total,
            "errors_total": self.errors_total,
            "requests_per_second": self.requests_per_second,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p90_ms": self.latency_p90_ms,
            "latency_p99_ms": self.latency_p99_ms,
            "mean_batch_rows": self.mean_batch_rows,
            "models": dict(self.models),
            "uptime_seconds": self.uptime_seconds,
        }


class ServeMetrics:
    """The collectors of one server and a sliding window of prediction latencies."""

    def __init__(self, *, window: int = 4096, horizon: float = 60.0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "insitu_requests",
            "HTTP requests by model, endpoint and status code.",
            ["model", "endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "insitu_request_seconds",
            "Request latency in seconds, by endpoint.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "insitu_batch_rows",
            "Rows per micro-batch run by ONNX Runtime.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.model_info = Gauge(
            "insitu_model_info",
            "1 for the model version being served.",
            ["model", "version"],
            registry=self.registry,
        )
        self._lock = threading.Lock()
        self._window: deque[tuple[float, float]] = deque(maxlen=window)
        self._batches: deque[int] = deque(maxlen=window)
        self._horizon = horizon
        self._versions: dict[str, str] = {}
        self._totals = [0, 0]
        self._started = time.monotonic()

    def observe_request(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        """Count one request and its latency."""
        self.requests.labels(model=model, endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)
        with self._lock:
            self._totals[0] += 1
            self._totals[1] += status >= 400
            if endpoint == "predict" and status < 400:
                self._window.append((time.monotonic(), seconds))

    def observe_batch(self, model: str, rows: int) -> None:
        """Record one micro-batch."""
        self.batch_rows.labels(model=model).observe(rows)
        with self._lock:
            self._batches.append(rows)

    def set_version(self, model: str, version: str) -> None:
        """The version now served for ``model``."""
        with self._lock:
            old = self._versions.get(model)
            self._versions[model] = version
        if old is not None and old != version:
            self.model_info.remove(model, old)
        self.model_info.labels(model=model, version=version).set(1)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)

    def live_figures(self) -> dict[str, Any]:
        """The figures the site dashboard shows (``insitu.dashboard.MetricsSource``)."""
        snapshot = self.snapshot()
        with self._lock:
            now = time.monotonic()
            recent = [s for t, s in self._window if now - t <= self._horizon]
        p95 = float(np.quantile(recent, 0.95)) * 1000 if recent else None
        return {
            "request_rate": snapshot.requests_per_second,
            "latency_p50_ms": snapshot.latency_p50_ms,
            "latency_p95_ms": p95,
            "requests_total": snapshot.requests_total,
            "models": [{"name": n, "version": v} for n, v in sorted(snapshot.models.items())],
        }

    def snapshot(self) -> MetricsSnapshot:
        """Rate and quantiles of recent successful predictions; versions served."""
        now = time.monotonic()
        with self._lock:
            recent = [(t, s) for t, s in self._window if now - t <= self._horizon]
            batches = list(self._batches)
            totals = list(self._totals)
            versions = dict(self._versions)
        quantiles: list[float | None] = [None, None, None]
        rate = 0.0
        if recent:
            seconds = np.array([s for _, s in recent])
            quantiles = [float(q) * 1000 for q in np.quantile(seconds, [0.5, 0.9, 0.99])]
            span = max(now - recent[0][0], 1e-3)
            rate = len(recent) / span if len(recent) > 1 else 0.0
        return MetricsSnapshot(
            requests_total=totals[0],
            errors_total=totals[1],
            requests_per_second=rate,
            latency_p50_ms=quantiles[0],
            latency_p90_ms=quantiles[1],
            latency_p99_ms=quantiles[2],
            mean_batch_rows=float(np.mean(batches)) if batches else None,
            models=versions,
            uptime_seconds=now - self._started,
        )
