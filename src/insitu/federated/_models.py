"""Built-in model families for tabular data, and weight transport as NumPy arrays."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["ModelFn", "build_model", "get_weights", "set_weights", "weights_digest"]

#: Builds a fresh model for ``n_features`` inputs (any ``torch.nn.Module`` whose output is
#: one logit per row for a binary label). Must be picklable: sites run it in other
#: processes. Layers must be supported by Opacus for record-level privacy.
ModelFn = Callable[[int], nn.Module]


def build_model(family: str, n_features: int, *, hidden: int = 32, n_classes: int = 2) -> nn.Module:
    """``logistic`` (one linear layer) or ``mlp`` (one hidden layer, ReLU)."""
    outputs = 1 if n_classes == 2 else n_classes
    if family == "logistic":
        return nn.Sequential(nn.Linear(n_features, outputs))
    if family == "mlp":
        return nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, outputs))
    raise ValueError(f"unknown model family {family!r}")


def weights_digest(weights: list[np.ndarray]) -> str:
    """SHA-256 (hex) of a list of arrays as float32 bytes: names a set of weights."""
    sha = hashlib.sha256()
    for array in weights:
        sha.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return sha.hexdigest()


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """The model's parameters and buffers, in ``state_dict`` order, as float32 arrays."""
    return [t.detach().cpu().numpy().astype(np.float32).copy() for t in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    """Load arrays produced by :func:`get_weights` (same architecture)."""
    keys = list(model.state_dict().keys())
    if len(keys) != len(weights):
        raise ValueError(f"expected {len(keys)} arrays, got {len(weights)}")
    model.load_state_dict(
        {k: torch.from_numpy(np.asarray(w)) for k, w in zip(keys, weights, strict=True)}
    )


def export_onnx(model: nn.Module, n_features: int) -> bytes:
    """Export to ONNX (torch's dynamo exporter) with a dynamic batch axis.

    The graph takes ``features`` (float32, [batch, n_features]) and returns ``logits``.
    """
    import contextlib
    import io
    import logging
    import warnings

    model = model.eval()
    example = torch.zeros(2, n_features)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # The exporter narrates each pass on stdout and warns about libraries
        # (torchvision) that tabular models never use.
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["features"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    proto = program.model_proto
    # ONNX Runtime 1.31 reads IR versions up to 11; onnx 1.23 may write newer ones.
    proto.ir_version = min(proto.ir_version, 10)
    data: bytes = proto.SerializeToString()
    return data
