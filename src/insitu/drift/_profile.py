"""The reference profile of a model: DP histograms of what it saw, shipped in its card.

Bins are fixed by the data schema, never by the data: a numeric feature is binned over
the range the schema declares (the encoder already scales it to [0, 1], so the bins are
``bins`` equal intervals of [0, 1]); a categorical feature has one bin per declared
category plus one for values the schema does not know (encoded as all zeros); the
model's output has ``bins`` equal bins of its score in [0, 1] (binary) or one bin per
class. Since no bin edge depends on a record, the layout itself leaks nothing. An image or
signal model's features are statistics of each record (mean intensity per channel, ...),
each binned over the range the declared value range gives it (:mod:`insitu.drift._arrays`).

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

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from insitu.data import ArraySchema, DataSchema, FeatureEncoder
from insitu.drift._arrays import record_statistics, statistic_ranges
from insitu.errors import SchemaError, UsageError
from insitu.privacy import PrivacyEvent, SecureRandom, calibrate_noise

__all__ = [
    "OUTPUT",
    "ProfileLayout",
    "ReferenceProfile",
    "bin_counts",
    "combine_releases",
    "noisy_release",
    "statistic_features",
]

#: The name under which the model's output histogram is kept.
OUTPUT = "(output)"
UNKNOWN = "(unknown)"


@dataclass(frozen=True)
class ProfileLayout:
    """Which encoded columns make each feature, and its bins (from the schema only).

    ``records`` is set for images and signals: their ``kind``, ``shape`` and
    ``value_range``; the features are then the statistics of each record
    (:func:`~insitu.drift._arrays.record_statistics`), computed before counting.
    """

    features: list[dict[str, Any]]
    n_inputs: int
    bins: int
    output_classes: int
    records: dict[str, Any] | None = None

    @classmethod
    def from_schema(
        cls, schema: DataSchema | ArraySchema, *, bins: int = 10, output_classes: int = 1
    ) -> ProfileLayout:
        """The layout of ``schema``'s encoding; refuses features without declared bins.

        ``output_classes`` is 1 for a model that outputs one logit (binary), else the
        number of classes. An array schema (images, signals) gives the layout of its
        records' statistics (:meth:`for_records`).
        """
        if not 2 <= bins <= 100:
            raise UsageError(f"bins must be between 2 and 100, not {bins}")
        if isinstance(schema, ArraySchema):
            return cls.for_records(schema.input_json(), bins=bins, output_classes=output_classes)
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

    @classmethod
    def for_records(
        cls, records: dict[str, Any], *, bins: int = 10, output_classes: int = 1
    ) -> ProfileLayout:
        """The layout of image or signal records: one numeric feature per statistic.

        ``records`` holds ``kind``, ``shape`` and ``value_range`` (an array schema's
        :meth:`~insitu.data.ArraySchema.input_json`, as in a model's ``features.json``).
        """
        if not 2 <= bins <= 100:
            raise UsageError(f"bins must be between 2 and 100, not {bins}")
        spec = {
            "kind": str(records["kind"]),
            "shape": [int(v) for v in records["shape"]],
            "value_range": [float(v) for v in records["value_range"]],
        }
        features = statistic_features(spec)
        return cls(features, len(features), bins, output_classes, spec)

    def to_json(self) -> dict[str, Any]:
        """As stored in the card."""
        return {
            "features": self.features,
            "n_inputs": self.n_inputs,
            "bins": self.bins,
            "output_classes": self.output_classes,
        } | ({"records": self.records} if self.records is not None else {})

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ProfileLayout:
        """Read a layout written by :meth:`to_json`."""
        layout = cls(
            list(doc["features"]),
            int(doc["n_inputs"]),
            int(doc["bins"]),
            int(doc["output_classes"]),
            doc.get("records"),
        )
        if layout.records is not None:
            layout._check_records()
        return layout

    def _check_records(self) -> None:
        """Refuse records whose statistics are not this layout's features (a forged card)."""
        records = self.records or {}
        try:
            spec = ProfileLayout.for_records(records, bins=self.bins).records or {}
            low, high = spec["value_range"]
            ok = (
                spec["kind"] in ("images", "signals")
                and len(spec["shape"]) in (2, 3)
                and low < high
                and statistic_features(spec) == self.features
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise SchemaError(
                f"the drift profile's records {records!r} do not give its statistics; make "
                "the profile again with ProfileLayout.from_schema of the array schema"
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


def statistic_features(records: dict[str, Any]) -> list[dict[str, Any]]:
    """The layout's features of image or signal ``records``: one numeric per statistic."""
    return [
        {"name": name, "kind": "numeric", "start": i, "stop": i + 1, "range": [low, high]}
        for i, (name, low, high) in enumerate(statistic_ranges(records))
    ]


def _interval_labels(low: float, high: float, bins: int) -> list[str]:
    edges = np.linspace(low, high, bins + 1)
    return [f"{a:g}-{b:g}" for a, b in itertools.pairwise(edges)]


def _numeric_bins(values: np.ndarray, bins: int) -> np.ndarray:
    # Encoded numeric values are in [0, 1]; 1.0 falls into the last bin. The definition
    # of a numeric bin: BinCounter counts with edges derived from it (_edges_below).
    index: np.ndarray = np.floor(np.clip(values, 0.0, 1.0) * bins).astype(np.int64)
    result: np.ndarray = np.minimum(index, bins - 1)
    return result


@functools.lru_cache(maxsize=64)
def _edges_below(dtype: np.dtype[Any], bins: int) -> np.ndarray:
    """Edges ``e`` such that ``x <= e[k-1]`` exactly when ``_numeric_bins(x) < k``.

    For k = 1 .. bins-1 the largest ``dtype`` value whose bin is below k, then +inf
    (every value but NaN is below it). :func:`_numeric_bins` is monotone in its input
    (clip, a multiplication and floor, each correctly rounded in ``dtype``), so counting
    values against these edges gives exactly its bins, rounding included, without
    computing a bin per value. Found by stepping down, one representable value at a
    time, from just above ``k / bins`` (two steps above: its bin is k, as the rounding
    errors of the division and the multiplication are half a step each); a test checks
    every dtype for every allowed number of bins.
    """
    kind = dtype.type
    up, down = kind(np.inf), kind(-np.inf)
    edges = []
    for k in range(1, bins):
        x = np.nextafter(np.nextafter(kind(k) / kind(bins), up), up)
        while _numeric_bins(np.array([x], dtype=dtype), bins)[0] >= k:
            x = np.nextafter(x, down)
        edges.append(x)
    return np.array([*edges, up], dtype=dtype)


#: Rows counted at once: bounds the temporaries, and keeps the float32 column sums of
#: indicators exact (integers below 2**24).
_CHUNK = 1 << 16


class BinCounter:
    """Running bin counts of a layout, kept flat so that adding a batch is a few NumPy calls.

    ``add`` bins a batch and forgets it; :meth:`histograms` splits the flat counts into
    one histogram per feature (and the output). Only counts are ever held.

    A batch is counted without a loop over rows and without a bin index per value:

    * indicator columns (categorical features): one comparison ``> 0.5`` over the whole
      batch, summed by column with one matrix-vector product (a vector of ones);
    * numeric features: their columns sorted at once, then one ``searchsorted`` per
      feature of the precomputed edges (:func:`_edges_below`), which gives how many
      values fall below each edge, hence the bins; the binary output's score likewise;
    * the class of a multi-class output: ``argmax`` and ``bincount``.

    The flat vector holds, in order: the count of values above 0.5 of every encoded
    column, then per numeric feature (and the score) the counts below each edge, then
    the class counts. The counts are those of the definition (a bin per value with
    :func:`_numeric_bins`, an indicator set when above 0.5); ``tests/drift`` checks them
    against a per-row loop. :meth:`count` keeps nothing, so a caller can count a batch
    outside its lock and :meth:`merge` the result under it.
    """

    def __init__(self, layout: ProfileLayout, *, with_output: bool) -> None:
        self.layout = layout
        self.with_output = with_output
        numeric = [f["start"] for f in layout.features if f["kind"] == "numeric"]
        first = numeric[0] if numeric else 0
        self._numeric: slice | list[int] = (
            slice(first, first + len(numeric))
            if numeric == list(range(first, first + len(numeric)))
            else numeric
        )
        self._n_numeric = len(numeric)
        self._score = with_output and layout.output_classes == 1
        self._classes = layout.output_classes if with_output and not self._score else 0
        bins = layout.bins
        below = layout.n_inputs  # where the counts below edges begin
        stop = below + (len(numeric) + self._score) * bins
        self._below = slice(below, stop)
        self._class = slice(stop, stop + self._classes)
        # The +inf edge of each: its count is the rows that are not NaN.
        self._not_nan = slice(below + bins - 1, stop, bins)
        self.counts = np.zeros(self._class.stop, dtype=np.float64)
        self.rows = 0
        self._ones = np.ones(0, dtype=np.float32)
        self._histogram_order()

    def add(self, inputs: np.ndarray, outputs: np.ndarray | None) -> int:
        """Count a batch (rows of encoded inputs); returns its number of rows.

        Raises:
            SchemaError: ``inputs`` does not have the layout's number of columns, or a
                numeric feature or the output is NaN (which has no bin).

        """
        counts, rows = self.count(inputs, outputs)
        self.merge(counts, rows)
        return rows

    def merge(self, counts: np.ndarray, rows: int) -> None:
        """Add the flat counts of a batch, as returned by :meth:`count`."""
        self.counts += counts
        self.rows += rows

    def count(self, inputs: np.ndarray, outputs: np.ndarray | None) -> tuple[np.ndarray, int]:
        """The flat counts of a batch and its number of rows (the batch is not kept).

        Raises:
            SchemaError: as :meth:`add`, or image or signal records that are not of the
                layout's shape.

        """
        if self.layout.records is not None:  # images, signals: count their statistics
            inputs = record_statistics(self.layout.records, inputs)
        inputs = np.asarray(inputs)
        if inputs.ndim != 2 or inputs.shape[1] != self.layout.n_inputs:
            raise SchemaError(
                f"inputs of shape {inputs.shape} do not match the profile's "
                f"{self.layout.n_inputs} encoded columns; encode them with the model's schema"
            )
        if inputs.dtype.kind != "f":  # NumPy clips and compares integers in float64
            inputs = inputs.astype(np.float64)
        if outputs is not None and self.with_output:
            outputs = np.asarray(outputs, dtype=np.float64)
            outputs = outputs[:, None] if outputs.ndim == 1 else outputs
        else:
            outputs = None
        rows = inputs.shape[0]
        if rows <= _CHUNK:
            counts = self._count(inputs, outputs) if rows else np.zeros_like(self.counts)
        else:
            counts = sum(
                (
                    self._count(
                        inputs[i : i + _CHUNK], None if outputs is None else outputs[i : i + _CHUNK]
                    )
                    for i in range(0, rows, _CHUNK)
                ),
                np.zeros_like(self.counts),
            )
        return counts, rows

    def _count(self, inputs: np.ndarray, outputs: np.ndarray | None) -> np.ndarray:
        rows = inputs.shape[0]
        if len(self._ones) < rows:
            self._ones = np.ones(rows, dtype=np.float32)
        # Categorical: indicator columns summed (the encoder sets exactly one per known
        # value); rows with none of a feature's indicators set are its "unknown" bin.
        parts: list[np.ndarray] = [self._ones[:rows] @ (inputs > 0.5)]
        if self._n_numeric:
            columns = np.ascontiguousarray(inputs[:, self._numeric].T)
            columns.sort(axis=1)  # NaN sorts last
            edges = _edges_below(inputs.dtype, self.layout.bins)
            parts += [column.searchsorted(edges, side="right") for column in columns]
        if outputs is not None and self._score:
            # One logit per row: bin the score sigmoid(logit) in [0, 1].
            logit = np.minimum(np.maximum(outputs[:, 0], -50.0), 50.0)  # np.clip, quicker
            score = np.sort(1.0 / (1.0 + np.exp(-logit)))
            parts.append(
                score.searchsorted(_edges_below(score.dtype, self.layout.bins), side="right")
            )
        elif outputs is not None:
            classes = np.bincount(outputs.argmax(axis=1), minlength=self._classes)
            if len(classes) > self._classes:
                raise SchemaError(
                    f"outputs have {outputs.shape[1]} columns, the profile "
                    f"{self._classes} classes; profile the model that produced them"
                )
            parts.append(classes)
        not_nan = self._not_nan
        if self._score and outputs is None:  # not given: its counts stay 0
            parts.append(np.zeros(self.layout.bins))
            not_nan = slice(not_nan.start, not_nan.stop - self.layout.bins, not_nan.step)
        counts = np.concatenate(parts, dtype=np.float64)
        if (counts[not_nan] != rows).any():
            raise SchemaError(
                "a numeric feature or the model output is NaN, which has no bin; "
                "replace missing values before inference"
            )
        return counts

    def histograms(self) -> dict[str, np.ndarray]:
        """One count vector per histogram name (features, then the output if counted)."""
        flat = self.flat_histograms()
        return dict(zip(self.names, np.split(flat, self._splits), strict=True))

    def flat_histograms(self) -> np.ndarray:
        """The histograms of :meth:`histograms` laid end to end, in the order of ``names``."""
        bins = self.layout.bins
        binned = np.diff(self.counts[self._below].reshape(-1, bins), axis=1, prepend=0.0)
        known = self.counts[self._known]
        unknown = (
            np.maximum(self.rows - np.add.reduceat(known, self._known_starts), 0.0)
            if len(known)
            else known
        )
        result: np.ndarray = np.concatenate((self.counts, binned.ravel(), unknown))[self._order]
        return result

    def _histogram_order(self) -> None:
        """Where each histogram's bins are taken from, for :meth:`flat_histograms`.

        From its sources laid end to end: the flat counts, the numeric bins (differences
        of the counts below edges, numeric features then the score), the unknown bin of
        each categorical feature.
        """
        bins = self.layout.bins
        binned = len(self.counts)
        unknown = binned + (self._n_numeric + self._score) * bins
        sources: list[range | list[int]] = []
        known: list[int] = []
        self._known_starts: list[int] = []
        numeric = itertools.count(binned, bins)  # where each numeric feature's bins are
        for feature in self.layout.features:
            if feature["kind"] == "numeric":
                start = next(numeric)
                sources.append(range(start, start + bins))
            else:
                columns = range(feature["start"], feature["stop"])
                self._known_starts.append(len(known))
                sources.append([*columns, unknown + len(self._known_starts) - 1])
                known += columns
        if self._score:
            start = next(numeric)
            sources.append(range(start, start + bins))
        elif self.with_output:
            sources.append(range(self._class.start, self._class.stop))
        self.names = self.layout.names[: len(sources)]
        self.lengths = [len(s) for s in sources]
        self._known = np.array(known, dtype=np.intp)
        self._order = np.array([i for s in sources for i in s], dtype=np.intp)
        self._splits = np.cumsum(self.lengths)[:-1]


def bin_counts(
    layout: ProfileLayout, inputs: np.ndarray, outputs: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Counts per bin of every histogram for a batch (no value is kept, only counts).

    Raises:
        SchemaError: ``inputs`` does not have the layout's number of columns, or a
            numeric feature or the output is NaN.

    """
    counter = BinCounter(layout, with_output=outputs is not None)
    counter.add(inputs, outputs)
    return counter.histograms()


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
