"""Pruning and knowledge distillation, each followed by training against the source model.

Both fine-tune by *distillation* on the calibration records: the loss is the distance
between the candidate's outputs and the source model's (soft targets), plus the label
loss when the records carry labels. So the calibration set need not be labelled, and
what the candidate learns is to behave like the model the user already trusts.

Pruning is structured where it really shrinks the ONNX graph: for an ``nn.Sequential``
of ``Linear``/``Conv2d`` layers (with element-wise activations, pooling, ``Flatten``,
dropout or batch norm between them), the hidden units or channels of smallest L1 norm
are removed, and the next layer loses the matching inputs, so the exported matrices are
smaller. Any other module is pruned by magnitude inside its weight tensors (unstructured):
the zeros stay in a dense ONNX tensor, so this makes the graph no smaller (the report
says so), only easier to compress.

A distilled student is proposed from the input shape when the user names none: an MLP
with one hidden layer for rows of features, a one-convolution CNN for images, each sized
to about an eighth of the teacher's parameters.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from insitu.errors import UsageError
from insitu.optimize._export import set_mode

__all__ = ["CompressionPlan", "distill", "propose_student", "prune"]

logger = logging.getLogger(__name__)

_STUDENT = re.compile(r"^(mlp|cnn):(\d+)$")


@dataclass(frozen=True)
class CompressionPlan:
    """How long fine-tuning and distillation train (quick mode shortens both)."""

    prune_fraction: float = 0.5
    finetune_epochs: int = 8
    distill_epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 3e-3
    temperature: float = 2.0
    seed: int = 0


def _soft_loss(student: Any, teacher: Any, labels: Any, temperature: float) -> Any:
    import torch
    from torch.nn import functional

    if student.shape[-1] == 1:
        target = torch.sigmoid(teacher / temperature)
        loss = functional.binary_cross_entropy_with_logits(student / temperature, target)
        loss = loss * temperature**2
        if labels is not None:
            loss = 0.5 * loss + 0.5 * functional.binary_cross_entropy_with_logits(
                student.squeeze(-1), labels.float()
            )
        return loss
    soft = functional.kl_div(
        functional.log_softmax(student / temperature, dim=-1),
        functional.log_softmax(teacher / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    ) * (temperature**2)
    if labels is not None:
        soft = 0.5 * soft + 0.5 * functional.cross_entropy(student, labels)
    return soft


def _teacher_logits(scores: np.ndarray, *, probabilities: bool) -> np.ndarray:
    if not probabilities:
        return np.asarray(scores, dtype=np.float32)
    # scikit-learn classifiers give probabilities: their logs are logits up to a constant.
    logits = np.asarray(np.log(np.clip(scores, 1e-7, 1.0)), dtype=np.float32)
    if logits.shape[1] == 2:
        return np.asarray(logits[:, 1:] - logits[:, :1], dtype=np.float32)
    return logits


def fit_to_teacher(
    model: Any,
    x: np.ndarray,
    teacher: np.ndarray,
    labels: np.ndarray | None,
    *,
    epochs: int,
    plan: CompressionPlan,
    masks: dict[str, Any] | None = None,
) -> None:
    """Train ``model`` in place to match ``teacher`` logits on ``x`` (Adam, shuffled)."""
    import torch

    tx, tt = torch.from_numpy(x), torch.from_numpy(teacher)
    ty = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=plan.learning_rate)
    named = dict(model.named_parameters())
    # Small models on a small CPU: a second thread only spins (ADR 0404).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _epochs(
            model,
            optimizer,
            tx=tx,
            tt=tt,
            ty=ty,
            named=named,
            masks=masks,
            epochs=epochs,
            plan=plan,
        )
    finally:
        torch.set_num_threads(threads)


def _epochs(
    model: Any,
    optimizer: Any,
    *,
    tx: Any,
    tt: Any,
    ty: Any,
    named: dict[str, Any],
    masks: dict[str, Any] | None,
    epochs: int,
    plan: CompressionPlan,
) -> None:
    import torch

    generator = torch.Generator().manual_seed(plan.seed)
    set_mode(model, training=True)
    for _ in range(epochs):
        order = torch.randperm(len(tx), generator=generator)
        for start in range(0, len(tx), plan.batch_size):
            index = order[start : start + plan.batch_size]
            optimizer.zero_grad()
            output = model(tx[index]).reshape(len(index), -1)
            loss = _soft_loss(
                output, tt[index], None if ty is None else ty[index], plan.temperature
            )
            loss.backward()
            optimizer.step()
            if masks:
                with torch.no_grad():
                    for key, mask in masks.items():
                        named[key].mul_(mask)
    set_mode(model, training=False)


# ----------------------------------------------------------------------------- pruning

_PASS_THROUGH = (
    "ReLU",
    "LeakyReLU",
    "GELU",
    "Tanh",
    "Sigmoid",
    "SiLU",
    "Dropout",
    "MaxPool2d",
    "AvgPool2d",
    "Identity",
)


def _conv_like(layer: Any, in_channels: int, out_channels: int) -> Any:
    from torch import nn

    return nn.Conv2d(
        in_channels,
        out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        bias=layer.bias is not None,
    )


def _shrink_pair(layers: list[Any], a: int, b: int, fraction: float) -> bool:
    """Remove the weakest outputs of ``layers[a]`` and the matching inputs of ``layers[b]``."""
    import torch
    from torch import nn

    first: Any = layers[a]
    second: Any = layers[b]
    width = int(first.weight.shape[0])
    keep_n = max(1, round(width * (1 - fraction)))
    if keep_n >= width:
        return False
    norms = first.weight.detach().abs().reshape(width, -1).sum(dim=1)
    keep = torch.sort(torch.topk(norms, keep_n).indices).values
    with torch.no_grad():
        if isinstance(first, nn.Linear):
            new_first: Any = nn.Linear(first.in_features, keep_n, bias=first.bias is not None)
        else:
            new_first = _conv_like(first, first.in_channels, keep_n)
        new_first.weight.copy_(first.weight[keep])
        if first.bias is not None:
            new_first.bias.copy_(first.bias[keep])
        for i in range(a + 1, b):
            norm: Any = layers[i]
            if isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d)):
                bn: Any = type(norm)(keep_n, eps=norm.eps, momentum=norm.momentum)
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(bn, name).copy_(getattr(norm, name)[keep])
                layers[i] = bn
        if isinstance(second, nn.Linear):
            columns = keep
            if isinstance(first, nn.Conv2d):
                # Flattened channels: each kept channel keeps its block of positions.
                block = int(second.in_features) // width
                columns = (keep[:, None] * block + torch.arange(block)[None, :]).reshape(-1)
            new_second: Any = nn.Linear(
                len(columns), second.out_features, bias=second.bias is not None
            )
            new_second.weight.copy_(second.weight[:, columns])
        else:
            new_second = _conv_like(second, keep_n, second.out_channels)
            new_second.weight.copy_(second.weight[:, keep])
        if second.bias is not None:
            new_second.bias.copy_(second.bias)
    layers[a], layers[b] = new_first, new_second
    return True


def _structured(model: Any, fraction: float) -> Any | None:
    """A copy of a Sequential with hidden units/channels removed, or None if not one."""
    from itertools import pairwise

    from torch import nn

    if not isinstance(model, nn.Sequential):
        return None
    layers: list[Any] = list(copy.deepcopy(model))
    weighted = [i for i, layer in enumerate(layers) if isinstance(layer, (nn.Linear, nn.Conv2d))]
    between_ok = (nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d)
    changed = False
    for a, b in pairwise(weighted):
        between = layers[a + 1 : b]
        if not all(type(m).__name__ in _PASS_THROUGH or isinstance(m, between_ok) for m in between):
            return None
        changed |= _shrink_pair(layers, a, b, fraction)
    return nn.Sequential(*layers) if changed else None


def prune(
    module: Any,
    x: np.ndarray,
    teacher: np.ndarray,
    labels: np.ndarray | None,
    *,
    plan: CompressionPlan,
) -> tuple[Any, str]:
    """(pruned and fine-tuned copy of ``module``, "structured" or "unstructured")."""
    import torch

    torch.manual_seed(plan.seed)
    pruned = _structured(module, plan.prune_fraction)
    if pruned is not None:
        fit_to_teacher(pruned, x, teacher, labels, epochs=plan.finetune_epochs, plan=plan)
        return pruned, "structured"
    copied = copy.deepcopy(module)
    masks: dict[str, Any] = {}
    with torch.no_grad():
        for key, parameter in copied.named_parameters():
            if parameter.dim() < 2:
                continue
            flat = parameter.detach().abs().reshape(-1)
            k = int(len(flat) * plan.prune_fraction)
            if k == 0:
                continue
            threshold = torch.kthvalue(flat, k).values
            masks[key] = (parameter.abs() > threshold).to(parameter.dtype)
            parameter.mul_(masks[key])
    fit_to_teacher(copied, x, teacher, labels, epochs=plan.finetune_epochs, plan=plan, masks=masks)
    return copied, "unstructured"


# ------------------------------------------------------------------------ distillation


def _parameter_count(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters())) if module is not None else 0


def propose_student(
    input_shape: tuple[int, ...], outputs: int, *, teacher_parameters: int, spec: str | None
) -> tuple[Any, str]:
    """(untrained student, its description): ``spec`` ``mlp:H`` / ``cnn:C``, or proposed."""
    from torch import nn

    kind, size = None, None
    if spec is not None:
        match = _STUDENT.match(spec)
        if match is None:
            raise UsageError(f"--student {spec!r}: use mlp:HIDDEN or cnn:CHANNELS (e.g. mlp:16)")
        kind, size = match.group(1), int(match.group(2))
    if len(input_shape) == 1 and kind in {None, "mlp"}:
        features = input_shape[0]
        if size is None:
            budget = max(teacher_parameters // 8, 1)
            size = max(4, min(256, budget // (features + outputs + 1)))
        student = nn.Sequential(nn.Linear(features, size), nn.ReLU(), nn.Linear(size, outputs))
        return student, f"mlp:{size}"
    if len(input_shape) == 3 and kind in {None, "cnn"}:
        channels, height, width = input_shape
        flat_per_channel = (height // 2) * (width // 2)
        if size is None:
            budget = max(teacher_parameters // 8, 1)
            size = max(2, min(64, budget // (channels * 9 + flat_per_channel * outputs + 1)))
        student = nn.Sequential(
            nn.Conv2d(channels, size, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(size * flat_per_channel, outputs),
        )
        return student, f"cnn:{size}"
    raise UsageError(
        f"no student of kind {kind or 'any'} for inputs of shape {input_shape}: insitu proposes "
        "MLPs for feature rows and CNNs for CxHxW images; name one with --student"
    )


def distill(
    x: np.ndarray,
    teacher_scores: np.ndarray,
    labels: np.ndarray | None,
    *,
    input_shape: tuple[int, ...],
    teacher_parameters: int,
    probabilities: bool,
    plan: CompressionPlan,
    student: Any = None,
    spec: str | None = None,
) -> tuple[Any, str]:
    """(trained student, its description), distilled from ``teacher_scores`` on ``x``."""
    import torch

    torch.manual_seed(plan.seed)
    teacher = _teacher_logits(teacher_scores, probabilities=probabilities)
    description = "user's module"
    if student is None:
        student, description = propose_student(
            input_shape, teacher.shape[1], teacher_parameters=teacher_parameters, spec=spec
        )
    fit_to_teacher(student, x, teacher, labels, epochs=plan.distill_epochs, plan=plan)
    return student, description


__all__ += ["fit_to_teacher"]
