"""Built-in model families for tabular data, and weight transport as NumPy arrays."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "PARITY_TOLERANCE",
    "ModelFn",
    "Parity",
    "build_model",
    "check_parity",
    "export_onnx",
    "get_weights",
    "onnx_parity",
    "set_weights",
    "weights_digest",
]

#: Largest difference allowed between an ONNX export and its source model, relative to
#: the scale of the outputs (the largest absolute output, at least 1): float32 kernels
#: reorder sums, so the absolute error grows with the size of the logits.
PARITY_TOLERANCE = 1e-4

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
    if family == "cnn":
        from insitu.errors import UsageError

        raise UsageError(
            "--model cnn takes array data (an .npz or a folder of images) in 'insitu federate "
            "simulate'; a deployed federation trains the tabular families only for now"
        )
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


def export_onnx(model: nn.Module, n_features: int | tuple[int, ...]) -> bytes:
    """Export to ONNX (torch's dynamo exporter) with a dynamic batch axis.

    The graph takes ``features`` (float32, [batch, n_features], or [batch, *shape] for a
    shape such as an image's (C, H, W)) and returns ``logits``.
    """
    import contextlib
    import io
    import logging
    import warnings

    model = model.eval()
    example = torch.zeros(2, *((n_features,) if isinstance(n_features, int) else n_features))
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


@dataclass(frozen=True)
class Parity:
    """How far an ONNX export's outputs are from the source model's, on a probe."""

    max_abs_diff: float
    scale: float

    @property
    def relative(self) -> float:
        """The largest difference over the scale of the outputs (at least 1)."""
        return self.max_abs_diff / max(1.0, self.scale)

    @property
    def ok(self) -> bool:
        """Within :data:`PARITY_TOLERANCE`."""
        return self.relative <= PARITY_TOLERANCE


def check_parity(reference: np.ndarray, candidate: np.ndarray) -> Parity:
    """The parity of ``candidate`` outputs against ``reference`` outputs."""
    if reference.size == 0:
        return Parity(0.0, 0.0)
    diff = float(np.max(np.abs(np.asarray(candidate, np.float64) - reference)))
    return Parity(diff, float(np.max(np.abs(reference))))


def onnx_parity(model: nn.Module, onnx_bytes: bytes, probe: np.ndarray) -> Parity:
    """Run ``probe`` through both; raise when the export differs beyond the tolerance.

    Raises:
        FederationError: the export differs from the model by more than
            :data:`PARITY_TOLERANCE` of the outputs' scale.

    """
    from insitu._ort import create_session
    from insitu.errors import FederationError

    probe = np.ascontiguousarray(probe, dtype=np.float32)
    if not len(probe):
        return Parity(0.0, 0.0)
    onnx_out = create_session(onnx_bytes, intra_op_threads=1).run(None, {"features": probe})[0]
    with torch.no_grad():
        torch_out = model(torch.from_numpy(probe)).numpy().astype(np.float64)
    parity = check_parity(torch_out, onnx_out)
    if not parity.ok:
        raise FederationError(
            f"ONNX export differs from the PyTorch model by {parity.max_abs_diff:.2e} "
            f"({parity.relative:.2e} of the outputs' scale {parity.scale:.3g}; tolerance "
            f"{PARITY_TOLERANCE:g})"
        )
    return parity
