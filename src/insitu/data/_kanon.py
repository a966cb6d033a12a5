"""k-anonymity over the quasi-identifiers of a release.

A release is k-anonymous when every combination of quasi-identifier values it contains
is shared by at least k rows (Sweeney 2002): no one can be singled out by those
attributes alone among fewer than k people. This measures it and, on request,
suppresses the rows of the classes that are too small (the usual remedy together with
generalization).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

__all__ = ["KAnonymity", "measure", "suppress_below"]


@dataclass(frozen=True, slots=True)
class KAnonymity:
    """k-anonymity figures of a table. With no quasi-identifiers, the table is one class."""

    quasi: tuple[str, ...]
    k: int
    rows: int
    classes: int
    smallest_class: int
    classes_below_k: int
    rows_below_k: int

    @property
    def satisfied(self) -> bool:
        """Whether the smallest class has at least k rows."""
        return self.rows == 0 or self.smallest_class >= self.k


def _class_sizes(frame: pd.DataFrame, quasi: Sequence[str]) -> pd.Series:
    if not quasi:
        return pd.Series([len(frame)] if len(frame) else [], dtype="int64")
    return frame.groupby(list(quasi), dropna=False, observed=True).size()


def measure(frame: pd.DataFrame, quasi: Sequence[str], k: int) -> KAnonymity:
    """The k-anonymity figures of ``frame`` over ``quasi`` for the requested ``k``."""
    sizes = _class_sizes(frame, quasi)
    small = sizes[sizes < k]
    return KAnonymity(
        quasi=tuple(quasi),
        k=k,
        rows=len(frame),
        classes=len(sizes),
        smallest_class=int(sizes.min()) if len(sizes) else 0,
        classes_below_k=len(small),
        rows_below_k=int(small.sum()),
    )


def suppress_below(frame: pd.DataFrame, quasi: Sequence[str], k: int) -> pd.DataFrame:
    """``frame`` without the rows of equivalence classes smaller than ``k``."""
    if not quasi:
        return frame if len(frame) >= k else frame.iloc[0:0]
    sizes = frame.groupby(list(quasi), dropna=False, observed=True)[quasi[0]].transform("size")
    return frame[sizes >= k]
