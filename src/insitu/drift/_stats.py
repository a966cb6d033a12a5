"""Drift statistics per feature: population stability index and a chi-square two-sample test.

Both compare binned counts (the only thing the monitor keeps). The two-sample test is
Pearson's chi-square test of homogeneity on the 2 x K table (reference counts, live
counts; ``scipy.stats.chi2_contingency``), over the bins that are non-empty in either
row. The reference row holds *noisy* counts: the test treats them as a sample, which is
conservative for the large counts a reference has (noise of a few units on thousands).

A feature is flagged when *both* hold: PSI at or above its threshold (the shift is large
enough to matter) and the test's p-value below its threshold (it is not sampling noise),
once at least ``min_samples`` rows were seen. PSI alone flags small samples by chance;
the test alone flags negligible shifts once samples are large.

The test's tail, P(chi-square with k degrees of freedom > x), is computed here
(:func:`chi_square_tail`) rather than by ``scipy.special.chdtrc``: a device install has no
SciPy (about 100 MB, and 16 MB of resident memory for this one function), and for the
whole degrees of freedom a table has, the tail is a finite sum in closed form (Abramowitz
and Stegun 26.4.4 and 26.4.5), summed in log space. A test holds it to SciPy's figure.

A monitor's check compares all its histograms at once (:class:`ReferenceHistograms`):
the same figures as the one-histogram functions, to the last bit, for a fraction of the
NumPy calls (about a quarter of the time on Adult's 14 histograms).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from insitu.errors import UsageError

__all__ = [
    "FeatureDrift",
    "ReferenceHistogram",
    "ReferenceHistograms",
    "chi_square_tail",
    "population_stability_index",
    "two_sample_p_value",
]

#: Floor of a bin's proportion in PSI, so that an empty bin does not give infinity.
PSI_FLOOR = 1e-4


def chi_square_tail(dof: int, statistic: float) -> float:
    """P(X > ``statistic``) for X chi-square with ``dof`` (a whole number >= 1) degrees.

    With y = x / 2 and k = ``dof``: for even k, e^-y * sum_{i<k/2} y^i / i!; for odd k,
    erfc(sqrt(y)) + e^-y * sum_{i<(k-1)/2} y^(i+1/2) / Gamma(i+3/2). The terms are
    summed from their logarithms, so neither a large statistic nor many degrees of
    freedom overflow. NaN stays NaN (no test), infinity gives 0.
    """
    if math.isnan(statistic):
        return math.nan
    if statistic <= 0:
        return 1.0
    if math.isinf(statistic):
        return 0.0
    y = statistic / 2.0
    if y == 0.0:  # a subnormal statistic
        return 1.0
    log_y = math.log(y)
    half, odd = divmod(int(dof), 2)
    if odd:
        logs = [(i + 0.5) * log_y - y - math.lgamma(i + 1.5) for i in range(half)]
        head = math.erfc(math.sqrt(y))
    else:
        logs = [i * log_y - y - math.lgamma(i + 1.0) for i in range(half)]
        head = 0.0
    if not logs:
        return head
    top = max(logs)
    series = math.exp(top) * math.fsum(math.exp(v - top) for v in logs)
    return min(1.0, head + series)


class ReferenceHistogram:
    """One reference histogram, prepared once for any number of comparisons.

    The monitor compares the same reference with live counts at every check: it keeps one
    of these per histogram so that the reference's share of the work (clipping, total,
    proportions) is done once. :func:`population_stability_index` and
    :func:`two_sample_p_value` are one-off uses of it, so both paths compute the same
    figures, to the last bit.
    """

    __slots__ = ("counts", "proportions", "total")

    def __init__(self, reference: np.ndarray | list[float]) -> None:
        self.counts: np.ndarray = np.clip(np.asarray(reference, dtype=np.float64), 0.0, None)
        self.total = float(self.counts.sum())
        self.proportions: np.ndarray | None = (
            None if self.total <= 0 else np.maximum(self.counts / self.total, PSI_FLOOR)
        )

    def psi(self, live: np.ndarray) -> float:
        """PSI of ``live`` against this reference (see :func:`population_stability_index`)."""
        cur = np.maximum(np.asarray(live, dtype=np.float64), 0.0)  # np.clip, quicker
        total = cur.sum()
        if self.proportions is None or total <= 0:
            return 0.0
        p = self.proportions
        q = np.maximum(cur / total, PSI_FLOOR)
        return float(np.sum((q - p) * np.log(q / p)))

    def p_value(self, live: np.ndarray) -> float:
        """Chi-square p-value of ``live`` against this reference (:func:`two_sample_p_value`)."""
        ref = self.counts
        cur = np.maximum(np.asarray(live, dtype=np.float64), 0.0)
        keep = (ref + cur) > 0
        kept = int(np.count_nonzero(keep))
        if kept < 2 or self.total <= 0 or cur.sum() <= 0:
            return 1.0
        if kept < len(keep):
            ref, cur = ref[keep], cur[keep]
        table = np.concatenate((ref, cur)).reshape(2, kept)
        total = table.sum()
        expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / total
        statistic = float(np.sum((table - expected) ** 2 / expected))
        p = chi_square_tail(kept - 1, statistic)
        return 1.0 if math.isnan(p) else p


class ReferenceHistograms:
    """Several reference histograms compared with live counts at once (a monitor's check).

    The figures are those of :class:`ReferenceHistogram` (so of
    :func:`population_stability_index` and :func:`two_sample_p_value`) for each
    histogram, to the last bit, for a fraction of the calls: the elementwise arithmetic
    runs once over all histograms laid end to end, and only the sums are taken one
    histogram at a time, each over the same contiguous values in the same order as the
    one-histogram code takes it (a floating-point sum depends on its order;
    ``tests/drift`` checks the equality).
    """

    def __init__(self, references: Sequence[np.ndarray | list[float]]) -> None:
        prepared = [ReferenceHistogram(r) for r in references]
        lengths = [len(r.counts) for r in prepared]
        if not lengths or min(lengths) < 1:
            raise UsageError("compare at least one reference histogram, each of at least one bin")
        self._bounds = np.cumsum([0, *lengths])
        self._spans = list(itertools.pairwise(self._bounds.tolist()))
        self._starts = self._bounds[:-1]
        self._segment = np.repeat(np.arange(len(prepared)), lengths)
        self.counts = np.concatenate([r.counts for r in prepared])
        self.totals = np.array([r.total for r in prepared])
        # Proportions of a reference without counts are never used (its PSI is 0).
        self.proportions = np.concatenate(
            [np.ones(len(r.counts)) if r.proportions is None else r.proportions for r in prepared]
        )

    def compare(self, live: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """PSI, p-value and total count of each histogram.

        ``live`` holds the live counts of all histograms laid end to end, in the order of
        the references.

        Raises:
            UsageError: ``live`` does not have one count per reference bin.

        """
        live = np.asarray(live, dtype=np.float64)
        if live.shape != self.counts.shape:
            raise UsageError(
                f"{live.size} live counts for {len(self.counts)} reference bins; "
                "lay the histograms end to end in the order of the references"
            )
        cur = np.maximum(live, 0.0)
        # Sums of whole numbers below 2**53 are exact in any order: one reduceat for all.
        whole = bool(np.abs(live).sum() < 2**53) and bool((np.floor(live) == live).all())
        if whole:
            rows = np.add.reduceat(live, self._starts)
            total = np.add.reduceat(cur, self._starts)
        else:
            rows, total = self._sums(live, self._spans), self._sums(cur, self._spans)
        with np.errstate(all="ignore"):  # histograms without counts: their figures are set
            psi = self._psi(cur, total)
            p_value = self._p_value(cur, total if whole else None)
        return psi, p_value, rows

    @staticmethod
    def _sums(values: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
        reduce = np.add.reduce  # what ndarray.sum calls, without its wrappers
        return np.array([reduce(values[a:b]) for a, b in spans], dtype=np.float64)

    def _psi(self, cur: np.ndarray, total: np.ndarray) -> np.ndarray:
        p = self.proportions
        q = np.maximum(cur / total[self._segment], PSI_FLOOR)
        psi = self._sums((q - p) * np.log(q / p), self._spans)
        return np.where((self.totals <= 0) | (total <= 0), 0.0, psi)

    def _p_value(self, cur: np.ndarray, live_total: np.ndarray | None) -> np.ndarray:
        # Each histogram's 2 x k table (its kept bins) is laid out flat as the
        # one-histogram code holds it: the reference row, then the live row.
        keep = (self.counts + cur) > 0
        kept = np.add.reduceat(keep, self._starts, dtype=np.intp)
        ref, live, segment = self.counts[keep], cur[keep], self._segment[keep]
        start = np.cumsum(kept) - kept
        position = np.arange(len(ref)) + start[segment]  # 2 * start + index in the row
        table = np.empty(2 * len(ref))
        table[position] = ref
        table[position + kept[segment]] = live
        first, middle, end = (
            (2 * start).tolist(),
            (2 * start + kept).tolist(),
            (2 * start + 2 * kept).tolist(),
        )
        whole = list(zip(first, end, strict=True))
        # Row sums: a reference row with every bin kept is the reference itself (its
        # total, summed alike); live rows drop only zeros, and whole counts sum exactly.
        ref_sum = self.totals.copy()
        cut = np.flatnonzero(kept != np.diff(self._bounds))
        ref_sum[cut] = self._sums(table, [(first[i], middle[i]) for i in cut.tolist()])
        live_sum = (
            live_total
            if live_total is not None
            else self._sums(table, list(zip(middle, end, strict=True)))
        )
        table_sum = self._sums(table, whole)
        column = ref + live
        expected = np.empty_like(table)
        expected[position] = ref_sum[segment] * column / table_sum[segment]
        expected[position + kept[segment]] = live_sum[segment] * column / table_sum[segment]
        statistic = self._sums((table - expected) ** 2 / expected, whole)
        p = np.array(
            [
                chi_square_tail(k, x)
                for k, x in zip((kept - 1).tolist(), statistic.tolist(), strict=True)
            ]
        )
        tested = (kept >= 2) & ~(self.totals <= 0) & ~(live_sum <= 0) & ~np.isnan(p)
        result: np.ndarray = np.where(tested, p, 1.0)
        return result


def population_stability_index(reference: np.ndarray, live: np.ndarray) -> float:
    """PSI = sum over bins of (live - ref) * ln(live / ref), on proportions (floored)."""
    return ReferenceHistogram(reference).psi(live)


def two_sample_p_value(reference: np.ndarray, live: np.ndarray) -> float:
    """p-value of Pearson's chi-square test that both count vectors share a distribution.

    The statistic of ``scipy.stats.chi2_contingency`` (no continuity correction) on the
    2 x K table, computed with NumPy and its tail from :func:`chi_square_tail`: the
    same figure (a test checks it) at a fraction of the cost, which matters because the
    runtime's monitor runs it for every feature.
    """
    return ReferenceHistogram(reference).p_value(live)


@dataclass(frozen=True)
class FeatureDrift:
    """The drift figures of one feature (or of the output) at one moment."""

    feature: str
    psi: float
    p_value: float
    rows: int
    flagged: bool

    def to_json(self) -> dict[str, object]:
        """As stored and printed."""
        return {
            "feature": self.feature,
            "psi": round(self.psi, 6),
            "p_value": float(f"{self.p_value:.6g}"),
            "rows": self.rows,
            "flagged": self.flagged,
        }
