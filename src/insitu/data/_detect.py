"""Which columns look like identifiers, whatever the schema says they are.

``insitu data inspect`` warns when a column declared as a feature (or kept) holds values
that look like direct identifiers: e-mail addresses, phone numbers, card numbers (Luhn),
IBANs (mod 97), dates that may be dates of birth, or a value unique to almost every row.
Each distinct value is checked once (up to ``max_values`` per column), so a handful of
identifiers planted among thirty thousand ordinary values is still found.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from insitu._pii import find_personal_data

__all__ = ["ColumnFinding", "scan_column", "scan_frame"]

_DATE = re.compile(r"^\s*(\d{4}-\d{2}-\d{2}|\d{1,2}[./]\d{1,2}[./]\d{4})\s*$")
_BIRTH_NAME = re.compile(r"(birth|dob|born)", re.IGNORECASE)


@dataclass(frozen=True)
class ColumnFinding:
    """What a column's values look like: kind -> number of distinct values of that kind."""

    column: str
    kinds: dict[str, int] = field(default_factory=dict)
    distinct: int = 0
    rows: int = 0

    @property
    def suspicious(self) -> bool:
        """Whether any value looks like an identifier."""
        return bool(self.kinds)

    def describe(self) -> str:
        """A short human description, e.g. '3 email addresses, 2 card numbers'."""
        return ", ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in self.kinds.items())


def scan_column(name: str, values: pd.Series, *, max_values: int = 50_000) -> ColumnFinding:
    """Look at the distinct values of one column."""
    non_null = values.dropna()
    distinct = non_null.astype(str).unique()
    kinds: Counter[str] = Counter()
    dates = 0
    for value in distinct[:max_values]:
        kind = find_personal_data(value)
        if kind:
            kinds[kind] += 1
        elif _DATE.match(value):
            dates += 1
    if dates and (_BIRTH_NAME.search(name) or dates >= 0.8 * min(len(distinct), max_values)):
        kinds["possible date of birth"] += dates
    numeric = pd.to_numeric(non_null, errors="coerce").notna().all()
    if not numeric and len(non_null) >= 50 and len(distinct) >= 0.9 * len(non_null):
        kinds["value unique to its row"] = len(distinct)
    return ColumnFinding(name, dict(kinds), distinct=len(distinct), rows=len(non_null))


def scan_frame(frame: pd.DataFrame) -> dict[str, ColumnFinding]:
    """Scan every column."""
    return {column: scan_column(column, frame[column]) for column in frame.columns}
