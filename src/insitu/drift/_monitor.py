"""The drift monitor inside the runtime: running binned counts, never an input value.

The runtime calls :meth:`DriftMonitor.on_batch` after each inference with the encoded
inputs and the outputs. The monitor adds the batch to per-feature bin counts (the bins
of the model's reference profile, fixed by the data schema) and drops the batch: no
input or output value is stored, in memory or on disk. The counts are a fixed-bin
quantile sketch: quantiles read from them are exact to the width of a bin. Sketches that
adapt to the data (t-digest, KLL) were not used because they *keep* input values
(centroids or samples), which is what the monitor must never do (ADR 0601).

Every ``check_every`` rows (and on :meth:`check`), each histogram is compared with the
reference (:mod:`insitu.drift._stats`); a feature that becomes flagged is recorded in
the ledger as ``drift.detected``, one that recovers as ``drift.cleared`` (transitions
only, so a drifted stream does not flood the ledger). The state (counts and the last
figures) is written atomically to ``drift/<model>@<version>.json`` in the workspace for
``insitu drift status`` and the dashboard. Figures are exported as Prometheus gauges: the
monitor is a ``prometheus_client`` collector (:meth:`collect`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from insitu._atomic import atomic_write_text
from insitu.audit import events
from insitu.drift._profile import OUTPUT, BinCounter, ReferenceProfile
from insitu.drift._stats import FeatureDrift, ReferenceHistogram, ReferenceHistograms
from insitu.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from insitu.bundle import ModelCard
    from insitu.workspace import Workspace

__all__ = ["DriftMonitor", "DriftThresholds", "drift_status"]

logger = logging.getLogger(__name__)

DETECTED = events.DRIFT_DETECTED.name
CLEARED = events.DRIFT_CLEARED.name


@dataclass(frozen=True)
class DriftThresholds:
    """When a feature is flagged (workspace config section ``[drift]``)."""

    psi_threshold: float = 0.2
    p_value: float = 0.01
    min_samples: int = 500
    check_every: int = 1000

    def __post_init__(self) -> None:
        if not 0 < self.psi_threshold <= 10:
            raise ConfigError(
                f"drift.psi_threshold must be in (0, 10], not {self.psi_threshold}; 0.1 is a "
                "moderate shift, 0.2 (the default) a significant one"
            )
        if not 0 < self.p_value < 1:
            raise ConfigError(f"drift.p_value must be in (0, 1), not {self.p_value}; e.g. 0.01")
        if self.min_samples < 1 or self.check_every < 1:
            raise ConfigError("drift.min_samples and drift.check_every must be at least 1")

    @classmethod
    def from_workspace(cls, workspace: Workspace) -> DriftThresholds:
        """The thresholds configured in ``workspace``'s config.toml."""
        get = workspace.config.get
        return cls(
            psi_threshold=float(get("drift", "psi_threshold")),
            p_value=float(get("drift", "p_value")),
            min_samples=int(get("drift", "min_samples")),
            check_every=int(get("drift", "check_every")),
        )

    def judge(
        self, feature: str, reference: np.ndarray | ReferenceHistogram, live: np.ndarray
    ) -> FeatureDrift:
        """The figures of one histogram, and whether they flag it."""
        if not isinstance(reference, ReferenceHistogram):
            reference = ReferenceHistogram(reference)
        total = float(np.sum(live))
        return self.figure(feature, reference.psi(live), reference.p_value(live), total)

    def figure(self, feature: str, psi: float, p_value: float, total: float) -> FeatureDrift:
        """A histogram's figures (``total``: its live count), and whether they flag it."""
        rows = round(total)
        flagged = rows >= self.min_samples and psi >= self.psi_threshold and p_value < self.p_value
        return FeatureDrift(feature, psi, p_value, rows, flagged)


class _Stream:
    """The running counts of one model version (plus counts restored from its state file)."""

    def __init__(self, profile: ReferenceProfile) -> None:
        self.profile = profile
        self.counter = BinCounter(profile.layout, with_output=OUTPUT in profile.counts)
        # Histograms in the profile's order, all laid end to end (as the counter's are).
        self.names = list(profile.counts)
        self.references = ReferenceHistograms([profile.counts[n] for n in self.names])
        lengths = [len(profile.counts[n]) for n in self.names]
        self._splits = np.cumsum(lengths)[:-1]
        starts = np.cumsum([0, *self.counter.lengths[:-1]]).tolist()
        counter = dict(zip(self.counter.names, starts, strict=True))
        self._order = np.concatenate(
            [
                np.arange(counter[n], counter[n] + size)
                for n, size in zip(self.names, lengths, strict=True)
            ]
        )
        self.restored = np.zeros(sum(lengths))
        self.restored_rows = 0
        self.since_check = 0
        self.figures: list[FeatureDrift] = []

    @property
    def rows(self) -> int:
        return self.restored_rows + self.counter.rows

    def restore(self, saved: dict[str, Any]) -> None:
        """Resume the counts of a state file (ignored if its histograms are not these)."""
        counts = saved["counts"]
        if set(counts) != set(self.names):
            return
        restored = np.concatenate([np.asarray(counts[n], dtype=np.float64) for n in self.names])
        if restored.shape == self.restored.shape:
            self.restored = restored
            self.restored_rows = int(saved["rows"])

    def live(self) -> np.ndarray:
        """All histograms' counts laid end to end, in the order of ``names``."""
        live: np.ndarray = self.restored + self.counter.flat_histograms()[self._order]
        return live

    def counts(self) -> dict[str, np.ndarray]:
        return dict(zip(self.names, np.split(self.live(), self._splits), strict=True))


def _state_name(model: str, version: str) -> str:
    return f"{model}@{version}.json"


class DriftMonitor:
    """Per-feature drift of every registered model version (see the module docstring).

    ``workspace`` (optional) receives the ledger events and the state files; without it
    the monitor only keeps figures in memory and exports them as gauges.
    """

    def __init__(
        self, workspace: Workspace | None = None, *, thresholds: DriftThresholds | None = None
    ) -> None:
        self.workspace = workspace
        if thresholds is None:
            thresholds = (
                DriftThresholds.from_workspace(workspace) if workspace else DriftThresholds()
            )
        self.thresholds = thresholds
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._lock = threading.Lock()
        self._warned: set[tuple[str, str]] = set()

    @property
    def state_dir(self) -> Path | None:
        """Where the state files go (``drift/`` in the workspace)."""
        return self.workspace.drift_dir if self.workspace else None

    def register(self, model: str, version: str, profile: ReferenceProfile) -> None:
        """Monitor ``model`` ``version`` against ``profile``; resumes its saved counts."""
        stream = _Stream(profile)
        state_dir = self.state_dir
        path = state_dir / _state_name(model, version) if state_dir else None
        if path is not None and path.is_file():
            stream.restore(json.loads(path.read_text(encoding="utf-8")))
        with self._lock:
            self._streams[(model, version)] = stream

    def register_card(self, card: ModelCard) -> bool:
        """Register a model from its card; ``False`` when the card has no reference profile."""
        doc = getattr(card, "drift_reference", None)
        if not doc:
            logger.info(
                "%s %s has no drift reference in its card: not monitored", card.name, card.version
            )
            return False
        self.register(card.name, card.version, ReferenceProfile.from_json(doc))
        return True

    def on_batch(
        self, model_name: str, version: str, inputs: np.ndarray, outputs: np.ndarray
    ) -> None:
        """The runtime's observer callback: count this batch, then forget it.

        The batch is counted outside the lock (:meth:`BinCounter.count` keeps nothing);
        only adding its counts to the stream's is done under it, once per batch.
        """
        key = (model_name, version)
        stream = self._streams.get(key)
        if stream is None:
            with self._lock:
                if key not in self._warned:
                    logger.warning("drift: %s %s is not registered; not monitored", *key)
                    self._warned.add(key)
            return
        counts, rows = stream.counter.count(inputs, outputs)
        with self._lock:
            stream.counter.merge(counts, rows)
            stream.since_check += rows
            due = stream.since_check >= self.thresholds.check_every
        if due:
            self.check(model_name, version)

    def check(self, model: str | None = None, version: str | None = None) -> list[FeatureDrift]:
        """Compare the counts with the reference now; record transitions; save the state."""
        results: list[FeatureDrift] = []
        with self._lock:
            keys = [k for k in self._streams if model is None or k == (model, version)]
            for key in keys:
                stream = self._streams[key]
                previous = {f.feature for f in stream.figures if f.flagged}
                psi, p_value, total = stream.references.compare(stream.live())
                stream.figures = [
                    self.thresholds.figure(name, float(a), float(b), float(c))
                    for name, a, b, c in zip(stream.names, psi, p_value, total, strict=True)
                ]
                stream.since_check = 0
                results += stream.figures
                self._record(key, previous, stream.figures)
                self._save(key, stream)
        return results

    def _record(
        self, key: tuple[str, str], previous: set[str], figures: list[FeatureDrift]
    ) -> None:
        if self.workspace is None:
            return
        changes = [f for f in figures if f.flagged != (f.feature in previous)]
        if not changes:
            return
        with self.workspace.ledger() as ledger:
            for figure in changes:
                (events.DRIFT_DETECTED if figure.flagged else events.DRIFT_CLEARED).record(
                    ledger,
                    model=key[0],
                    version=key[1],
                    feature=figure.feature,
                    psi=round(figure.psi, 6),
                    p_value=float(f"{figure.p_value:.6g}"),
                    rows=figure.rows,
                    psi_threshold=self.thresholds.psi_threshold,
                    p_value_threshold=self.thresholds.p_value,
                )
                logger.warning(
                    "drift %s: %s %s feature %s (PSI %.3f, p %.2g)",
                    "detected" if figure.flagged else "cleared",
                    key[0],
                    key[1],
                    figure.feature,
                    figure.psi,
                    figure.p_value,
                )

    def _save(self, key: tuple[str, str], stream: _Stream) -> None:
        state_dir = self.state_dir
        if state_dir is None:
            return
        state_dir.mkdir(parents=True, exist_ok=True)
        from insitu._clock import utc_now

        doc = {
            "model": key[0],
            "version": key[1],
            "rows": stream.rows,
            "updated": utc_now(),
            "counts": {k: [round(float(x)) for x in v] for k, v in stream.counts().items()},
            "reference": stream.profile.to_json(),
            "figures": [f.to_json() for f in stream.figures],
        }
        atomic_write_text(state_dir / _state_name(*key), json.dumps(doc, sort_keys=True) + "\n")

    def flush(self) -> None:
        """Check and save every stream (call at shutdown)."""
        self.check()

    def figures(self) -> dict[tuple[str, str], list[FeatureDrift]]:
        """The last figures of every registered model version."""
        with self._lock:
            return {k: list(s.figures) for k, s in self._streams.items()}

    # -- Prometheus --------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """``prometheus_client`` collector protocol: register with ``REGISTRY.register``."""
        from prometheus_client.core import GaugeMetricFamily

        labels = ["model", "version", "feature"]
        psi = GaugeMetricFamily("insitu_drift_psi", "Population stability index", labels=labels)
        p_value = GaugeMetricFamily(
            "insitu_drift_p_value", "Chi-square two-sample test p-value", labels=labels
        )
        flagged = GaugeMetricFamily(
            "insitu_drift_flagged", "1 when the feature's drift is flagged", labels=labels
        )
        rows = GaugeMetricFamily(
            "insitu_drift_rows", "Rows observed since monitoring began", labels=["model", "version"]
        )
        with self._lock:
            for (model, version), stream in self._streams.items():
                rows.add_metric([model, version], stream.rows)
                for figure in stream.figures:
                    values = [model, version, figure.feature]
                    psi.add_metric(values, figure.psi)
                    p_value.add_metric(values, figure.p_value)
                    flagged.add_metric(values, 1.0 if figure.flagged else 0.0)
        yield from (psi, p_value, flagged, rows)

    def prometheus_text(self) -> str:
        """The gauges in Prometheus' text exposition format."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry).decode("utf-8")


def drift_status(workspace: Workspace, *, model: str | None = None) -> list[dict[str, Any]]:
    """Saved drift state of every monitored model version, judged by the *current* thresholds.

    Raises:
        ConfigError: the ``[drift]`` thresholds in config.toml are out of range.

    """
    thresholds = DriftThresholds.from_workspace(workspace)
    state_dir = workspace.drift_dir
    out: list[dict[str, Any]] = []
    for path in sorted(state_dir.glob("*.json")) if state_dir.is_dir() else []:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if model is not None and doc["model"] != model:
            continue
        profile = ReferenceProfile.from_json(doc["reference"])
        figures = [
            thresholds.judge(name, np.asarray(profile.counts[name]), np.asarray(live, float))
            for name, live in doc["counts"].items()
        ]
        out.append(
            {
                "model": doc["model"],
                "version": doc["version"],
                "rows": doc["rows"],
                "updated": doc["updated"],
                "features": [f.to_json() for f in figures if f.feature != OUTPUT],
                "output": next((f.to_json() for f in figures if f.feature == OUTPUT), None),
                "flagged": [f.feature for f in figures if f.flagged],
                "thresholds": {
                    "psi_threshold": thresholds.psi_threshold,
                    "p_value": thresholds.p_value,
                    "min_samples": thresholds.min_samples,
                },
            }
        )
    return out
