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
        return scores.astype(np.float32)
    # scikit-learn classifiers give probabilities: their logs are logits up to a constant.
    logits = np.log(np.clip(scores, 1e-7, 1.0)).astype(np.float32)
    if logits.shape[1] == 2:
        return (logits[:, 1:] - logits[:, :1]).astype(np.float32)
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

    generator = torch.Generator().manual_seed(plan.seed)
    tx, tt = torch.from_numpy(x), torch.from_numpy(teacher)
    ty = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=plan.learning_rate)
    named = dict(model.named_parameters())
    model.train()
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
    model.eval()


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


def _structured(model: Any, example: np.ndarray, fraction: float) -> Any | None:
    """A copy of a Sequential with hidden units/channels removed, or None if not one."""
    import torch
    from torch import nn

    if not isinstance(model, nn.Sequential):
        return None
    layers = list(copy.deepcopy(model))
    shapes: list[tuple[int, ...]] = []
    with torch.no_grad():
        out = torch.from_numpy(example[:1])
        for layer in layers:
            out = layer(out)
            shapes.append(tuple(out.shape[1:]))
    changed = False
    weighted = [i for i, layer in enumerate(layers) if isinstance(layer, (nn.Linear, nn.Conv2d))]
    for a, b in zip(weighted, weighted[1:], strict=False):
        first, second = layers[a], layers[b]
        between = layers[a + 1 : b]
        if not all(
            type(m).__name__ in _PASS_THROUGH
            or isinstance(m, (nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d))
            for m in between
        ):
            return None
        width = first.weight.shape[0]
        keep_n = max(1, round(width * (1 - fraction)))
        if keep_n >= width:
            continue
        norms = first.weight.detach().abs().reshape(width, -1).sum(dim=1)
        keep = torch.sort(torch.topk(norms, keep_n).indices).values
        flatten_at = [m for m in between if isinstance(m, nn.Flatten)]
        with torch.no_grad():
            if isinstance(first, nn.Linear):
                new_first: nn.Module = nn.Linear(
                    first.in_features, keep_n, bias=first.bias is not None
                )
            else:
                new_first = nn.Conv2d(
                    first.in_channels,
                    keep_n,
                    first.kernel_size,
                    stride=first.stride,
                    padding=first.padding,
                    dilation=first.dilation,
                    bias=first.bias is not None,
                )
            new_first.weight.copy_(first.weight[keep])
            if first.bias is not None:
                new_first.bias.copy_(first.bias[keep])
            for i in range(a + 1, b):
                m = layers[i]
                if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    bn = type(m)(keep_n, eps=m.eps, momentum=m.momentum)
                    bn.weight.copy_(m.weight[keep])
                    bn.bias.copy_(m.bias[keep])
                    bn.running_mean.copy_(m.running_mean[keep])
                    bn.running_var.copy_(m.running_var[keep])
                    layers[i] = bn
            if isinstance(second, nn.Linear):
                columns = keep
                if flatten_at and isinstance(first, nn.Conv2d):
                    # Flattened channels: each kept channel keeps its block of positions.
                    block = second.in_features // width
                    columns = (keep[:, None] * block + torch.arange(block)[None, :]).reshape(-1)
                new_second: nn.Module = nn.Linear(
                    len(columns), second.out_features, bias=second.bias is not None
                )
                new_second.weight.copy_(second.weight[:, columns])
            else:
                new_second = nn.Conv2d(
                    keep_n,
                    second.out_channels,
                    second.kernel_size,
                    stride=second.stride,
                    padding=second.padding,
                    dilation=second.dilation,
                    bias=second.bias is not None,
                )
                new_second.weight.copy_(second.weight[:, keep])
            if second.bias is not None:
                new_second.bias.copy_(second.bias)
        layers[a], layers[b] = new_first, new_second
        changed = True
    del shapes
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
    pruned = _structured(module, x, plan.prune_fraction)
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
