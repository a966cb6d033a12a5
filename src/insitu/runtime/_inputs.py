"""Checking inputs against the model card's schema before they reach ONNX Runtime.

The card lists each graph input with its element type and shape (``schema_of``), and it
is signed with the bundle, so it is the contract. Every input is checked against it
here, and refused with :class:`~insitu.errors.InvalidInputError` naming what is wrong and
what the model takes: ONNX Runtime's own messages name graph internals, and some
mismatches (NaN, inf) it would accept silently and answer with garbage.

Invariants of an accepted input: the element type of the card (ints are widened or
narrowed only when every value fits; floats are never taken as ints), the card's rank,
every fixed dimension equal to the card's, a batch of 1 to ``max_rows`` rows, and only
finite values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from insitu.errors import InvalidInputError

__all__ = ["DEFAULT_MAX_ROWS", "InputSpec", "specs_of"]

DEFAULT_MAX_ROWS = 4096

# ONNX element type names (as the card writes them) -> NumPy dtypes.
_DTYPES: dict[str, np.dtype[Any]] = {
    "float": np.dtype(np.float32),
    "double": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, dtype and shape (``None`` for a free dimension)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]

    @property
    def row_shape(self) -> tuple[int | None, ...]:
        """The shape of one row (the first axis is the batch)."""
        return self.shape[1:]

    @property
    def width(self) -> int:
        """Values per row (a free dimension other than the batch counts as 1)."""
        return int(np.prod([d or 1 for d in self.row_shape], dtype=np.int64))

    def describe(self) -> str:
        """E.g. ``float32[batch, 14]``."""
        dims = ", ".join("batch" if i == 0 else str(d or "?") for i, d in enumerate(self.shape))
        return f"{self.dtype.name}[{dims}]"

    def check(
        self, value: Any, *, max_rows: int = DEFAULT_MAX_ROWS, cast: bool = False
    ) -> np.ndarray:
        """``value`` as an array this input accepts, or :class:`InvalidInputError`.

        ``cast`` lets an array of another float type through (converted); without it a
        typed array (NPY, raw bytes) must have the card's dtype exactly.
        """
        array = _as_array(value, self, cast=cast)
        if array.ndim == len(self.shape) - 1 and len(self.shape) > 1:
            array = array[None, ...]  # one row given without the batch axis
        if array.ndim != len(self.shape):
            raise InvalidInputError(
                f"input {self.name!r} has shape {list(array.shape)}, the model takes "
                f"{self.describe()}: send a batch of rows of shape {list(self.row_shape)}"
            )
        for axis, (got, want) in enumerate(zip(array.shape, self.shape, strict=True)):
            if axis > 0 and want is not None and got != want:
                raise InvalidInputError(
                    f"input {self.name!r} has shape {list(array.shape)}, the model takes "
                    f"{self.describe()}: axis {axis} must have {want} values, not {got}"
                )
        rows = array.shape[0] if array.ndim else 0
        if not 1 <= rows <= max_rows:
            raise InvalidInputError(
                f"input {self.name!r} has {rows} rows; send 1 to {max_rows} rows per "
                "request (split larger inputs, or use 'insitu predict' for files)"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise InvalidInputError(
                f"input {self.name!r} holds {bad} NaN or infinite value(s); the model takes "
                "finite numbers only: impute or drop those rows first"
            )
        return np.ascontiguousarray(array)


def _as_array(value: Any, spec: InputSpec, *, cast: bool) -> np.ndarray:
    if isinstance(value, np.ndarray):
        given = value
    else:
        try:
            given = np.asarray(value)
        except (ValueError, TypeError, RecursionError) as exc:
            raise InvalidInputError(
                f"input {spec.name!r} is not a rectangular array of numbers ({exc}); send "
                f"rows of equal length, {spec.describe()}"
            ) from exc
    kind = given.dtype.kind
    if kind not in "biuf":
        raise InvalidInputError(
            f"input {spec.name!r} holds {_kind_name(given)}, the model takes "
            f"{spec.describe()}: send numbers in rows of equal length"
        )
    if given.dtype == spec.dtype:
        return given
    want = spec.dtype.kind
    if want == "f" and (kind != "f" or cast or isinstance(value, list | tuple)):
        # JSON numbers (lists) and integer arrays are cast to the model's float type;
        # an array that *declares* another float type is refused below, so that a
        # client sending float64 bytes for a float32 model learns it.
        return given.astype(spec.dtype)
    if want in "iu" and kind in "iu":
        narrowed = given.astype(spec.dtype)
        if np.array_equal(narrowed, given):
            return narrowed
        raise InvalidInputError(
            f"input {spec.name!r} holds integers out of the range of {spec.dtype.name}"
        )
    raise InvalidInputError(
        f"input {spec.name!r} is {given.dtype.name}, the model takes {spec.describe()}: "
        f"send {spec.dtype.name} values"
    )


def _kind_name(array: np.ndarray) -> str:
    if array.dtype.kind == "O":
        return "values of mixed types or rows of unequal length"
    if array.dtype.kind in "US":
        return "text"
    return f"{array.dtype.name} values"


def specs_of(card_inputs: Sequence[Mapping[str, Any]]) -> list[InputSpec]:
    """The input specs of a model card's ``inputs`` list."""
    specs: list[InputSpec] = []
    for item in card_inputs:
        type_name = str(item.get("type", ""))
        if type_name not in _DTYPES:
            raise InvalidInputError(
                f"the model input {item.get('name')!r} has element type {type_name!r}, which "
                "insitu does not serve; export the model with float, double or integer inputs"
            )
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in item.get("shape", []))
        specs.append(InputSpec(name=str(item["name"]), dtype=_DTYPES[type_name], shape=shape))
    return specs
