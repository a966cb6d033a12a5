"""int8 quantization with ONNX Runtime's own tools (``onnxruntime.quantization``).

Both start from ``quant_pre_process`` (symbolic shape inference and ONNX Runtime's graph
optimizations), as ONNX Runtime's documentation asks; it also drops the exporter's stale
intermediate shapes, on which the quantizers' own shape inference otherwise fails.

* dynamic: weights quantized ahead of time, activations at run time
  (``quantize_dynamic``, int8 weights). No data needed; good for MatMul-heavy MLPs, and
  measured to be much *slower* for small convolutions (ConvInteger).
* static: weights and activations quantized with ranges calibrated on the user's data
  (``quantize_static``, QDQ format, per-channel weights, uint8 activations and int8
  weights, MinMax calibration over at most 1,024 records).

ONNX Runtime's quantizers work on files: each call uses a private temporary directory
that is removed afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from insitu.optimize._onnx import pin_ir

__all__ = ["ArrayReader", "quantize_dynamic_int8", "quantize_static_int8"]

logger = logging.getLogger(__name__)


#: Tensors whose type shape inference cannot find (outputs of ai.onnx.ml operators in
#: skl2onnx graphs) are float32: without this the quantizers stop on them.
_EXTRA = {"DefaultTensorType": 1}  # onnx.TensorProto.FLOAT


class ArrayReader:
    """A ``CalibrationDataReader`` over an array of the user's records, in batches."""

    def __init__(
        self, input_name: str, x: np.ndarray, *, batch: int = 64, limit: int = 1024
    ) -> None:
        self._input_name = input_name
        rows = np.ascontiguousarray(x[:limit], dtype=np.float32)
        self._batches = [rows[i : i + batch] for i in range(0, len(rows), batch)]
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next calibration batch, or None when done (ONNX Runtime's protocol)."""
        if self._next >= len(self._batches):
            return None
        batch = self._batches[self._next]
        self._next += 1
        return {self._input_name: batch}

    def rewind(self) -> None:
        """Start over (ONNX Runtime may read the data more than once)."""
        self._next = 0

    def __len__(self) -> int:
        return len(self._batches)


def _quiet() -> Any:
    # The quantizers warn about pre-processing and opsets; insitu reports figures instead.
    return warnings.catch_warnings()


def quantize_dynamic_int8(model: bytes) -> bytes:
    """Dynamic int8 quantization of ``model`` (weights int8, activations at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prepared = preprocess(model)
    with tempfile.TemporaryDirectory(prefix="insitu-q-") as tmp, _quiet():
        warnings.simplefilter("ignore")
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(prepared)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, extra_options=_EXTRA)
        return pin_ir(dst.read_bytes())


def preprocess(model: bytes) -> bytes:
    """``quant_pre_process``: shape inference and graph optimizations before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="insitu-q-") as tmp, _quiet():
        warnings.simplefilter("ignore")
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "pre.onnx"
        src.write_bytes(model)
        try:
            # On failure ONNX Runtime's symbolic shape inference saves the model as
            # "sym_shape_infer_temp.onnx" in the *current directory*; keep it in tmp.
            with contextlib.chdir(tmp):
                quant_pre_process(src, dst, skip_symbolic_shape=False)
        except Exception:  # noqa: BLE001 -- ONNX Runtime raises a bare Exception here
            # Symbolic shape inference knows no ai.onnx.ml operators (skl2onnx graphs):
            # ONNX's own shape inference is enough for the MatMul/Gemm nodes quantized.
            logger.debug("symbolic shape inference failed; using ONNX shape inference")
            quant_pre_process(src, dst, skip_symbolic_shape=True)
        return dst.read_bytes()


def quantize_static_int8(model: bytes, input_name: str, calibration: np.ndarray) -> bytes:
    """Static int8 QDQ quantization, per-channel, calibrated on ``calibration`` rows."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    prepared = preprocess(model)
    with tempfile.TemporaryDirectory(prefix="insitu-q-") as tmp, _quiet():
        warnings.simplefilter("ignore")
        src, dst = Path(tmp) / "pre.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(prepared)
        quantize_static(
            src,
            dst,
            ArrayReader(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options=_EXTRA,
        )
        return pin_ir(dst.read_bytes())
