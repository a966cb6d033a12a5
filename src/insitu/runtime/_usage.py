"""Counting inference in the ledger: per model version, per hour; never inputs or outputs.

Counts accumulate in memory and one ``inference.counted`` entry is written for each
(model, version, hour) once that hour is over, or when the runtime closes (then marked
``partial``). A crash loses the counts of the current hour only; the ledger is not
written per request (an fsync per prediction would cost more than the prediction).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from insitu.audit import events
from insitu.audit.events import Event

__all__ = ["UsageCounter"]


def _hour(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(now))


class UsageCounter:
    """Requests, rows and errors by (model, version, UTC hour)."""

    def __init__(
        self,
        record: Callable[[Event, dict[str, Any]], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._record = record
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str, str], list[int]] = {}

    def add(self, model: str, version: str, *, requests: int, rows: int, errors: int) -> None:
        """Count one call (or one failed batch)."""
        key = (model, version, _hour(self._clock()))
        with self._lock:
            counts = self._counts.setdefault(key, [0, 0, 0])
            counts[0] += requests
            counts[1] += rows
            counts[2] += errors

    def totals(self) -> dict[tuple[str, str, str], tuple[int, int, int]]:
        """The counts not yet written."""
        with self._lock:
            return {key: (c[0], c[1], c[2]) for key, c in self._counts.items()}

    def flush(self, *, final: bool = False) -> int:
        """Write finished hours (every hour when ``final``); returns entries written."""
        current = _hour(self._clock())
        with self._lock:
            done = {k: v for k, v in self._counts.items() if final or k[2] != current}
            for key in done:
                del self._counts[key]
        for (model, version, hour), (requests, rows, errors) in sorted(done.items()):
            self._record(
                events.INFERENCE_COUNTED,
                {
                    "model": model,
                    "version": version,
                    "hour": hour,
                    "requests": requests,
                    "rows": rows,
                    "errors": errors,
                    "partial": hour == current,
                },
            )
        return len(done)
