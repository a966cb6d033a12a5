"""Which columns look like identifiers, whatever the schema says they are.

``insitu data inspect`` warns when a column declared as a feature (or kept) holds values
that look like direct identifiers: e-mail addresses, phone numbers, card numbers (Luhn),
IBANs (mod 97), dates that may be dates of birth, or a value unique to almost every row.
Each distinct value is checked once (up to ``max_values`` per column), so a handful of
identifiers planted among thirty thousand ordinary values is still found.

Precision rules (a false alarm drops a useful feature from an inferred schema):

* a *continuous* column (every value a number, at least one of them not a whole number)
  is a measurement: it is never "unique to its row" (continuous measurements are unique
  per row by nature), and its fractional values are never taken for card numbers (the
  digits of a float such as ``0.35484779567118791`` pass the Luhn check one time in ten).
  Its *whole* values of 13 digits or more are still scanned as whole numbers: card
  numbers planted among measurements (``4539148803436467`` in a column of floats, which
  a CSV reader turns into one float column) are found;
* a column of whole numbers (possibly stored as floats) is scanned as whole numbers
  (``4111111111111111``, never ``4111111111111111.0``), and is "unique to its row" only
  when almost every value is distinct *and* it looks like a key: its name ends in an id
  word (``patient_id``, ``mrn``, ``record_no``, ``patientId``) or its values are a dense
  run (a counter, span at most twice the number of distinct values). A census weight or
  an amount in cents is unique per row in a small sample without being an identifier;
* any other column (text) is "unique to its row" when at least 90% of at least 50
  values are distinct (``adult-00001``, ``RAWID-0042-Q``).

:func:`identifier_columns` turns the findings into the columns a schema inferred from
data must never make features (:mod:`insitu.data._infer`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from insitu._pii import find_personal_data

__all__ = ["ColumnFinding", "identifier_columns", "scan_column", "scan_frame"]

_DATE = re.compile(r"^\s*(\d{4}-\d{2}-\d{2}|\d{1,2}[./]\d{1,2}[./]\d{4})\s*$")
_BIRTH_NAME = re.compile(r"(birth|dob|born)", re.IGNORECASE)
# Names of key columns: ``patient_id``, ``id``, ``mrn``, ``record_no``, ``patientId``.
_ID_NAME = re.compile(r"(?:^|[_\W])(?:id|key|mrn|ssn|nr|no|num|number)$", re.IGNORECASE)
_CAMEL_ID = re.compile(r"[a-z](?:Id|ID)$")

#: The smallest card number (13 digits): smaller whole values in a measurement column are
#: not scanned.
_CARD_MIN = 1e12
#: A column is "unique to its row" when this share of its values is distinct.
UNIQUE_SHARE = 0.9
#: ... and it has at least this many values (a tiny table is unique by chance).
UNIQUE_MIN_ROWS = 50

#: Plural of each kind, for reasons such as "email addresses".
_PLURAL = {
    "email address": "email addresses",
    "phone number": "phone numbers",
    "card number": "card numbers",
    "IBAN": "IBANs",
    "possible date of birth": "possible dates of birth",
    "value unique to its row": "value unique to its row",
}


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

    def reason(self) -> str:
        """The kinds found, without counts, e.g. 'email addresses, card numbers'."""
        return ", ".join(_PLURAL.get(kind, kind) for kind in self.kinds)


def _looks_like_key(name: str, numbers: pd.Series, distinct: int) -> bool:
    if _ID_NAME.search(name) or _CAMEL_ID.search(name):
        return True
    span = float(numbers.max()) - float(numbers.min()) + 1.0
    return span <= 2.0 * distinct


def scan_column(name: str, values: pd.Series, *, max_values: int = 50_000) -> ColumnFinding:
    """Look at the distinct values of one column (see the module docstring for the rules)."""
    non_null = values.dropna()
    numbers = pd.to_numeric(non_null, errors="coerce")
    numeric = bool(numbers.notna().all())
    whole = False
    if numeric and len(numbers):
        as_float = numbers.to_numpy(dtype=np.float64)
        whole = bool(np.isfinite(as_float).all() and (as_float == np.floor(as_float)).all())
        if not whole:  # continuous measurements: only their long whole values are scanned
            return _scan_continuous(name, as_float, max_values=max_values)
    if whole and pd.api.types.is_float_dtype(non_null.dtype):
        texts = pd.Series([f"{v:.0f}" for v in numbers.to_numpy(dtype=np.float64)])
    else:
        texts = non_null.astype(str)
    distinct = texts.unique()
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
    unique = len(non_null) >= UNIQUE_MIN_ROWS and len(distinct) >= UNIQUE_SHARE * len(non_null)
    if unique and (not numeric or _looks_like_key(name, numbers, len(distinct))):
        kinds["value unique to its row"] = len(distinct)
    return ColumnFinding(name, dict(kinds), distinct=len(distinct), rows=len(non_null))


def _scan_continuous(name: str, numbers: np.ndarray, *, max_values: int) -> ColumnFinding:
    """A measurement column: card numbers among its whole values of 13 digits or more."""
    finite = numbers[np.isfinite(numbers)]
    long_whole = finite[(finite == np.floor(finite)) & (np.abs(finite) >= _CARD_MIN)]
    kinds: Counter[str] = Counter()
    for value in np.unique(long_whole)[:max_values]:
        kind = find_personal_data(f"{value:.0f}")
        if kind:
            kinds[kind] += 1
    return ColumnFinding(name, dict(kinds), distinct=len(np.unique(finite)), rows=len(numbers))


def scan_frame(frame: pd.DataFrame) -> dict[str, ColumnFinding]:
    """Scan every column."""
    return {column: scan_column(column, frame[column]) for column in frame.columns}


def identifier_columns(frame: pd.DataFrame, *, label: str) -> dict[str, str]:
    """Columns that look like identifiers -> why (``"email addresses"``); never ``label``."""
    found: dict[str, str] = {}
    for column in frame.columns:
        if column == label:
            continue
        finding = scan_column(str(column), frame[column])
        if finding.suspicious:
            found[str(column)] = finding.reason()
    return found
