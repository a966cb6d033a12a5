"""Local training and evaluation at one site: plain SGD, or DP-SGD with Opacus.

DP-SGD (Abadi et al. 2016) as Opacus implements it: Poisson sampling of each record with
rate q = batch_size / n, per-sample gradients clipped to ``max_grad_norm``, Gaussian noise
of standard deviation ``noise_multiplier * max_grad_norm`` added to their sum. Each of
the ``steps`` steps is one :class:`~insitu.privacy.PrivacyEvent` application, which is
what the site's budget is charged for *before* training starts.

Opacus' noise comes from torch's default generator: statistically sound, not
cryptographically secure. Its ``secure_mode`` needs ``torchcsprng``, which is not
available for this torch build; insitu says so in a warning once per process.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from insitu.privacy import PrivacyEvent

__all__ = ["LocalResult", "evaluate", "planned_event", "train"]

logger = logging.getLogger(__name__)
_warned_rng = False


@dataclass(frozen=True)
class LocalResult:
    """Figures of one local training."""

    examples: int
    steps: int
    loss: float


def planned_event(
    *, rows: int, batch_size: int, epochs: int, noise_multiplier: float
) -> PrivacyEvent:
    """The privacy event of ``epochs`` of DP-SGD over ``rows`` records."""
    sample_rate = min(1.0, batch_size / rows)
    steps = epochs * math.ceil(1 / sample_rate)
    return PrivacyEvent(noise_multiplier, sample_rate, steps)


def _loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:
        return nn.functional.binary_cross_entropy_with_logits(logits.squeeze(-1), labels.float())
    return nn.functional.cross_entropy(logits, labels)


def train(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    event: PrivacyEvent | None,
    max_grad_norm: float,
    seed: int,
) -> LocalResult:
    """Train ``model`` in place; with ``event``, by DP-SGD with exactly its steps."""
    global _warned_rng  # noqa: PLW0603 -- one warning per process, not per round
    torch.manual_seed(seed)
    dataset = TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    losses: list[float] = []
    if event is None:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
        steps = 0
        for _ in range(epochs):
            for xb, yb in loader:
                optimizer.zero_grad()
                loss = _loss_fn(model(xb), yb)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                losses.append(float(loss.detach()))
                steps += 1
        return LocalResult(len(dataset), steps, float(np.mean(losses)) if losses else 0.0)

    from opacus import GradSampleModule
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer

    if not _warned_rng:
        logger.warning(
            "DP-SGD noise is drawn from torch's default generator (statistically sound, not "
            "cryptographically secure); Opacus' secure mode needs torchcsprng"
        )
        _warned_rng = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus repeats the secure-RNG notice above
        private = GradSampleModule(model)
        loader = DPDataLoader(
            dataset, sample_rate=event.sample_rate, generator=torch.Generator().manual_seed(seed)
        )
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=event.noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=max(1, round(event.sample_rate * len(dataset))),
        )
        steps = 0
        while steps < event.steps:
            for xb, yb in loader:
                if steps >= event.steps:
                    break
                steps += 1
                if not len(xb):
                    # An empty Poisson batch (probability about e^-expected_batch): its
                    # step is charged already and releases nothing when skipped.
                    continue
                dp_optimizer.zero_grad()
                loss = _loss_fn(private(xb), yb)
                loss.backward()  # type: ignore[no-untyped-call]
                losses.append(float(loss.detach()))
                dp_optimizer.step()
        private._close()
    return LocalResult(len(dataset), steps, float(np.mean(losses)) if losses else 0.0)


def evaluate(model: nn.Module, features: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(loss, accuracy) of ``model`` on a labelled set."""
    if len(labels) == 0:
        return 0.0, 0.0
    with torch.no_grad():
        logits = model(torch.from_numpy(features))
        loss = float(_loss_fn(logits, torch.from_numpy(labels)))
        binary = logits.shape[-1] == 1
        predicted = (logits.squeeze(-1) > 0).long() if binary else logits.argmax(-1)
        accuracy = float((predicted == torch.from_numpy(labels)).float().mean())
    return loss, accuracy
