"""Generalization rules for quasi-identifiers: coarser values, larger equivalence classes.

``band:N``   numbers to the lower bound of a band of width N (age 37, band:10 -> 30)
``prefix:N`` text to its first N characters (postcode 8004 -> 80)
``month``    dates to ``YYYY-MM``
``year``     dates to ``YYYY``
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from insitu.errors import DataFormatError, SchemaError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Rule", "apply_rule", "parse_rule"]

RuleKind = Literal["band", "prefix", "month", "year"]


@dataclass(frozen=True, slots=True)
class Rule:
    """A parsed generalization rule for one column."""

    column: str
    kind: RuleKind
    size: int = 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.size}" if self.kind in {"band", "prefix"} else self.kind


def parse_rule(column: str, text: str) -> Rule:
    """Parse ``band:N``, ``prefix:N``, ``month`` or ``year``; the error names the column."""
    kind, _, size = text.partition(":")
    if kind in {"month", "year"} and not size:
        return Rule(column, kind)  # type: ignore[arg-type]
    if kind in {"band", "prefix"} and size.isdigit() and int(size) > 0:
        return Rule(column, kind, int(size))  # type: ignore[arg-type]
    raise SchemaError(
        f"generalization {text!r} of column {column!r} is not one of "
        "'band:N', 'prefix:N', 'month', 'year'"
    )


def apply_rule(rule: Rule, values: pd.Series) -> pd.Series:
    """Generalize one column; raises :class:`DataFormatError` on values the rule cannot take."""
    import pandas as pd  # a schema is read without pandas (a device has none)

    if rule.kind == "band":
        numbers = pd.to_numeric(values, errors="coerce")
        if numbers.isna().any():
            bad = values[numbers.isna()].iloc[0]
            raise DataFormatError(f"column {rule.column!r}: {bad!r} is not a number (band rule)")
        banded: pd.Series = np.floor(numbers / rule.size) * rule.size
        return banded
    if rule.kind == "prefix":
        return values.astype(str).str.slice(0, rule.size)
    dates = pd.to_datetime(values, errors="coerce", format="mixed")
    if dates.isna().any():
        bad = values[dates.isna()].iloc[0]
        raise DataFormatError(f"column {rule.column!r}: {bad!r} is not a date ({rule.kind} rule)")
    return dates.dt.strftime("%Y-%m" if rule.kind == "month" else "%Y")
