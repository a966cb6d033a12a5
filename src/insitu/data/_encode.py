"""Turning a prepared release into model inputs, identically at every site.

The encoding is a function of the *schema*, not of the data: numeric features are
scaled to [0, 1] by the ranges the schema declares (through ``log(1 + x)`` for those with
a ``log`` transform: a linear scale would crush heavy-tailed amounts such as capital gains
next to zero), optionally also one-hot encoded by the interval of declared bin edges they
fall in, and categorical features are one-hot encoded over the categories the schema
declares. No site has to share a mean, a
vocabulary or a count for all sites to produce the same columns, so preprocessing leaks
nothing (the federated threat model in ``docs/`` depends on this).

A schema without declared categories or ranges still works on one site, with a warning:
categories then come from the local data, and two sites would disagree on columns.

Two inputs, one matrix: :meth:`FeatureEncoder.encode` takes a pandas frame (training, files),
:meth:`FeatureEncoder.encode_columns` a mapping of column name to array (records sent to a
device, which has no pandas). Both run the same numeric steps; categories are looked up by
their text (``str(value)``, as ``Series.astype(str)`` gives it; a missing value is unknown),
so the same data gives the same matrix either way. :meth:`FeatureEncoder.columns_of` turns
records (one mapping per row) into such columns, and :meth:`FeatureEncoder.check_columns`
refuses what the encoder would otherwise clip or zero silently, naming the column and row.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from insitu.data._schema import DataSchema
from insitu.errors import DataFormatError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FeatureEncoder"]

logger = logging.getLogger(__name__)

_FLOAT_MAX = float(np.finfo(np.float64).max)


@dataclass(frozen=True)
class FeatureEncoder:
    """Schema-driven encoding. Invariant: ``len(names)`` columns for any input frame."""

    schema: DataSchema
    categories: dict[str, tuple[str, ...]]

    @classmethod
    def for_schema(cls, schema: DataSchema, frame: pd.DataFrame | None = None) -> FeatureEncoder:
        """The encoder of ``schema``; ``frame`` supplies categories the schema lacks."""
        categories = dict(schema.categories)
        for column in schema.categorical:
            if column not in categories:
                if frame is None:
                    raise ValueError(f"categories of {column!r} are not declared in the schema")
                logger.warning(
                    "categories of %r are not declared in the schema: using this site's "
                    "values; declare features.categories.%s so every site encodes alike",
                    column,
                    column,
                )
                categories[column] = tuple(sorted(frame[column].astype(str).unique()))
        unscaled = [c for c in schema.numeric if c not in schema.ranges]
        if unscaled:
            logger.info("numeric features without declared ranges stay unscaled: %s", unscaled)
        return cls(schema, categories)

    @property
    def names(self) -> list[str]:
        """Model input column names: numeric features, then ``column=category`` indicators."""
        names = list(self.schema.numeric)
        for column, edges in self._bins():
            names += _bin_names(column, edges)
        for column in self.schema.categorical:
            names += [f"{column}={value}" for value in self.categories[column]]
        return names

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """A float32 matrix of shape (rows, len(names))."""

        def codes(column: str, position: Mapping[str, int]) -> np.ndarray:
            mapped = frame[column].astype(str).map(position).fillna(-1)
            return np.asarray(mapped.to_numpy(dtype=np.int64))

        return self._matrix(
            len(frame), lambda column: frame[column].to_numpy(dtype=np.float64), codes
        )

    def encode_columns(self, columns: Mapping[str, Any]) -> np.ndarray:
        """:meth:`encode` of column arrays (name -> 1-D values), without pandas.

        The same data gives the same matrix as :meth:`encode` of a frame. Columns the
        schema does not name are ignored.

        Raises:
            DataFormatError: a feature column is missing, or the columns differ in length.

        """
        arrays = {name: _column(columns, name) for name in self.schema.features}
        lengths = {len(values) for values in arrays.values()}
        if len(lengths) > 1:
            raise DataFormatError(f"the columns differ in length ({sorted(lengths)})")
        rows = lengths.pop() if lengths else 0
        return self._matrix(
            rows,
            lambda column: _numbers(arrays[column], column),
            lambda column, position: _codes(arrays[column], position),
        )

    def _matrix(
        self,
        rows: int,
        numbers: Callable[[str], np.ndarray],
        codes: Callable[[str, Mapping[str, int]], np.ndarray],
    ) -> np.ndarray:
        # The one encoding: ``numbers(column)`` are a numeric column's values as float64,
        # ``codes(column, position)`` a categorical column's category indices (-1: unknown).
        blocks: list[np.ndarray] = []
        for column in self.schema.numeric:
            values = numbers(column)
            if column in self.schema.ranges:
                low, high = self.schema.ranges[column]
                values = np.clip(values, low, high)
                if self.schema.transforms.get(column) == "log":
                    values, low, high = np.log1p(values), np.log1p(low), np.log1p(high)
                values = (values - low) / (high - low)
            blocks.append(values[:, None])
        for column, edges in self._bins():
            values = numbers(column)
            index = np.searchsorted(np.asarray(edges), values, side="right")
            onehot = np.zeros((rows, len(edges) + 1), dtype=np.float64)
            known = ~np.isnan(values)
            onehot[np.flatnonzero(known), index[known]] = 1.0
            blocks.append(onehot)
        for column in self.schema.categorical:
            cats = self.categories[column]
            found = codes(column, {value: i for i, value in enumerate(cats)})
            onehot = np.zeros((rows, len(cats)), dtype=np.float64)
            known = found >= 0  # unknown categories encode as all zeros
            onehot[np.flatnonzero(known), found[known]] = 1.0
            blocks.append(onehot)
        if not blocks:
            return np.zeros((rows, 0), dtype=np.float32)
        return np.hstack(blocks).astype(np.float32)

    # -- records: columns from rows, and the values the encoder would not keep -----------

    def columns_of(
        self, records: Sequence[Mapping[str, Any]], *, row_name: Callable[[int], str] | None = None
    ) -> dict[str, np.ndarray]:
        """The feature columns of ``records`` (one mapping per row), their types checked.

        A numeric feature takes numbers (``None`` is a missing value), a categorical
        one text or whole numbers. Other keys are ignored: only declared features reach
        a model. ``row_name(i)`` names row ``i`` in errors (default ``row i+1``).

        Raises:
            DataFormatError: a record that is not an object, lacks a feature, or holds a
                value of the wrong type (the error names the column and the row).

        """
        name = row_name or _row
        for i, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise DataFormatError(
                    f"{name(i)} is not an object of column values; send "
                    '{"column": value, ...} per record'
                )
            for column in self.schema.features:
                if column not in record:
                    raise DataFormatError(
                        f"{name(i)} has no column {column!r}; the model needs "
                        f"{', '.join(self.schema.features)}"
                    )
        columns: dict[str, np.ndarray] = {}
        for column in self.schema.numeric:
            values = [record[column] for record in records]
            _check_types(values, column, name, numeric=True)
            columns[column] = np.array(
                [np.nan if v is None else v for v in values], dtype=np.float64
            )
        for column in self.schema.categorical:
            values = [record[column] for record in records]
            _check_types(values, column, name, numeric=False)
            array = np.empty(len(values), dtype=object)
            array[:] = values
            columns[column] = array
        return columns

    def check_columns(
        self, columns: Mapping[str, Any], *, row_name: Callable[[int], str] | None = None
    ) -> None:
        """Refuse values the encoder would not keep as they are, naming column and row.

        A missing or non-finite value, a number outside the range the schema declares
        (the encoder would clip it), a category the schema does not declare (it would
        encode as all zeros): each is an answer about some other record, so it is
        refused, never answered.

        Raises:
            DataFormatError: the first such value (column, row, value, and how many rows).

        """
        name = row_name or _row
        for column in self.schema.numeric:
            values = _numbers(_column(columns, column), column)
            _refuse(
                ~np.isfinite(values),
                values,
                column,
                name,
                "has no value (null, NaN or infinite); send a number (impute missing values first)",
                show=False,
            )
            if column in self.schema.ranges:
                low, high = self.schema.ranges[column]
                outside = np.isfinite(values) & ((values < low) | (values > high))
                _refuse(
                    outside,
                    values,
                    column,
                    name,
                    f"is outside its declared range [{low:g}, {high:g}]: the model never "
                    "saw such values; correct the record, or widen features.ranges and retrain",
                )
        for column in self.schema.categorical:
            values = np.asarray(_column(columns, column), dtype=object)
            missing = np.fromiter((_missing(v) for v in values), dtype=bool, count=len(values))
            _refuse(
                missing, values, column, name, "has no value (null); send a category", show=False
            )
            position = {value: i for i, value in enumerate(self.categories[column])}
            unknown = (_codes(values, position) < 0) & ~missing
            shown = ", ".join(repr(c) for c in self.categories[column][:12])
            more = ", ..." if len(self.categories[column]) > 12 else ""
            _refuse(
                unknown,
                values,
                column,
                name,
                f"is not one of its declared categories ({shown}{more}); send one of them, "
                "or declare it in features.categories and retrain",
            )

    def _bins(self) -> list[tuple[str, tuple[float, ...]]]:
        # In the order of the numeric features, never of the bins table: a schema read
        # back from canonical JSON (a model card) has its keys sorted, and both must
        # produce the same columns.
        return [(c, self.schema.bins[c]) for c in self.schema.numeric if c in self.schema.bins]

    def labels(self, frame: pd.DataFrame) -> np.ndarray:
        """Labels: 1/0 for a binary schema (``dataset.positive``), else class codes.

        A class's code is its position among the schema's declared classes
        (``dataset.classes``; an array schema's ``label_names``), so that every site
        numbers the classes alike whichever of them its own records hold. Without declared
        classes the codes number the classes present here, with a warning: a site missing
        a class would then shift the others' codes.

        Raises:
            DataFormatError: a label that is not one of the declared classes.

        """
        import pandas as pd

        label = self.schema.label
        values = frame[label].astype(str)
        if self.schema.positive is not None:
            return (values == self.schema.positive).to_numpy(dtype=np.int64)
        if self.schema.classes:
            position = {value: i for i, value in enumerate(self.schema.classes)}
            codes = _codes(values.to_numpy(dtype=object), position)
            _refuse(
                codes < 0,
                values.to_numpy(dtype=object),
                label,
                _row,
                f"is not one of the declared classes ({', '.join(self.schema.classes)}): "
                "correct the label, or declare it in dataset.classes",
            )
            return codes
        present = sorted(values.unique())
        if len(present) > 2:
            logger.warning(
                "the classes of %r are not declared: numbering this data's %d classes; "
                "declare dataset.classes so that every site numbers them alike",
                label,
                len(present),
            )
        return np.asarray(pd.Categorical(values, categories=present).codes, dtype=np.int64)


def _row(index: int) -> str:
    return f"row {index + 1}"


def _column(columns: Mapping[str, Any], name: str) -> np.ndarray:
    if name not in columns:
        raise DataFormatError(f"there is no column {name!r}; the schema names it as a feature")
    values = np.asarray(columns[name])
    if values.ndim != 1:
        raise DataFormatError(f"column {name!r} is not one value per row")
    return values


def _numbers(values: np.ndarray, name: str) -> np.ndarray:
    """A column as float64, as ``Series.to_numpy(dtype=float64)`` reads it (numeric text too)."""
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        for value in values:
            try:
                float(value)
            except (TypeError, ValueError):
                raise DataFormatError(
                    f"column {name!r} holds {_shown(value)}, which is not a number; send numbers"
                ) from None
        raise  # pragma: no cover -- every value converts alone but not together


def _missing(value: Any) -> bool:
    # None, NaN, and pandas' NA (which a column of a nullable dtype holds): what
    # ``Series.astype(str)`` keeps missing, so it never matches a category.
    if value is None or type(value).__name__ == "NAType":
        return True
    return isinstance(value, float | np.floating) and bool(np.isnan(value))


def _codes(values: np.ndarray, position: Mapping[str, int]) -> np.ndarray:
    """Category indices of ``values`` by their text (-1: unknown or missing)."""
    if values.dtype.kind in "US":  # text only: look each distinct value up once
        distinct, inverse = np.unique(values, return_inverse=True)
        table = np.array([position.get(str(v), -1) for v in distinct], dtype=np.int64)
        return np.asarray(table[inverse.reshape(-1)], dtype=np.int64)
    return np.fromiter(
        (-1 if _missing(v) else position.get(str(v), -1) for v in values),
        dtype=np.int64,
        count=len(values),
    )


def _check_types(
    values: list[Any], column: str, name: Callable[[int], str], *, numeric: bool
) -> None:
    for i, value in enumerate(values):
        if value is None:
            continue  # missing: check_columns names it
        if isinstance(value, bool):
            ok = False
        elif numeric:
            ok = isinstance(value, int | float | np.integer | np.floating)
        else:
            ok = isinstance(value, str | int | np.integer | np.str_)
        if not ok:
            want = "a number" if numeric else "text (one of its categories)"
            raise DataFormatError(
                f"{name(i)}: column {column!r} holds {type(value).__name__} {_shown(value)}; "
                f"send {want}"
            )
        if numeric and isinstance(value, int) and abs(value) > _FLOAT_MAX:
            raise DataFormatError(
                f"{name(i)}: column {column!r} holds a number too large for a float "
                f"({_shown(value)}); send a value in its declared range"
            )


def _shown(value: Any) -> str:
    """``repr(value)`` for a message, cut short (a record may hold anything)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _refuse(
    bad: np.ndarray,
    values: np.ndarray,
    column: str,
    name: Callable[[int], str],
    what: str,
    *,
    show: bool = True,
) -> None:
    """Raise for the first row of ``bad``: its name, the column and (``show``) the value."""
    if not bad.any():
        return
    first = int(np.flatnonzero(bad)[0])
    count = int(bad.sum())
    value = values[first]
    shown = f"{value:g}" if isinstance(value, float | np.floating) else _shown(value)
    shown = f" = {shown}" if show else ""
    others = f" (and {count - 1} more rows)" if count > 1 else ""
    raise DataFormatError(f"{name(first)}: column {column!r}{shown}{others} {what}")


def _bin_names(column: str, edges: tuple[float, ...]) -> list[str]:
    shown = [f"{e:g}" for e in edges]
    names = [f"{column}<{shown[0]}"]
    names += [f"{column}[{a},{b})" for a, b in itertools.pairwise(shown)]
    names.append(f"{column}>={shown[-1]}")
    return names
