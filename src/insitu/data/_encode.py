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
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from insitu.data._schema import DataSchema

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FeatureEncoder"]

logger = logging.getLogger(__name__)


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
        blocks: list[np.ndarray] = []
        for column in self.schema.numeric:
            values = frame[column].to_numpy(dtype=np.float64)
            if column in self.schema.ranges:
                low, high = self.schema.ranges[column]
                values = np.clip(values, low, high)
                if self.schema.transforms.get(column) == "log":
                    values, low, high = np.log1p(values), np.log1p(low), np.log1p(high)
                values = (values - low) / (high - low)
            blocks.append(values[:, None])
        for column, edges in self._bins():
            values = frame[column].to_numpy(dtype=np.float64)
            index = np.searchsorted(np.asarray(edges), values, side="right")
            onehot = np.zeros((len(frame), len(edges) + 1), dtype=np.float64)
            known = ~np.isnan(values)
            onehot[np.flatnonzero(known), index[known]] = 1.0
            blocks.append(onehot)
        for column in self.schema.categorical:
            cats = self.categories[column]
            position = {value: i for i, value in enumerate(cats)}
            codes = frame[column].astype(str).map(position).fillna(-1).to_numpy(dtype=np.int64)
            onehot = np.zeros((len(frame), len(cats)), dtype=np.float64)
            known = codes >= 0  # unknown categories encode as all zeros
            onehot[np.flatnonzero(known), codes[known]] = 1.0
            blocks.append(onehot)
        if not blocks:
            return np.zeros((len(frame), 0), dtype=np.float32)
        return np.hstack(blocks).astype(np.float32)

    def _bins(self) -> list[tuple[str, tuple[float, ...]]]:
        # In the order of the numeric features, never of the bins table: a schema read
        # back from canonical JSON (a model card) has its keys sorted, and both must
        # produce the same columns.
        return [(c, self.schema.bins[c]) for c in self.schema.numeric if c in self.schema.bins]

    def labels(self, frame: pd.DataFrame) -> np.ndarray:
        """Labels: 1/0 for a binary schema (``dataset.positive``), else category codes."""
        import pandas as pd

        values = frame[self.schema.label].astype(str)
        if self.schema.positive is not None:
            return (values == self.schema.positive).to_numpy(dtype=np.int64)
        codes = pd.Categorical(values, categories=sorted(values.unique())).codes
        return np.asarray(codes, dtype=np.int64)


def _bin_names(column: str, edges: tuple[float, ...]) -> list[str]:
    shown = [f"{e:g}" for e in edges]
    names = [f"{column}<{shown[0]}"]
    names += [f"{column}[{a},{b})" for a, b in itertools.pairwise(shown)]
    names.append(f"{column}>={shown[-1]}")
    return names
