"""Splitting one table into simulated sites: IID, by a column, or label-skewed (Dirichlet).

Only the simulation partitions data: real sites hold their own. The split is of *row
indices*, done before any site prepares its part, so each simulated site pseudonymizes
with its own key exactly as a real one would.

Invariant: a row's site depends on the row (its subject's keyed token, drawn into
``uniform``), never on its position or on ``--seed``. A person is at the same simulated
site in every run, as in a real federation, so a site's per-subject privacy budget
cannot be escaped by renaming the file or shuffling its rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from insitu.errors import UsageError

__all__ = ["partition"]

MIN_ROWS = 20
#: The Dirichlet shares are drawn from a fixed stream: they are part of the simulated
#: world, like which hospital a patient goes to, not of a run's settings.
_SHARES_SEED = 20_240_601


def partition(
    frame: pd.DataFrame, spec: str, sites: int, *, label: str, uniform: np.ndarray
) -> list[np.ndarray]:
    """Row indices of each site; ``uniform`` holds one fixed number in [0, 1) per row.

    Every site gets at least ``MIN_ROWS`` rows.
    """
    n = len(frame)
    if n < sites * MIN_ROWS:
        raise UsageError(f"{n} rows cannot make {sites} sites of at least {MIN_ROWS} rows")
    if spec == "iid":
        site = np.minimum((uniform * sites).astype(np.int64), sites - 1)
        parts = [np.flatnonzero(site == s) for s in range(sites)]
        if min(len(p) for p in parts) < MIN_ROWS:
            raise UsageError(
                f"{n} rows left a site with fewer than {MIN_ROWS} rows; use fewer sites"
            )
        return parts
    if spec.startswith("by:"):
        return _by_column(frame, spec[3:], sites)
    return _dirichlet(frame[label].to_numpy(), float(spec.split(":", 1)[1]), sites, uniform)


def _by_column(frame: pd.DataFrame, column: str, sites: int) -> list[np.ndarray]:
    if column not in frame.columns:
        raise UsageError(f"--partition by:{column}: no column {column!r} in the data")
    groups = frame.groupby(column, sort=True).indices
    if len(groups) < sites:
        raise UsageError(
            f"--partition by:{column}: {len(groups)} distinct values cannot make {sites} sites"
        )
    # Largest groups first, each to the currently smallest site: balanced, deterministic.
    buckets: list[list[int]] = [[] for _ in range(sites)]
    for _, indices in sorted(groups.items(), key=lambda kv: (-len(kv[1]), str(kv[0]))):
        smallest = min(range(sites), key=lambda s: len(buckets[s]))
        buckets[smallest].extend(np.asarray(indices).tolist())
    return [np.sort(np.asarray(b, dtype=np.int64)) for b in buckets]


def _dirichlet(
    labels: np.ndarray, alpha: float, sites: int, uniform: np.ndarray
) -> list[np.ndarray]:
    if alpha <= 0:
        raise UsageError("dirichlet:ALPHA needs ALPHA > 0 (smaller is more skewed, e.g. 0.5)")
    rng = np.random.default_rng(_SHARES_SEED)
    values = np.unique(labels.astype(str))
    as_text = labels.astype(str)
    for _ in range(100):
        site = np.zeros(len(labels), dtype=np.int64)
        for value in values:
            rows = as_text == value
            cuts = np.cumsum(rng.dirichlet([alpha] * sites))[:-1]
            site[rows] = np.searchsorted(cuts, uniform[rows], side="right")
        parts = [np.flatnonzero(site == s) for s in range(sites)]
        if min(len(p) for p in parts) >= MIN_ROWS:
            return parts
    raise UsageError(
        f"dirichlet:{alpha} left a site with fewer than {MIN_ROWS} rows; "
        "raise ALPHA or use fewer sites"
    )
