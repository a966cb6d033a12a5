"""Export to ONNX: PyTorch through ``torch.onnx.export`` (dynamo), scikit-learn through skl2onnx.

PyTorch: torch 2.13's default exporter is the dynamo one (``torch.export`` then
onnxscript). The batch axis is dynamic, the weights are stored inside the file
(``external_data=False``: these models are small and one file is what ships), and the IR
version is pinned to what ONNX Runtime 1.31 reads (:data:`insitu.optimize._onnx.IR_VERSION`).

scikit-learn: ``skl2onnx.to_onnx`` with ``zipmap=False`` for classifiers, so the graph
returns a label tensor and a probability matrix (not a list of dictionaries), which is
what the parity check and the quantizers need.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Any

import numpy as np

from insitu.errors import UnsupportedOperatorError
from insitu.optimize._onnx import pin_ir

__all__ = ["export_sklearn", "export_torch", "set_mode"]


def set_mode(module: Any, *, training: bool) -> Any:
    """``module.train(training)``; a ``torch.export`` program's module has its mode baked in."""
    with contextlib.suppress(NotImplementedError):
        module.train(training)
    return module


def export_torch(module: Any, example: np.ndarray, *, name: str = "model") -> bytes:
    """ONNX bytes of a ``torch.nn.Module`` (or an unlifted ``ExportedProgram`` module).

    ``example`` is one input batch (any batch size of at least 2; the batch axis is
    exported as dynamic).

    Raises:
        UnsupportedOperatorError: the exporter has no ONNX translation for an operator.

    """
    import torch

    module = set_mode(module, training=False)
    tensor = torch.from_numpy(np.ascontiguousarray(example[:2] if len(example) >= 2 else example))
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            # The exporter narrates each pass on stdout and warns about libraries it
            # could use (torchvision) that these models never need.
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                module,
                (tensor,),
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=({0: batch},),
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many untyped errors; one line each
        text = str(exc).strip().splitlines()
        raise UnsupportedOperatorError(
            f"torch.onnx.export cannot export {name}: {text[0] if text else type(exc).__name__}"
            "; replace the operator or export the model to ONNX yourself"
        ) from exc
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise UnsupportedOperatorError(f"torch.onnx.export returned no program for {name}")
    return pin_ir(program.model_proto.SerializeToString())


def export_sklearn(estimator: Any, n_features: int, *, name: str = "model") -> bytes:
    """ONNX bytes of a fitted scikit-learn estimator or pipeline over float32 features.

    Raises:
        UnsupportedOperatorError: skl2onnx has no converter for a step of the pipeline.

    """
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proto = to_onnx(
                estimator,
                initial_types=[("input", FloatTensorType([None, n_features]))],
                options={"zipmap": False} if hasattr(estimator, "predict_proba") else None,
                target_opset={"": 18, "ai.onnx.ml": 3},
            )
    except Exception as exc:  # skl2onnx raises RuntimeError, MissingShapeCalculator...
        text = str(exc).strip().splitlines()
        raise UnsupportedOperatorError(
            f"skl2onnx cannot convert {name}: {text[0] if text else type(exc).__name__}; "
            "use estimators skl2onnx supports or export the pipeline to ONNX yourself"
        ) from exc
    return pin_ir(proto.SerializeToString())
