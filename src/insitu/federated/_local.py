"""Local training and evaluation at one site: plain SGD, or DP-SGD with Opacus.

DP-SGD (Abadi et al. 2016) as analysed by the accountant (``insitu.privacy``): each of
the ``steps`` steps samples every record independently with probability ``sample_rate``
(Poisson sampling), clips each sampled record's gradient to ``max_grad_norm`` (Opacus'
``GradSampleModule`` and ``DPOptimizer``) and adds Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` to their sum. Each call is one
:class:`~insitu.privacy.PrivacyEvent`, which the caller charges *before* training.

Invariants the privacy analysis needs, and where each is kept:

* the sampling and the noise are secret: both come from a fresh
  :class:`~insitu.privacy.SecureRandom` (keyed from the OS), never from ``seed`` or any
  value a record, ledger or model card publishes. A private run is therefore not
  reproducible, by design; ``seed`` only orders the batches of non-private training;
* every step is taken, empty Poisson batches included: a step with no record sampled
  still releases its noise, exactly as the analysed mechanism does (skipping it would
  make the number of updates depend on the sample);
* the per-step normalisation is by the *expected* batch size, a constant, so one
  record's presence changes the update by at most ``max_grad_norm / expected_batch``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from insitu.privacy import PrivacyEvent, SecureRandom

__all__ = ["LocalResult", "evaluate", "planned_event", "train"]


@dataclass(frozen=True)
class LocalResult:
    """Figures of one local training (kept at the site: the loss is not a released value)."""

    examples: int
    steps: int
    loss: float


def planned_event(
    *, rows: int, batch_size: int, epochs: int, noise_multiplier: float
) -> PrivacyEvent:
    """The privacy event of ``epochs`` of DP-SGD over ``rows`` records."""
    sample_rate = min(1.0, batch_size / max(rows, 1))
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
    seed: int = 0,
    randomness: SecureRandom | None = None,
) -> LocalResult:
    """Train ``model`` in place; with ``event``, by DP-SGD with exactly its steps.

    ``randomness`` exists for audits of the mechanism (a deliberately broken generator
    in a test fixture); leave it unset: each call then draws from a fresh secret stream.
    """
    if event is None:
        return _train_plain(
            model,
            features,
            labels,
            epochs=epochs,
            batch_size=batch_size,
            lr=learning_rate,
            seed=seed,
        )
    return _train_private(
        model,
        features,
        labels,
        event=event,
        learning_rate=learning_rate,
        max_grad_norm=max_grad_norm,
        randomness=randomness or SecureRandom(),
    )


def _train_plain(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> LocalResult:
    dataset = TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses: list[float] = []
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = _loss_fn(model(xb), yb)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            losses.append(float(loss.detach()))
    return LocalResult(len(dataset), len(losses), float(np.mean(losses)) if losses else 0.0)


def _secure_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    event: PrivacyEvent,
    max_grad_norm: float,
    expected_batch_size: int,
    randomness: SecureRandom,
) -> Any:
    """Opacus' ``DPOptimizer`` whose Gaussian noise comes from ``randomness``."""
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class SecureDPOptimizer(DPOptimizer):  # type: ignore[misc]
        """Replaces only the noise draw (opacus 1.6.0, pinned): clipping is Opacus' own."""

        def add_noise(self) -> None:
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = randomness.normal(tuple(p.summed_grad.shape), std=std)
                p.grad = (p.summed_grad + torch.from_numpy(noise).to(p.summed_grad.dtype)).view_as(
                    p
                )
                _mark_as_processed(p.summed_grad)

    return SecureDPOptimizer(
        optimizer,
        noise_multiplier=event.noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
    )


def _train_private(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    event: PrivacyEvent,
    learning_rate: float,
    max_grad_norm: float,
    randomness: SecureRandom,
) -> LocalResult:
    from opacus import GradSampleModule

    x, y = torch.from_numpy(features), torch.from_numpy(labels)
    rows = len(y)
    losses: list[float] = []
    with warnings.catch_warnings():
        # Opacus warns that its own secure RNG is off: insitu draws from SecureRandom.
        warnings.simplefilter("ignore")
        private = GradSampleModule(model)
        optimizer = _secure_optimizer(
            torch.optim.SGD(model.parameters(), lr=learning_rate),
            event=event,
            max_grad_norm=max_grad_norm,
            expected_batch_size=max(1, round(event.sample_rate * rows)),
            randomness=randomness,
        )
        for _ in range(event.steps):
            optimizer.zero_grad()
            chosen = np.flatnonzero(randomness.bernoulli(rows, probability=event.sample_rate))
            if len(chosen):
                index = torch.from_numpy(chosen)
                loss = _loss_fn(private(x[index]), y[index])
                loss.backward()  # type: ignore[no-untyped-call]
                losses.append(float(loss.detach()))
            else:
                # An empty Poisson batch: no gradient, but the step and its noise happen.
                for p in optimizer.params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            optimizer.step()
        private._close()
    return LocalResult(rows, event.steps, float(np.mean(losses)) if losses else 0.0)


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
