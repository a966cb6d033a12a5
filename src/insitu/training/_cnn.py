"""Models of array data: small CNNs for images and signals, any module, DP-SGD's rules.

Array records reach training as the table path encodes them: flat rows of the record's
values scaled to [0, 1] by the declared value range (``insitu.data.ArraySchema``).
:class:`ArrayModelFn` gives a model that restores the record's shape first, so the
module inside (:func:`build_cnn`, or any ``torch.nn.Module`` a user gives) takes records
of shape (N, C, H, W) or (N, C, L), as it would anywhere else.

The CNNs are built from layers whose per-record gradients Opacus computes and whose
output for a record does not depend on the other records of its batch: convolutions,
GroupNorm (never BatchNorm, which mixes a batch's records and so defeats per-record
clipping), ReLU, pooling, linear. :func:`check_dp_compatible` runs Opacus' own
``ModuleValidator`` on any module and refuses one it rejects, naming the layer and the
fix; every private training calls it first.

:func:`export_array_onnx` exports what a device serves: the graph takes the *raw* record
(``features``, float32 (batch, C, H, W) or (batch, C, L), in the declared value range),
clips and scales it exactly as training did, then runs the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from insitu.errors import UsageError

__all__ = [
    "ArrayModelFn",
    "ScaledInput",
    "build_cnn",
    "check_dp_compatible",
    "export_array_onnx",
]


def build_cnn(shape: tuple[int, ...], n_classes: int, *, width: int = 8) -> nn.Module:
    """A small CNN for records of ``shape``: (C, H, W) images or (C, L) signals.

    Two blocks of convolution, GroupNorm, ReLU and 2x pooling (a block pools only while
    the record is at least 4 long on each axis), then an average to at most 4 positions
    per axis and a linear layer: about 1,950 parameters on 8x8 digits (few weights: less
    DP noise to overcome on small sites). One output for two classes (a logit), else one
    per class.
    """
    if len(shape) not in (2, 3):
        raise UsageError(f"a CNN takes (C, H, W) images or (C, L) signals, not shape {shape}")
    two_d = len(shape) == 3
    conv = nn.Conv2d if two_d else nn.Conv1d
    pool = nn.MaxPool2d if two_d else nn.MaxPool1d
    kernel = 3 if two_d else 5
    layers: list[nn.Module] = []
    channels, size, pools = shape[0], min(shape[1:]), 0
    for out in (width, 2 * width):
        layers += [
            conv(channels, out, kernel, padding=kernel // 2),
            nn.GroupNorm(min(4, out), out),
            nn.ReLU(),
        ]
        if size >= 4:
            layers.append(pool(2))
            size, pools = size // 2, pools + 1
        channels = out
    positions = [min(4, n // 2**pools) for n in shape[1:]]
    adaptive = nn.AdaptiveAvgPool2d if two_d else nn.AdaptiveAvgPool1d
    layers += [
        adaptive(tuple(positions) if two_d else positions[0]),
        nn.Flatten(),
        nn.Linear(channels * math.prod(positions), 1 if n_classes == 2 else n_classes),
    ]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class ArrayModelFn:
    """Builds a model of array records from the number of input values (a ``ModelFn``).

    ``module``: a ``ModelFn`` (called with the number of values of a record, as for
    tables) whose module takes records of :attr:`shape`; default :func:`build_cnn`.
    Picklable (sites build it in other processes) when ``module`` is.
    """

    shape: tuple[int, ...]
    n_classes: int
    module: object = None

    def inner(self) -> nn.Module:
        """The module that takes records of :attr:`shape`."""
        if self.module is None:
            return build_cnn(self.shape, self.n_classes)
        built = self.module(math.prod(self.shape))  # type: ignore[operator]
        if not isinstance(built, nn.Module):
            raise UsageError(
                f"the model function returned {type(built).__name__}, not a torch.nn.Module"
            )
        return built

    def __call__(self, n_features: int) -> nn.Module:
        if n_features != math.prod(self.shape):
            raise UsageError(
                f"records of shape {self.shape} have {math.prod(self.shape)} values, "
                f"not {n_features}"
            )
        return nn.Sequential(nn.Unflatten(1, self.shape), self.inner())


class ScaledInput(nn.Module):
    """A model of flat scaled rows, taking raw records: clip, scale, flatten, run."""

    def __init__(self, model: nn.Module, low: float, high: float) -> None:
        super().__init__()
        self.model, self.low, self.high = model, float(low), float(high)

    def forward(self, records: torch.Tensor) -> torch.Tensor:
        scaled = (records.clamp(self.low, self.high) - self.low) / (self.high - self.low)
        output: torch.Tensor = self.model(scaled.flatten(1))
        return output


def export_array_onnx(
    model: nn.Module, shape: tuple[int, ...], value_range: tuple[float, float]
) -> tuple[bytes, nn.Module]:
    """The ONNX graph of raw records (see the module docstring), and the module exported.

    ``model`` takes flat scaled rows (an :class:`ArrayModelFn` model); the module
    returned takes raw records, for a parity check against the graph.
    """
    from insitu.training._models import export_onnx

    served = ScaledInput(model, *value_range).eval()
    return export_onnx(served, shape), served


def check_dp_compatible(model: nn.Module) -> None:
    """Refuse a module DP-SGD cannot train (Opacus' ``ModuleValidator``), naming the layer.

    Raises:
        UsageError: a layer Opacus rejects (BatchNorm, for one): which, why, and the fix.

    """
    from opacus.validators import ModuleValidator

    for name, layer in model.named_modules():
        check = ModuleValidator.VALIDATORS.get(type(layer))
        errors = check(layer) if check is not None else []
        if not errors:
            continue
        kind = type(layer).__name__
        if "BatchNorm" in kind:
            why = "it normalizes each record by the others of its batch"
            fix = (
                "replace it with nn.GroupNorm, which normalizes each record on its own "
                "(opacus.validators.ModuleValidator.fix(model) does it)"
            )
        else:
            why = str(errors[0]).strip().splitlines()[0][:160]
            fix = "replace it with a layer Opacus supports (opacus.validators.ModuleValidator.fix)"
        raise UsageError(
            f"the model's layer {name or 'model'!r} ({kind}) cannot be trained with DP-SGD: "
            f"{why}; {fix}"
        )
