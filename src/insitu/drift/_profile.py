"""The reference profile of a model: DP histograms of what it saw, shipped in its card.

Bins are fixed by the data schema, never by the data: a numeric feature is binned over
the range the schema declares (the encoder already scales it to [0, 1], so the bins are
``bins`` equal intervals of [0, 1]); a categorical feature has one bin per declared
category plus one for values the schema does not know (encoded as all zeros); the
model's output has ``bins`` equal bins of its score in [0, 1] (binary) or one bin per
class. Since no bin edge depends on a record, the layout itself leaks nothing.

Release at a site (the Gaussian mechanism): every record adds 1 to exactly one bin of
each of the ``m`` histograms (features, plus the output), so adding or removing a record
moves the concatenated count vector by L2 norm ``sqrt(m)``. The site adds Gaussian
noise of standard deviation ``sigma * sqrt(m)`` to every count, which is one application
of a Gaussian mechanism with noise multiplier ``sigma``: the
:class:`~insitu.privacy.PrivacyEvent` ``(sigma, 1.0, 1)``. The site calibrates ``sigma``
for the epsilon it is asked to spend and *charges it to the subjects of the records*
before anything is released (:class:`~insitu.privacy.SubjectBudget`, the budget that
federated training and fine-tuning spend): the profile is paid for like a training
round, and subjects without budget left are left out of it. The coordinator only sums
noisy releases (:func:`combine_releases`).

Noise is drawn from :class:`~insitu.privacy.SecureRandom` (keyed from the OS, hardened
against the floating-point attack on naive Gaussian samplers): no seed reproduces it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from insitu.data import DataSchema, FeatureEncoder
from insitu.errors import SchemaError, UsageError
from insitu.privacy import PrivacyEvent, SecureRandom, calibrate_noise

__all__ = [
    "OUTPUT",
    "ProfileLayout",
    "ReferenceProfile",
    "bin_counts",
    "combine_releases",
    "noisy_release",
]

#: The name under which the model's output histogram is kept.
OUTPUT = "(output)"
UNKNOWN = "(unknown)"


@dataclass(frozen=True)
class ProfileLayout:
    """Which encoded columns make each feature, and its bins (from the schema only)."""

    features: list[dict[str, Any]]
    n_inputs: int
    bins: int
    output_classes: int

    @classmethod
    def from_schema(
        cls, schema: DataSchema, *, bins: int = 10, output_classes: int = 1
    ) -> ProfileLayout:
        """The layout of ``schema``'s encoding; refuses features without declared bins.

        ``output_classes`` is 1 for a model that outputs one logit (binary), else the
        number of classes.
        """
        if not 2 <= bins <= 100:
            raise UsageError(f"bins must be between 2 and 100, not {bins}")
        missing = [c for c in schema.numeric if c not in schema.ranges]
        missing += [c for c in schema.categorical if c not in schema.categories]
        if missing:
            raise SchemaError(
                f"a drift profile needs bins fixed by the schema; declare features.ranges or "
                f"features.categories for: {', '.join(missing)}"
            )
        encoder = FeatureEncoder.for_schema(schema)
        features: list[dict[str, Any]] = []
        column = 0
        for name in schema.numeric:
            low, high = schema.ranges[name]
            features.append(
                {
                    "name": name,
                    "kind": "numeric",
                    "start": column,
                    "stop": column + 1,
                    "range": [low, high],
                }
            )
            column += 1
        # The interval indicators of declared bins follow the numeric columns: they
        # repeat what the numeric column's histogram already shows, so they are skipped.
        column += sum(len(edges) + 1 for edges in schema.bins.values())
        for name in schema.categorical:
            cats = list(encoder.categories[name])
            features.append(
                {
                    "name": name,
                    "kind": "categorical",
                    "start": column,
                    "stop": column + len(cats),
                    "categories": [*cats, UNKNOWN],
                }
            )
            column += len(cats)
        if column != len(encoder.names):  # pragma: no cover -- the encoder's order changed
            raise SchemaError("drift profile layout disagrees with the feature encoder")
        return cls(features, column, bins, output_classes)

    def to_json(self) -> dict[str, Any]:
        """As stored in the card."""
        return {
            "features": self.features,
            "n_inputs": self.n_inputs,
            "bins": self.bins,
            "output_classes": self.output_classes,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ProfileLayout:
        """Read a layout written by :meth:`to_json`."""
        return cls(
            list(doc["features"]),
            int(doc["n_inputs"]),
            int(doc["bins"]),
            int(doc["output_classes"]),
        )

    @property
    def names(self) -> list[str]:
        """Histogram names: the features, then :data:`OUTPUT`."""
        return [f["name"] for f in self.features] + [OUTPUT]

    def bin_labels(self, name: str) -> list[str]:
        """Human labels of the bins of histogram ``name``."""
        if name == OUTPUT:
            if self.output_classes > 1:
                return [f"class {i}" for i in range(self.output_classes)]
            return _interval_labels(0.0, 1.0, self.bins)
        feature = next(f for f in self.features if f["name"] == name)
        if feature["kind"] == "categorical":
            return list(feature["categories"])
        low, high = feature["range"]
        return _interval_labels(float(low), float(high), self.bins)


def _interval_labels(low: float, high: float, bins: int) -> list[str]:
    edges = np.linspace(low, high, bins + 1)
    return [f"{a:g}-{b:g}" for a, b in itertools.pairwise(edges)]


def _numeric_bins(values: np.ndarray, bins: int) -> np.ndarray:
    # Encoded numeric values are in [0, 1]; 1.0 falls into the last bin.
    index: np.ndarray = np.floor(np.clip(values, 0.0, 1.0) * bins).astype(np.int64)
    result: np.ndarray = np.minimum(index, bins - 1)
    return result


class BinCounter:
    """Running bin counts of a layout, kept flat so that adding a batch is a few NumPy calls.

    ``add`` bins a batch and forgets it; :meth:`histograms` splits the flat counts into
    one histogram per feature (and the output). Only counts are ever held.
    """

    def __init__(self, layout: ProfileLayout, *, with_output: bool) -> None:
        self.layout = layout
        self.with_output = with_output
        self._numeric = [f for f in layout.features if f["kind"] == "numeric"]
        self._numeric_cols = np.array([f["start"] for f in self._numeric], dtype=np.int64)
        self._offsets = np.arange(len(self._numeric)) * layout.bins
        self.numeric = np.zeros(len(self._numeric) * layout.bins, dtype=np.int64)
        self.hot = np.zeros(layout.n_inputs, dtype=np.int64)
        self.output = np.zeros(
            layout.output_classes if layout.output_classes > 1 else layout.bins, dtype=np.int64
        )
        self.rows = 0

    def add(self, inputs: np.ndarray, outputs: np.ndarray | None) -> int:
        """Count a batch (rows of encoded inputs); returns its number of rows.

        Raises:
            SchemaError: ``inputs`` does not have the layout's number of columns.

        """
        inputs = np.asarray(inputs)
        if inputs.ndim != 2 or inputs.shape[1] != self.layout.n_inputs:
            raise SchemaError(
                f"inputs of shape {inputs.shape} do not match the profile's "
                f"{self.layout.n_inputs} encoded columns; encode them with the model's schema"
            )
        if len(self._numeric):
            index = _numeric_bins(inputs[:, self._numeric_cols], self.layout.bins)
            self.numeric += np.bincount(
                (index + self._offsets).ravel(), minlength=len(self.numeric)
            )
        # Categorical: indicator columns summed (the encoder sets exactly one per known
        # value); rows with none of a feature's indicators set are its "unknown" bin.
        self.hot += np.count_nonzero(inputs > 0.5, axis=0)
        if self.with_output and outputs is not None:
            self.output += _output_counts(self.layout, np.asarray(outputs, dtype=np.float64))
        self.rows += inputs.shape[0]
        return int(inputs.shape[0])

    def histograms(self) -> dict[str, np.ndarray]:
        """One count vector per histogram name (features, then the output if counted)."""
        counts: dict[str, np.ndarray] = {}
        bins = self.layout.bins
        numeric_index = 0
        for feature in self.layout.features:
            if feature["kind"] == "numeric":
                start = numeric_index * bins
                counts[feature["name"]] = self.numeric[start : start + bins].astype(np.float64)
                numeric_index += 1
            else:
                known = self.hot[feature["start"] : feature["stop"]].astype(np.float64)
                counts[feature["name"]] = np.append(known, max(0.0, self.rows - known.sum()))
        if self.with_output:
            counts[OUTPUT] = self.output.astype(np.float64)
        return counts


def bin_counts(
    layout: ProfileLayout, inputs: np.ndarray, outputs: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Counts per bin of every histogram for a batch (no value is kept, only counts).

    Raises:
        SchemaError: ``inputs`` does not have the layout's number of columns.

    """
    counter = BinCounter(layout, with_output=outputs is not None)
    counter.add(inputs, outputs)
    return counter.histograms()


def _output_counts(layout: ProfileLayout, outputs: np.ndarray) -> np.ndarray:
    if outputs.ndim == 1:
        outputs = outputs[:, None]
    if layout.output_classes > 1:
        index = outputs.argmax(axis=1)
        return np.bincount(index, minlength=layout.output_classes)
    # One logit per row: bin the score sigmoid(logit) in [0, 1].
    score = 1.0 / (1.0 + np.exp(-np.clip(outputs[:, 0], -50, 50)))
    return np.bincount(_numeric_bins(score, layout.bins), minlength=layout.bins)


def noisy_release(
    layout: ProfileLayout,
    inputs: np.ndarray,
    outputs: np.ndarray | None,
    *,
    epsilon: float,
    delta: float,
) -> tuple[dict[str, Any], PrivacyEvent]:
    """A site's noisy histograms and the privacy event they cost (see the module docstring).

    The caller charges the event to the site's budget *before* publishing the release;
    :func:`insitu.drift.release_profile` does both.
    """
    counts = bin_counts(layout, inputs, outputs)
    sigma = calibrate_noise(target_epsilon=epsilon, delta=delta, sample_rate=1.0, steps=1)
    std = sigma * math.sqrt(len(counts))
    random = SecureRandom()
    noisy = {
        name: [round(float(v), 2) for v in values + random.normal(values.shape, std=std)]
        for name, values in counts.items()
    }
    release = {
        "layout": layout.to_json(),
        "counts": noisy,
        "noise_std": std,
        "epsilon": epsilon,
        "delta": delta,
    }
    return release, PrivacyEvent(sigma, 1.0, 1)


@dataclass(frozen=True)
class ReferenceProfile:
    """Summed noisy histograms of the training data, with their layout."""

    layout: ProfileLayout
    counts: dict[str, list[float]]
    noise_std: float
    sites: int
    epsilon: float
    delta: float
    #: The data schema document (``DataSchema.source``): column names, ranges and
    #: categories only; fine-tuning encodes local data with it.
    schema: dict[str, Any] | None = None

    def proportions(self, name: str) -> np.ndarray:
        """Bin proportions of histogram ``name`` (negative noisy counts read as 0)."""
        counts = np.clip(np.asarray(self.counts[name], dtype=np.float64), 0.0, None)
        total = counts.sum()
        if total <= 0:
            return np.full(len(counts), 1.0 / len(counts))
        result: np.ndarray = counts / total
        return result

    def to_json(self) -> dict[str, Any]:
        """As stored in the model card (``drift_reference``)."""
        return {
            "layout": self.layout.to_json(),
            "counts": self.counts,
            "noise_std": self.noise_std,
            "sites": self.sites,
            "privacy": {
                "epsilon": self.epsilon,
                "delta": self.delta,
                "mechanism": "gaussian-histograms",
            },
        } | ({"schema": self.schema} if self.schema is not None else {})

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ReferenceProfile:
        """Read a profile written by :meth:`to_json`."""
        return cls(
            ProfileLayout.from_json(doc["layout"]),
            {k: [float(x) for x in v] for k, v in doc["counts"].items()},
            float(doc["noise_std"]),
            int(doc["sites"]),
            float(doc["privacy"]["epsilon"]),
            float(doc["privacy"]["delta"]),
            doc.get("schema"),
        )


def combine_releases(
    layout: ProfileLayout,
    releases: list[dict[str, Any]],
    *,
    schema: dict[str, Any] | None = None,
) -> ReferenceProfile:
    """The coordinator's sum of the sites' noisy releases (it never sees a true count).

    The reported epsilon is the largest any site spent (each site's records are only in
    its own release, so releases compose in parallel).
    """
    if not releases:
        raise UsageError("combine at least one site's release")
    names = set(releases[0]["counts"])
    total: dict[str, np.ndarray] = {}
    for release in releases:
        if set(release["counts"]) != names or release.get("layout", layout.to_json()) != (
            layout.to_json()
        ):
            raise UsageError("releases of different layouts cannot be combined")
        for name, values in release["counts"].items():
            total[name] = total.get(name, 0) + np.asarray(values, dtype=np.float64)
    std = math.sqrt(sum(float(r["noise_std"]) ** 2 for r in releases))
    return ReferenceProfile(
        layout,
        {k: [round(float(x), 2) for x in v] for k, v in total.items()},
        std,
        len(releases),
        max(float(r["epsilon"]) for r in releases),
        max(float(r["delta"]) for r in releases),
        schema,
    )
