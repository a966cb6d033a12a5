"""Array data (images, signals) in a simulated federation: what differs from a table.

Little does. :func:`array_run` reads the ``.npz`` file or image folder under its array
schema into the table the rest of :func:`insitu.federated.simulate` splits, prepares,
seals and trains on (``insitu.data.array_table``: the same minimization, consent,
per-subject budgets and DP-SGD by subject), and chooses the model: ``--model cnn`` (a
small GroupNorm CNN), a user's module (which receives records of the declared shape),
or ``logistic``/``mlp`` over the flat values. :func:`save_array_model` exports the graph
a device serves, which takes the raw record: (batch, C, H, W) or (batch, C, L) in the
declared value range.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from insitu._atomic import atomic_write_bytes, atomic_write_text
from insitu.data import ArraySchema, ArrayTable, DataSchema, array_table, is_array_data, load_schema
from insitu.errors import UsageError
from insitu.federated._config import FederationConfig
from insitu.training import (
    ArrayModelFn,
    ModelFn,
    check_dp_compatible,
    export_array_onnx,
    onnx_parity,
)
from insitu.workspace import Workspace

__all__ = ["ArrayRun", "array_inputs", "array_run", "save_array_model", "write_array_model"]


@dataclass(frozen=True)
class ArrayRun:
    """Array data read as a table, and the model that takes its records."""

    table: ArrayTable
    model_fn: ModelFn | None

    @property
    def warnings(self) -> list[str]:
        """What the user should know about the data (values outside the declared range)."""
        if not self.table.outside_range:
            return []
        low, high = self.table.arrays.value_range
        return [
            f"{self.table.source}: {self.table.outside_range} values lie outside the declared "
            f"range [{low:g}, {high:g}] and were clipped to it: widen arrays.value_range or "
            "correct the data"
        ]


def array_run(
    data: str | os.PathLike[str] | pd.DataFrame,
    schema: DataSchema | ArraySchema | str | os.PathLike[str] | None,
    config: FederationConfig,
    *,
    label: str | None,
    model_fn: ModelFn | None,
) -> ArrayRun | None:
    """The run's array data and model; ``None`` for a table (nothing changes then).

    Raises:
        UsageError: ``--model cnn`` on a table, a table schema for array data, or a model
            DP-SGD cannot train (Opacus' validator names the layer).
        SchemaError: the data does not fit its array schema (shape, classes, lengths).

    """
    if isinstance(schema, str | os.PathLike):
        schema = load_schema(Path(schema))
    arrays = isinstance(schema, ArraySchema) or (
        not isinstance(data, pd.DataFrame) and is_array_data(data)
    )
    if not arrays:
        if config.model == "cnn":
            raise UsageError(
                "--model cnn takes array data: an .npz of records (N, C, H, W) or (N, C, L) "
                "or a folder of images with one subfolder per class"
            )
        return None
    if isinstance(data, pd.DataFrame):
        raise UsageError("array data is given as an .npz file or a folder of images, not a frame")
    if isinstance(schema, DataSchema):
        raise UsageError(
            f"{Path(data).name} holds arrays, but the schema {schema.name!r} declares a table: "
            "give an array schema (dataset.kind = 'images' or 'signals', an [arrays] section)"
        )
    table = array_table(data, schema, label=label)
    shape, classes = table.arrays.shape, len(table.arrays.label_names)
    chosen: ModelFn | None = None
    if model_fn is not None:
        chosen = ArrayModelFn(shape, classes, module=model_fn)
    elif config.model == "cnn":
        chosen = ArrayModelFn(shape, classes)
    if chosen is not None and config.privacy == "record":
        check_dp_compatible(chosen(table.arrays.features))
    return ArrayRun(table, chosen)


def array_inputs(
    data: str | os.PathLike[str] | pd.DataFrame,
    schema: DataSchema | ArraySchema | str | os.PathLike[str] | None,
    config: FederationConfig,
    *,
    label: str | None,
    model_fn: ModelFn | None,
) -> tuple[DataSchema | str | os.PathLike[str] | None, ModelFn | None, ArrayRun | None]:
    """``simulate``'s schema and model function, and its array data (``None``: a table)."""
    run = array_run(data, schema, config, label=label, model_fn=model_fn)
    if run is not None:
        return run.table.schema, run.model_fn, run
    if isinstance(schema, ArraySchema):  # pragma: no cover - array_run reads or refuses it
        raise UsageError("an array schema describes an .npz file or a folder of images")
    return schema, model_fn, None


def save_array_model(
    coordinator: Workspace,
    *,
    run_id: str,
    model: torch.nn.Module,
    run: ArrayRun,
    sample: np.ndarray,
) -> Path:
    """Write the PyTorch state, the ONNX graph of raw records (parity-checked), the input."""
    return write_array_model(
        coordinator.model_dir(run_id),
        model,
        arrays=run.table.arrays,
        schema=run.table.schema,
        sample=sample,
    )


def write_array_model(
    model_dir: Path,
    model: torch.nn.Module,
    *,
    arrays: ArraySchema,
    schema: DataSchema,
    sample: np.ndarray,
    **extra: Any,
) -> Path:
    """The model files of array records in ``model_dir``; ``sample``: scaled rows in [0, 1].

    The ONNX graph's parity with PyTorch is checked on up to 256 of ``sample``'s rows,
    mapped back to raw records; ``extra`` goes into ``features.json`` as it is.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    onnx_bytes, served = export_array_onnx(model, arrays.shape, arrays.value_range)
    low, high = arrays.value_range
    raw = (low + sample[:256] * (high - low)).reshape(-1, *arrays.shape).astype(np.float32)
    parity = onnx_parity(served, onnx_bytes, raw)
    atomic_write_bytes(model_dir / "model.pt", buffer.getvalue())
    atomic_write_bytes(model_dir / "model.onnx", onnx_bytes)
    doc: dict[str, Any] = {
        "input": arrays.input_json(),
        "features": schema.numeric,
        "schema": schema.source,
        "schema_sha256": schema.digest(),
        "array_schema": arrays.source,
        "array_schema_sha256": arrays.digest(),
        "onnx_parity_max_abs_diff": parity.max_abs_diff,
        "onnx_parity_relative": parity.relative,
        **extra,
    }
    atomic_write_text(model_dir / "features.json", json.dumps(doc, indent=2) + "\n")
    return model_dir
