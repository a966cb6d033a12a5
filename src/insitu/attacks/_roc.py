"""ROC figures of a membership attack, their bootstrap intervals, and the DP bound.

An attack gives every record a score (higher: "more likely a member"). From the scores
of known members and non-members this module computes the ROC curve, its area, and the
true-positive rate at a fixed low false-positive rate, the figure Carlini et al. (2022)
argue is the one that matters: an attack that identifies a few records with certainty
is a privacy failure even when its AUC is near 0.5.

The bound. For an (epsilon, delta)-DP training algorithm, *every* membership test on a
record, whatever its threshold, satisfies ``TPR <= e^epsilon * FPR + delta``
(Kairouz, Oh and Viswanath 2015; the hypothesis-testing view of DP). A measured point
above it means the epsilon on paper is wrong: an accounting or implementation bug, or
a model that was not trained as recorded. A point estimate can cross the line by chance
on small sets, so a *violation* is declared only when the lower end of the bootstrap
interval is above the bound; a point estimate above it is reported as ``above_bound``.

Assumes: members and non-members are drawn from the same distribution (otherwise the
attack measures the distribution shift, not memorization). Does not cover: per-record
worst cases (the figures are averages over the sets given).

Written by hand (about a hundred lines of NumPy) rather than taken from scikit-learn:
the base install does not carry scikit-learn, and the bootstrap needs the curve
recomputed thousands of times on resampled sets, which is one vectorized sort here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MIN_FALSE_POSITIVES",
    "RocPoint",
    "RocSummary",
    "auc",
    "dp_tpr_bound",
    "required_non_members",
    "roc_curve",
    "summarize",
    "tpr_at_fpr",
]

#: A TPR at FPR f is read at the threshold that lets through ``f * n`` non-members; at
#: fewer than this many false positives the threshold is set by one or two outliers.
MIN_FALSE_POSITIVES = 10


def required_non_members(fpr: float) -> int:
    """Non-members needed to read a TPR at ``fpr`` (``MIN_FALSE_POSITIVES / fpr``)."""
    return math.ceil(MIN_FALSE_POSITIVES / fpr - 1e-9)


def dp_tpr_bound(fpr: float | np.ndarray, *, epsilon: float, delta: float) -> np.ndarray:
    """Largest TPR any test can reach at ``fpr`` against an (epsilon, delta)-DP algorithm.

    The full region is ``TPR <= min(e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR))``;
    both halves are used.
    """
    f = np.asarray(fpr, dtype=np.float64)
    low = math.exp(epsilon) * f + delta
    high = 1.0 - math.exp(-epsilon) * (1.0 - delta - f)
    return np.minimum(np.minimum(low, high), 1.0)


def roc_curve(members: np.ndarray, non_members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1); ties count together."""
    scores = np.concatenate([members, non_members])
    is_member = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    tps = np.cumsum(is_member)
    fps = np.cumsum(1 - is_member)
    # Keep the last index of each run of equal scores: a threshold admits all of them.
    last = np.r_[np.flatnonzero(np.diff(scores) != 0), len(scores) - 1]
    tpr = np.r_[0.0, tps[last] / max(len(members), 1)]
    fpr = np.r_[0.0, fps[last] / max(len(non_members), 1)]
    return fpr, tpr


def auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """Area under the ROC curve: P(member score > non-member score), ties count half."""
    return float(_auc_batch(members[None, :], non_members[None, :])[0])


def _auc_batch(members: np.ndarray, non_members: np.ndarray) -> np.ndarray:
    """AUC of each row (Mann-Whitney U with mid-ranks), vectorized over rows."""
    n1, n0 = members.shape[1], non_members.shape[1]
    both = np.concatenate([members, non_members], axis=1)
    order = np.argsort(both, axis=1, kind="stable")
    sorted_scores = np.take_along_axis(both, order, axis=1)
    ranks = np.empty_like(both, dtype=np.float64)
    rows = np.arange(both.shape[0])[:, None]
    ranks[rows, order] = np.arange(1, both.shape[1] + 1, dtype=np.float64)[None, :]
    # Mid-ranks for ties, row by row only where ties exist (rare with float scores).
    for r in np.flatnonzero((np.diff(sorted_scores, axis=1) == 0).any(axis=1)):
        values, inverse = np.unique(both[r], return_inverse=True)
        sums = np.bincount(inverse, weights=ranks[r], minlength=len(values))
        counts = np.bincount(inverse, minlength=len(values))
        ranks[r] = (sums / counts)[inverse]
    u = ranks[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2
    result: np.ndarray = u / (n1 * n0)
    return result


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float) -> float:
    """TPR at the strictest threshold that lets through at most ``fpr`` of non-members."""
    return float(_tpr_batch(members[None, :], non_members[None, :], fpr)[0])


def _tpr_batch(members: np.ndarray, non_members: np.ndarray, fpr: float) -> np.ndarray:
    allowed = math.floor(fpr * non_members.shape[1] + 1e-9)
    ordered = -np.sort(-non_members, axis=1)
    # Threshold: strictly above the (allowed+1)-th largest non-member score, so at most
    # ``allowed`` non-members pass (ties at the threshold are all rejected).
    threshold = ordered[:, min(allowed, ordered.shape[1] - 1)]
    result: np.ndarray = (members > threshold[:, None]).mean(axis=1)
    return result


@dataclass(frozen=True)
class RocPoint:
    """TPR at one FPR, its bootstrap interval, and the DP bound there (if any)."""

    fpr: float
    tpr: float
    tpr_low: float
    tpr_high: float
    bound: float | None

    @property
    def above_bound(self) -> bool:
        """The point estimate lies above the DP bound (may be chance on small sets)."""
        return self.bound is not None and self.tpr > self.bound

    @property
    def violation(self) -> bool:
        """Even the interval's lower end is above the bound: the epsilon cannot be right."""
        return self.bound is not None and self.tpr_low > self.bound

    def to_json(self) -> dict[str, object]:
        """Figures only."""
        return {
            "fpr": self.fpr,
            "tpr": round(self.tpr, 6),
            "tpr_ci": [round(self.tpr_low, 6), round(self.tpr_high, 6)],
            "bound": None if self.bound is None else round(self.bound, 6),
            "above_bound": self.above_bound,
            "violation": self.violation,
        }


@dataclass(frozen=True)
class RocSummary:
    """AUC and TPRs at low FPRs, with 95% bootstrap intervals."""

    auc: float
    auc_low: float
    auc_high: float
    points: tuple[RocPoint, ...]
    fpr_curve: np.ndarray
    tpr_curve: np.ndarray

    def to_json(self) -> dict[str, object]:
        """Figures only (the curve is left to the plot)."""
        return {
            "auc": round(self.auc, 6),
            "auc_ci": [round(self.auc_low, 6), round(self.auc_high, 6)],
            "points": [p.to_json() for p in self.points],
        }


def summarize(
    members: np.ndarray,
    non_members: np.ndarray,
    *,
    fprs: tuple[float, ...],
    epsilon: float | None = None,
    delta: float = 0.0,
    bootstrap: int = 1000,
    seed: int = 0,
) -> RocSummary:
    """ROC figures with 95% percentile intervals from a stratified bootstrap.

    Members and non-members are resampled separately (each with replacement, its own
    size), as the two sets are sampled separately in an audit.
    """
    members = np.asarray(members, dtype=np.float64)
    non_members = np.asarray(non_members, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot_m = members[rng.integers(0, len(members), size=(bootstrap, len(members)))]
    boot_n = non_members[rng.integers(0, len(non_members), size=(bootstrap, len(non_members)))]
    aucs = _auc_batch(boot_m, boot_n)
    points = []
    for fpr in fprs:
        tprs = _tpr_batch(boot_m, boot_n, fpr)
        bound = None if epsilon is None else float(dp_tpr_bound(fpr, epsilon=epsilon, delta=delta))
        points.append(
            RocPoint(
                fpr=fpr,
                tpr=tpr_at_fpr(members, non_members, fpr),
                tpr_low=float(np.quantile(tprs, 0.025)),
                tpr_high=float(np.quantile(tprs, 0.975)),
                bound=bound,
            )
        )
    fpr_curve, tpr_curve = roc_curve(members, non_members)
    return RocSummary(
        auc=auc(members, non_members),
        auc_low=float(np.quantile(aucs, 0.025)),
        auc_high=float(np.quantile(aucs, 0.975)),
        points=tuple(points),
        fpr_curve=fpr_curve,
        tpr_curve=tpr_curve,
    )
