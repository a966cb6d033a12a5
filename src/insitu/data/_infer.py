"""A data schema inferred from the data itself, under differential privacy (simulation only).

``insitu federate simulate --label COLUMN`` has no schema; it infers one from the table.
A schema is published: it travels into ``models/<run>/features.json`` and into every
site's plaintext ``prepared/*/manifest.json``. An inferred schema must therefore hold no
value that identifies anyone. :func:`infer_schema` guarantees it in two steps.

**1. Identifier-looking columns are never features.** Every column but the label is
scanned (:func:`insitu.data._detect.identifier_columns`): e-mail addresses, phone, card
and IBAN numbers, possible dates of birth, or a value unique to its row (text ids,
whole-number keys). Such a column becomes ``identifiers.direct`` and ``treatment.drop``,
with one line in :attr:`InferredSchema.warnings` naming the fix (write a schema and
declare it). The label is never dropped.

**2. Vocabularies and ranges are released under (epsilon, delta)-DP.** For every
remaining column a histogram is built: a categorical column counts each observed
category; a numeric column counts its values over :data:`GRID`, a fixed, public,
data-independent grid of "nice" bin edges (0 and +-{1, 1.5, 2, 3, 5, 7} x 10^k for
k = -3..9, values beyond it counted in the outermost bins). The label gets a histogram
too unless it has exactly two values (below). Under add-or-remove adjacency one record
adds 1 to one bin of each of the C histograms, so their concatenation has L2
sensitivity sqrt(C). Gaussian noise of standard deviation ``sigma * sqrt(C)`` is added
to every count, ``sigma`` from :func:`insitu.privacy.calibrate_noise` at
``(epsilon, delta / 2)`` for one Gaussian mechanism, and drawn by
:class:`insitu.privacy.SecureRandom` (never a seeded generator). Then only bins whose
noisy count exceeds a threshold ``tau`` are used:

* a category is kept only if its noisy count exceeds ``tau`` (a column none of whose
  categories does is dropped, with a warning); a category outside the vocabulary
  encodes as all zeros (:class:`insitu.data.FeatureEncoder` one-hots over the declared
  categories only), so leaving rare categories out loses no row;
* a numeric range is [lower edge of the first bin whose noisy count exceeds
  :data:`WINDOW_Z` noise standard deviations, upper edge of the last one]: grid edges,
  never an observed value. The grid is public and every one of its bins is released
  noisy, so any function of those counts is post-processing and needs no ``tau``; the
  lower threshold keeps the chance that an empty bin widens a range below 0.1% per
  column. On a small table no single bin may pass: windows of two, four, eight...
  adjacent bins then slide over the grid (their noise adds up more slowly than their
  counts), and the narrowest width at which some window passes gives the range, with a
  warning to declare it. Values outside the range are clipped by the encoder;
* the label's values are needed to train. Exactly two distinct values (a binary label):
  they are taken as public, as the column names are (they define the task, e.g.
  ``>50K``), and the second in sorted order is the positive class. Otherwise the values
  whose noisy counts exceed ``tau`` are kept; if exactly two are, the label is binary
  over them, else it is multi-class and the schema names no label value.

Why this is DP: it is the Gaussian "DP set union" / stability-histogram construction
(Korolova et al. 2009; Wilson et al. 2020, *Differentially private SQL with bounded user
contribution*; Gopi et al. 2020, *Differentially private set union*), with ``delta``
split in two. Take neighbouring tables D and D' = D + one record r. Bins present in
both (every numeric grid bin, and the categories other records also hold) receive
Gaussian noise calibrated to sensitivity sqrt(C): (epsilon, delta/2)-DP. Bins present
only in D' are the categories r alone holds: at most one per thresholded histogram, so
at most m (the number of categorical histograms, label included when thresholded), each
with true count 1. ``tau = 1 + std * z`` with ``z`` the normal quantile at
``1 - delta / (2 m)`` makes the chance that any of them is released at most delta/2
(union bound; for m = 1 this is the quantile at 1 - delta/2). Only the set of passing
bins is released, never a count: post-processing. Total: (epsilon, delta)-DP, recorded
as the one event ``PrivacyEvent(sigma, 1.0, 1)`` (:attr:`InferredSchema.event`), which
:func:`insitu.privacy.epsilon_of` accounts at at most ``epsilon`` for ``delta``.

What it costs: ``epsilon`` itself (one release; compose it with whatever else is spent
on the same records), and utility, because ``tau`` is large. At epsilon 1 and delta 1e-6,
``sigma`` is 4.37; the Adult table has 14 histograms (6 numeric, 8 categorical), so the
noise standard deviation is 16.3 records and ``tau`` about 87 records: a category or a
range bin needs roughly that many records to appear, and small tables lose most of
their vocabulary (3,000 Adult rows keep about 35 of their 91 categories; ``country``
keeps only ``United-States``). Ranges are grid edges around the bulk of the data, not
its extremes (ages 17..90 become [15, 70]; the encoder clips the rest).

What it does not cover: the *structure* of the schema (which columns are identifiers,
numeric or categorical, whether the label has two values) is decided from the data
without noise, as the author of any hand-written schema decides it by looking at the
data. It can reveal a per-column fact ("some value of column X looks like an e-mail
address"), never a value. The two values of a binary label are published as they are.

Why hand-written: no maintained library releases a *schema* (vocabularies and ranges
for an encoder) under DP. OpenDP and PipelineDP offer the building blocks (Gaussian
noise, partition selection) for aggregations, but neither is an insitu dependency (of
Google's DP libraries insitu uses only ``dp-accounting``), and the construction is a
few lines on top of insitu's own accountant and secret noise, which every other release
in insitu already uses.

:meth:`insitu.data.DataSchema.infer` stays as the non-private variant, for tables that
are already public (a published benchmark); it drops identifier-looking columns too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from insitu.data._detect import identifier_columns
from insitu.data._schema import DataSchema
from insitu.errors import SchemaError, UsageError
from insitu.privacy import PrivacyEvent, SecureRandom, calibrate_noise

__all__ = ["GRID", "WINDOW_Z", "InferredSchema", "infer_schema"]

logger = logging.getLogger(__name__)

_MANTISSAS = ("1", "1.5", "2", "3", "5", "7")
_EXPONENTS = range(-3, 10)
_POSITIVE = tuple(float(f"{m}e{k}") for k in _EXPONENTS for m in _MANTISSAS)

#: The public bin edges of every numeric histogram: 0 and +-{1, 1.5, 2, 3, 5, 7} x 10^k,
#: k = -3..9 (157 edges, 156 bins). Bin i is [GRID[i], GRID[i + 1]); values below the
#: first edge or at or above the last are counted in the outermost bins.
GRID: tuple[float, ...] = (*(-e for e in reversed(_POSITIVE)), 0.0, *_POSITIVE)
#: Noise standard deviations a window of grid bins must exceed to count as held (a
#: range): 0.1% over every window of every width of a column, by a union bound.
WINDOW_Z = NormalDist().inv_cdf(1.0 - 0.001 / ((len(GRID) - 1) * math.log2(len(GRID)) * 2))

#: Fix named by the warning of every dropped identifier-looking column.
_FIX = "write a schema (insitu data inspect FILE) and declare it an identifier"


@dataclass(frozen=True)
class InferredSchema:
    """A schema inferred under DP, what the release cost and what was left out.

    ``event`` is the one Gaussian mechanism the release cost (None when nothing
    data-dependent was released); ``dropped`` maps each column left out to why;
    ``warnings`` has one line per dropped column or defaulted range, naming the fix.
    ``noise_std`` and ``threshold`` (``tau``) are in records (counts).
    """

    schema: DataSchema
    event: PrivacyEvent | None
    dropped: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    epsilon: float = 0.0
    delta: float = 0.0
    noise_std: float | None = None
    threshold: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The inference as recorded (schema source, cost, dropped columns, warnings)."""
        return {
            "schema": self.schema.source,
            "event": self.event.to_json() if self.event is not None else None,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "noise_std": self.noise_std,
            "threshold": self.threshold,
            "dropped": dict(self.dropped),
            "warnings": list(self.warnings),
        }


def _grid_counts(values: pd.Series) -> np.ndarray:
    """Counts of ``values`` over the public grid's bins (outermost bins take the rest)."""
    edges = np.asarray(GRID)
    index = np.searchsorted(edges, values.to_numpy(dtype=np.float64), side="right") - 1
    index = np.clip(index, 0, len(edges) - 2)
    return np.bincount(index, minlength=len(edges) - 1).astype(np.float64)


def _held_range(noisy: np.ndarray, std: float) -> tuple[float, float, int]:
    """The grid range its records hold, from noisy counts only (post-processing).

    Windows of 1, 2, 4... adjacent bins slide over the grid; at the narrowest width where
    some window's noisy sum exceeds :data:`WINDOW_Z` times its noise (a threshold that
    keeps the chance of any empty window passing, over every width and position, below
    0.1%), the range runs from the first such window to the last. Returns
    (low, high, window width in bins).
    """
    sums = np.concatenate([[0.0], np.cumsum(noisy)])
    width = 1
    while width <= len(noisy):
        window = sums[width:] - sums[:-width]
        passing = np.flatnonzero(window > WINDOW_Z * std * math.sqrt(width))
        if len(passing):
            return GRID[int(passing[0])], GRID[int(passing[-1]) + width], width
        width *= 2
    return GRID[0], GRID[-1], width


def infer_schema(  # noqa: PLR0912, PLR0915 -- one step per rule of the module docstring
    frame: pd.DataFrame,
    *,
    label: str,
    name: str = "dataset",
    epsilon: float,
    delta: float,
) -> InferredSchema:
    """Infer a schema from ``frame`` under (``epsilon``, ``delta``)-DP; see the module docstring.

    Args:
        frame: the whole table (every column is considered).
        label: the column to predict; never dropped.
        name: the data set's name in the schema.
        epsilon: privacy loss of the release (DP epsilon, add-or-remove one record).
        delta: DP delta of the release, in (0, 1); take it well below 1 / rows.

    Raises:
        SchemaError: the label is not a column of ``frame``.
        UsageError: ``epsilon`` or ``delta`` out of range.

    """
    if label not in frame.columns:
        raise SchemaError(
            f"label column {label!r} is not in the data (its columns: "
            f"{', '.join(map(str, frame.columns))})"
        )
    if not (0 < epsilon < math.inf) or not (0 < delta < 1):
        raise UsageError(f"epsilon {epsilon} must be positive and delta {delta} in (0, 1)")
    warnings: list[str] = []
    identifiers = identifier_columns(frame, label=label)
    dropped = dict(identifiers)
    for column, why in identifiers.items():
        warnings.append(f"column {column!r} looks like an identifier ({why}): dropped; {_FIX}")

    numeric: list[str] = []
    categorical: list[str] = []
    histograms: dict[str, np.ndarray] = {}  # column (features and label) -> counts
    vocabularies: dict[str, list[str]] = {}
    for raw in frame.columns:
        column = str(raw)
        if column == label or column in dropped:
            continue
        values = pd.to_numeric(frame[raw], errors="coerce")
        if values.notna().all():
            numeric.append(column)
            histograms[column] = _grid_counts(values)
        else:
            counts = frame[raw].astype(str).value_counts(sort=False).sort_index()
            categorical.append(column)
            vocabularies[column] = [str(v) for v in counts.index]
            histograms[column] = counts.to_numpy(dtype=np.float64)
    label_values = sorted(frame[label].astype(str).unique().tolist())
    label_counts: pd.Series | None = None
    if len(label_values) != 2:
        label_counts = frame[label].astype(str).value_counts(sort=False).sort_index()
        histograms[label] = label_counts.to_numpy(dtype=np.float64)

    event: PrivacyEvent | None = None
    std = tau = math.inf  # nothing is released when there is nothing to count
    noisy: dict[str, np.ndarray] = {}
    if histograms:
        sigma = calibrate_noise(target_epsilon=epsilon, delta=delta / 2, sample_rate=1.0, steps=1)
        event = PrivacyEvent(sigma, 1.0, 1)
        std = sigma * math.sqrt(len(histograms))
        thresholded = len(categorical) + (label_counts is not None)
        z = NormalDist().inv_cdf(1.0 - delta / (2.0 * max(1, thresholded)))
        tau = 1.0 + std * z
        noise = SecureRandom().normal((sum(len(h) for h in histograms.values()),), std=std)
        start = 0
        for column, exact in histograms.items():
            noisy[column] = exact + noise[start : start + len(exact)]
            start += len(exact)

    ranges: dict[str, list[float]] = {}
    for column in numeric:
        low, high, width = _held_range(noisy[column], std)
        ranges[column] = [low, high]
        if width > 1:
            warnings.append(
                f"column {column!r}: too few records to release its range precisely; using "
                f"[{low:g}, {high:g}] (windows of {width} grid bins): declare "
                f"features.ranges.{column} in a schema (insitu data inspect FILE)"
            )
    categories: dict[str, list[str]] = {}
    for column in categorical:
        kept = [v for v, c in zip(vocabularies[column], noisy[column], strict=True) if c > tau]
        if kept:
            categories[column] = kept
        else:
            dropped[column] = "no category held by enough records"
            warnings.append(
                f"column {column!r}: no category is held by enough records to be released "
                f"(threshold {tau:.0f}): dropped; write a schema (insitu data inspect FILE) "
                f"and declare features.categories.{column}"
            )
    categorical = [c for c in categorical if c in categories]

    positive: str | None = None
    if label_counts is None:
        positive = label_values[1]
    else:
        passing_labels = [
            str(v) for v, c in zip(label_counts.index, noisy[label], strict=True) if c > tau
        ]
        if len(passing_labels) == 2:
            positive = sorted(passing_labels)[1]

    doc: dict[str, Any] = {
        "dataset": {"name": name, "label": label},
        "features": {
            "numeric": numeric,
            "categorical": categorical,
            "ranges": ranges,
            "categories": categories,
        },
        "identifiers": {"direct": list(identifiers)},
        "treatment": {"drop": list(dropped)},
        "consent": {
            "required": False,
            "legal_basis": (
                "simulation on one machine (schema inferred under differential privacy, "
                "no real subjects)"
            ),
        },
    }
    if positive is not None:
        doc["dataset"]["positive"] = positive
    for line in warnings:
        logger.warning("%s", line)
    return InferredSchema(
        schema=DataSchema.from_dict(doc),
        event=event,
        dropped=dropped,
        warnings=warnings,
        epsilon=epsilon,
        delta=delta,
        noise_std=std if event is not None else None,
        threshold=tau if event is not None else None,
    )
