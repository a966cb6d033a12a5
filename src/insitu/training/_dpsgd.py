"""Local training and evaluation at one site: plain SGD, or DP-SGD with Opacus.

DP-SGD (Abadi et al. 2016) as analysed by the accountant (``insitu.privacy``), with the
data subject as the unit of privacy (user-level DP-SGD, as in McMahan et al. 2018): each
of the ``steps`` steps samples every *subject* independently with probability
``sample_rate`` (Poisson sampling), averages the per-record gradients of each sampled
subject's records (Opacus' ``GradSampleModule``), clips each subject's gradient to
``max_grad_norm`` and adds Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` to their sum (Opacus' ``DPOptimizer``). A subject
with several records thus moves a step by at most one clipped gradient, exactly what
the accountant assumes, whatever their number of records. Without ``groups`` every
record is its own subject. Each call is one :class:`~insitu.privacy.PrivacyEvent`, which
the caller charges *before* training.

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

__all__ = ["LocalResult", "correct_per_row", "evaluate", "planned_event", "train"]


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
    groups: np.ndarray | None = None,
    randomness: SecureRandom | None = None,
) -> LocalResult:
    """Train ``model`` in place; with ``event``, by DP-SGD with exactly its steps.

    ``groups`` maps each row to its subject (0..subjects-1); ``event.sample_rate``
    applies to subjects. ``randomness`` exists for audits of the mechanism (a
    deliberately broken generator in a test fixture); leave it unset: each call then
    draws from a fresh secret stream.
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
        groups=np.arange(len(labels)) if groups is None else np.asarray(groups, np.int64),
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


class _Units:
    """The rows of each unit of privacy (subject), for sampling whole subjects."""

    def __init__(self, groups: np.ndarray) -> None:
        self.count = int(groups.max()) + 1 if len(groups) else 0
        order = np.argsort(groups, kind="stable")
        bounds = np.searchsorted(groups[order], np.arange(self.count + 1))
        self._order, self._bounds = order, bounds
        self.groups = groups

    def rows_of(self, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the ``chosen`` units, and each row's position among the chosen units."""
        if self.count == len(self.groups):  # one row per unit (the usual case): no spans
            return self._order[self._bounds[chosen]], np.arange(len(chosen))
        spans = [self._order[self._bounds[u] : self._bounds[u + 1]] for u in chosen]
        rows = np.concatenate(spans) if spans else np.zeros(0, np.int64)
        position = np.repeat(np.arange(len(chosen)), [len(span) for span in spans])
        return rows, position


def _per_unit(grad_sample: torch.Tensor, position: torch.Tensor, units: int) -> torch.Tensor:
    """Average per-record gradients by unit: one gradient per sampled subject."""
    summed = torch.zeros((units, *grad_sample.shape[1:]), dtype=grad_sample.dtype)
    summed.index_add_(0, position, grad_sample)
    counts = torch.bincount(position, minlength=units).clamp(min=1).to(grad_sample.dtype)
    return summed / counts.view(-1, *([1] * (grad_sample.dim() - 1)))


def _train_private(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    groups: np.ndarray,
    event: PrivacyEvent,
    learning_rate: float,
    max_grad_norm: float,
    randomness: SecureRandom,
) -> LocalResult:
    from opacus import GradSampleModule

    from insitu.training._cnn import check_dp_compatible

    check_dp_compatible(model)  # a layer Opacus rejects is named before any step
    x, y = torch.from_numpy(features), torch.from_numpy(labels)
    units = _Units(groups)
    losses: list[float] = []
    with warnings.catch_warnings():
        # Opacus warns that its own secure RNG is off: insitu draws from SecureRandom.
        warnings.simplefilter("ignore")
        private = GradSampleModule(model)
        optimizer = _secure_optimizer(
            torch.optim.SGD(model.parameters(), lr=learning_rate),
            event=event,
            max_grad_norm=max_grad_norm,
            expected_batch_size=max(1, round(event.sample_rate * units.count)),
            randomness=randomness,
        )
        for _ in range(event.steps):
            optimizer.zero_grad()
            chosen = np.flatnonzero(
                randomness.bernoulli(units.count, probability=event.sample_rate)
            )
            rows, position = units.rows_of(chosen)
            if len(rows):
                index = torch.from_numpy(rows)
                loss = _loss_fn(private(x[index]), y[index])
                loss.backward()  # type: ignore[no-untyped-call]
                losses.append(float(loss.detach()))
                where = torch.from_numpy(position)
                for p in optimizer.params:
                    p.grad_sample = _per_unit(p.grad_sample, where, len(chosen))
            else:
                # An empty Poisson batch: no gradient, but the step and its noise happen.
                for p in optimizer.params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            optimizer.step()
        private._close()
    return LocalResult(len(labels), event.steps, float(np.mean(losses)) if losses else 0.0)


def correct_per_row(model: nn.Module, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1.0 where ``model`` predicts a row's label, 0.0 elsewhere."""
    if len(labels) == 0:
        return np.zeros(0)
    with torch.no_grad():
        logits = model(torch.from_numpy(features))
        binary = logits.shape[-1] == 1
        predicted = (logits.squeeze(-1) > 0).long() if binary else logits.argmax(-1)
        right: np.ndarray = (predicted == torch.from_numpy(labels)).double().numpy()
    return right


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
