"""Calibration and evaluation data: the user's own records, turned into model inputs.

* For a workspace model: a CSV/Parquet file (or a frame) of raw records, prepared and
  encoded exactly as training did (the schema's minimization and generalization, then the
  schema-driven encoder with the model's categories; the pseudonymization key is a
  throwaway because identifiers never reach a model).
* ``.npz``: arrays ``x`` (float32, batch axis first, any row shape) and optionally ``y``
  (integer labels). This is how image or other tensor data is given.
* Otherwise a CSV/Parquet file of numeric columns: ``label`` names the label column,
  every other column is a feature, in file order.

Every set is checked against the model's input shape before anything runs, so a
mismatch is one line naming both shapes.

:func:`data_sha256` names a set in the ledger: the SHA-256 of the file given, or of the
encoded records (shape, float32 inputs, int64 labels, little-endian) when the data was
given in memory, so whoever holds the same file or frame can check which data it was.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from insitu.errors import DataFormatError, InputShapeMismatchError, UsageError
from insitu.optimize._source import SourceModel

__all__ = ["DataSet", "data_sha256", "load_data"]


@dataclass(frozen=True)
class DataSet:
    """Model inputs and, when known, integer labels."""

    name: str
    x: np.ndarray
    y: np.ndarray | None

    def __len__(self) -> int:
        return len(self.x)


DataLike = Path | str | pd.DataFrame | tuple[np.ndarray, np.ndarray | None] | np.ndarray


def load_data(data: DataLike, source: SourceModel, *, role: str, label: str | None) -> DataSet:
    """Inputs (and labels) of ``data`` for ``source``; ``role`` names the set in errors.

    Raises:
        InputShapeMismatchError: rows whose shape is not the model's input shape.
        DataFormatError: an unreadable file or non-numeric features.
        UsageError: a file format insitu does not read here, or an empty set.

    """
    name = role
    if isinstance(data, tuple):
        x, y = data
    elif isinstance(data, np.ndarray):
        x, y = data, None
    elif isinstance(data, pd.DataFrame):
        x, y = _from_frame(data, source, label=label, name=role)
    else:
        path = Path(data)
        name = f"{role} data {path.name}"
        if not path.is_file():
            raise UsageError(f"{role} data {path} does not exist")
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                if "x" not in archive:
                    raise DataFormatError(f"{path.name} has no array 'x' (arrays: {archive.files})")
                x = archive["x"]
                y = archive.get("y", None)
        else:
            from insitu.data import read_table

            x, y = _from_frame(read_table(path), source, label=label, name=name)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) == 0:
        raise UsageError(f"the {name} holds no records")
    _check_shape(x, source, name=name)
    labels = None if y is None else np.asarray(y).astype(np.int64).reshape(-1)
    return DataSet(name, x, labels)


def _from_frame(
    frame: pd.DataFrame, source: SourceModel, *, label: str | None, name: str
) -> tuple[np.ndarray, np.ndarray | None]:
    if source.schema is not None and source.encoder is not None:
        from insitu.data import Pseudonymizer, prepare

        schema = source.schema
        schema.check_columns(frame.columns, source=name)
        prepared = prepare(frame, schema, Pseudonymizer(os.urandom(32)), source=name, k=1).frame
        y = source.encoder.labels(prepared) if schema.label in prepared.columns else None
        return source.encoder.encode(prepared), y
    y = None
    if label is not None:
        if label not in frame.columns:
            raise UsageError(f"the {name} has no label column {label!r}")
        y = pd.Categorical(frame[label]).codes if frame[label].dtype == object else frame[label]
        frame = frame.drop(columns=[label])
    try:
        x: Any = frame.to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataFormatError(
            f"the {name} has non-numeric columns; give numeric features (and --label), an .npz "
            "file, or a model that carries its data schema"
        ) from exc
    return x, None if y is None else np.asarray(y)


def _check_shape(x: np.ndarray, source: SourceModel, *, name: str) -> None:
    expected = source.input_shape
    got = x.shape[1:]
    fits = len(got) == len(expected) and all(
        e is None or e == g for e, g in zip(expected, got, strict=True)
    )
    if not fits:
        shown = "x".join("?" if e is None else str(e) for e in expected) or "scalar"
        raise InputShapeMismatchError(
            f"the {name} has rows of shape {'x'.join(map(str, got)) or 'scalar'}, the model "
            f"{source.name} takes {shown}; give data encoded for this model"
        )


def data_sha256(data: DataLike, loaded: DataSet) -> tuple[str, str]:
    """(SHA-256, what it is the digest of): ``"file"`` or ``"encoded records"``."""
    sha = hashlib.sha256()
    if isinstance(data, (str, Path)):
        with Path(data).open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                sha.update(chunk)
        return sha.hexdigest(), "file"
    sha.update(repr(tuple(int(d) for d in loaded.x.shape)).encode())
    sha.update(np.ascontiguousarray(loaded.x, dtype="<f4").tobytes())
    if loaded.y is not None:
        sha.update(np.ascontiguousarray(loaded.y, dtype="<i8").tobytes())
    return sha.hexdigest(), "encoded records"
