"""Splitting one table into simulated sites: IID, by a column, or label-skewed (Dirichlet).

Only the simulation partitions data: real sites hold their own. The split is of *row
indices*, done before any site prepares its part, so each simulated site pseudonymizes
with its own key exactly as a real one would.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from insitu.errors import UsageError

__all__ = ["partition"]

MIN_ROWS = 20


def partition(
    frame: pd.DataFrame, spec: str, sites: int, *, label: str, seed: int
) -> list[np.ndarray]:
    """Row indices of each site. Every site gets at least ``MIN_ROWS`` rows."""
    rng = np.random.default_rng(seed)
    n = len(frame)
    if n < sites * MIN_ROWS:
        raise UsageError(f"{n} rows cannot make {sites} sites of at least {MIN_ROWS} rows")
    if spec == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), sites)]
    if spec.startswith("by:"):
        return _by_column(frame, spec[3:], sites)
    return _dirichlet(frame[label].to_numpy(), float(spec.split(":", 1)[1]), sites, rng)


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
    labels: np.ndarray, alpha: float, sites: int, rng: np.random.Generator
) -> list[np.ndarray]:
    if alpha <= 0:
        raise UsageError("dirichlet:ALPHA needs ALPHA > 0 (smaller is more skewed, e.g. 0.5)")
    for _ in range(100):
        buckets: list[list[int]] = [[] for _ in range(sites)]
        for value in np.unique(labels):
            indices = rng.permutation(np.flatnonzero(labels == value))
            shares = rng.dirichlet([alpha] * sites)
            cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
            for site, part in enumerate(np.split(indices, cuts)):
                buckets[site].extend(part.tolist())
        if min(len(b) for b in buckets) >= MIN_ROWS:
            return [np.sort(np.asarray(b, dtype=np.int64)) for b in buckets]
    raise UsageError(
        f"dirichlet:{alpha} left a site with fewer than {MIN_ROWS} rows; "
        "raise ALPHA or use fewer sites"
    )
