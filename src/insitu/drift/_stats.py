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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["FeatureDrift", "population_stability_index", "two_sample_p_value"]

#: Floor of a bin's proportion in PSI, so that an empty bin does not give infinity.
PSI_FLOOR = 1e-4


def population_stability_index(reference: np.ndarray, live: np.ndarray) -> float:
    """PSI = sum over bins of (live - ref) * ln(live / ref), on proportions (floored)."""
    ref = np.clip(np.asarray(reference, dtype=np.float64), 0.0, None)
    cur = np.clip(np.asarray(live, dtype=np.float64), 0.0, None)
    if ref.sum() <= 0 or cur.sum() <= 0:
        return 0.0
    p = np.maximum(ref / ref.sum(), PSI_FLOOR)
    q = np.maximum(cur / cur.sum(), PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def two_sample_p_value(reference: np.ndarray, live: np.ndarray) -> float:
    """p-value of Pearson's chi-square test that both count vectors share a distribution.

    The statistic of ``scipy.stats.chi2_contingency`` (no continuity correction) on the
    2 x K table, computed with NumPy and its tail from ``scipy.special.chdtrc``: the
    same figure (a test checks it) at a fraction of the cost, which matters because the
    runtime's monitor runs it for every feature.
    """
    from scipy.special import chdtrc

    ref = np.clip(np.asarray(reference, dtype=np.float64), 0.0, None)
    cur = np.clip(np.asarray(live, dtype=np.float64), 0.0, None)
    keep = (ref + cur) > 0
    if keep.sum() < 2 or ref.sum() <= 0 or cur.sum() <= 0:
        return 1.0
    table = np.vstack([ref[keep], cur[keep]])
    total = table.sum()
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / total
    statistic = float(np.sum((table - expected) ** 2 / expected))
    p = float(chdtrc(table.shape[1] - 1, statistic))
    return 1.0 if math.isnan(p) else p


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
