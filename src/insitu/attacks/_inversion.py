"""Gradient inversion: what a model update reveals about the records behind it.

The attack (Deep Leakage from Gradients, Zhu et al. 2019, with the iDLG label trick of
Zhao et al. 2020): the attacker holds the model the update was computed from and the
update's gradient. It infers the label from the sign of the last layer's bias gradient
(for cross-entropy, only the true class has a negative bias gradient; for one logit,
``sigmoid(z) - y`` is negative exactly when y = 1), then optimizes a dummy record with
L-BFGS until the dummy's gradient matches the observed one. Two matching objectives are
run and the better reconstruction kept: DLG's squared distance, and the cosine distance
of Geiping et al. (2020), which ignores the update's scale (an aggregate is a sum of
unknown size). With a few random restarts, this reconstructs a single record from a
small fully connected model's raw gradient almost exactly.

What the aggregator sees under insitu's protections is simulated, not run through
Flower: each site takes one DP-SGD step on its batch (per-record clipping to
``max_grad_norm``, Gaussian noise of ``noise_multiplier * max_grad_norm`` on the site's
sum, as Opacus does), and SecAgg+ reveals only the sum over sites. The sum is computed
in the clear here; SecAgg+ reveals exactly that sum (up to its quantization, which only
adds rounding error; ``tests/federated`` checks that the strategy only ever holds the
aggregate). Reconstruction quality is measured against every record in the round and
the *best* match reported: the attacker's most favourable case.

Quality: cosine similarity of the reconstruction and the true record, both centred on
the data's public mean (an uncentred cosine rewards guessing the mean record, which
needs no attack: on one-hot or pixel data it is about 0.7), and the mean squared error.

Assumes: an honest-but-curious aggregator that knows the model and sees one update of
one step. Does not cover: multi-step updates (FedAvg over several local epochs), image
priors (total variation), or analytic attacks on the first layer; these are stronger
against *raw* updates, not against the DP aggregate, whose noise is what protects it.
Written by hand: no well-kept library ships gradient inversion for arbitrary models.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "ChanceBand",
    "InversionDemo",
    "InversionResult",
    "chance_cosine",
    "dp_secagg_aggregate",
    "infer_label",
    "inversion_demo",
    "invert_gradient",
    "raw_update",
    "reconstruction_quality",
]


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:
        return nn.functional.binary_cross_entropy_with_logits(
            logits.squeeze(-1), labels.float(), reduction="sum"
        )
    return nn.functional.cross_entropy(logits, labels, reduction="sum")


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def raw_update(model: nn.Module, features: np.ndarray, labels: np.ndarray) -> list[torch.Tensor]:
    """Gradient of the summed loss over a batch: a site's raw, unprotected update."""
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    grads = torch.autograd.grad(_loss(model(x), y), _params(model))
    return [g.detach() for g in grads]


def dp_secagg_aggregate(
    model: nn.Module,
    sites: list[tuple[np.ndarray, np.ndarray]],
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Sum over sites of one DP-SGD step's noised, clipped gradient sum: SecAgg+'s output.

    The noise is secret (:class:`~insitu.privacy.SecureRandom`), as in a real site:
    ``seed`` is kept for the signature and plays no part in it.
    """
    from insitu.privacy import SecureRandom

    random = SecureRandom()
    params = _params(model)
    total = [torch.zeros_like(p) for p in params]
    for features, labels in sites:
        for row, label in zip(features, labels, strict=True):
            grads = raw_update(model, row[None, :], np.asarray([label]))
            norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
            scale = min(1.0, max_grad_norm / (norm + 1e-12))
            for t, g in zip(total, grads, strict=True):
                t.add_(g * scale)
        if noise_multiplier > 0:
            for t in total:
                noise = random.normal(tuple(t.shape), std=noise_multiplier * max_grad_norm)
                t.add_(torch.from_numpy(noise).to(t.dtype))
    return total


def infer_label(model: nn.Module, gradient: list[torch.Tensor]) -> int:
    """iDLG: the label of a one-record gradient, from the last layer's bias gradient."""
    last_bias = gradient[-1]
    if last_bias.numel() == 1:
        return int(float(last_bias.reshape(-1)[0]) < 0)
    return int(torch.argmin(last_bias))


def _match(dummy: list[torch.Tensor], target: list[torch.Tensor], objective: str) -> torch.Tensor:
    pairs = list(zip(dummy, target, strict=True))
    if objective == "l2":
        return torch.stack([((d - t) ** 2).sum() for d, t in pairs]).sum()
    dot = torch.stack([(d * t).sum() for d, t in pairs]).sum()
    dn = torch.stack([(d**2).sum() for d in dummy]).sum().sqrt()
    tn = torch.stack([(t**2).sum() for t in target]).sum().sqrt()
    return 1 - dot / (dn * tn + 1e-12)


def invert_gradient(
    model: nn.Module,
    gradient: list[torch.Tensor],
    *,
    n_features: int,
    label: int | None = None,
    objective: str = "l2",
    restarts: int = 4,
    iterations: int = 60,
    seed: int = 0,
) -> tuple[np.ndarray, int, float]:
    """(reconstructed record, label used, final gradient mismatch), best of ``restarts``."""
    label = infer_label(model, gradient) if label is None else label
    y = torch.tensor([label])
    params = _params(model)
    generator = torch.Generator().manual_seed(seed)
    best: tuple[np.ndarray, float] | None = None
    for _ in range(restarts):
        dummy = torch.randn((1, n_features), generator=generator).mul_(0.5).add_(0.5)
        dummy.requires_grad_(True)
        optimizer = torch.optim.LBFGS([dummy], lr=1.0, max_iter=iterations, history_size=50)

        def closure(dummy: torch.Tensor = dummy, optimizer: Any = optimizer) -> torch.Tensor:
            optimizer.zero_grad()
            grads = torch.autograd.grad(_loss(model(dummy), y), params, create_graph=True)
            mismatch = _match(list(grads), gradient, objective)
            mismatch.backward()  # type: ignore[no-untyped-call]
            return mismatch

        optimizer.step(closure)  # type: ignore[no-untyped-call]
        grads = torch.autograd.grad(_loss(model(dummy), y), params)
        final = float(_match(list(grads), gradient, objective).detach())
        if not np.isfinite(final):
            continue
        if best is None or final < best[1]:
            best = (dummy.detach().numpy()[0].copy(), final)
    if best is None:
        return np.zeros(n_features, dtype=np.float32), label, float("inf")
    return best[0], label, best[1]


def _cosines(vector: np.ndarray, records: np.ndarray, mean: np.ndarray) -> np.ndarray:
    r = vector - mean
    c = records - mean[None, :]
    result: np.ndarray = (c @ r) / (np.linalg.norm(c, axis=1) * np.linalg.norm(r) + 1e-12)
    return result


def reconstruction_quality(
    reconstruction: np.ndarray, records: np.ndarray, *, mean: np.ndarray
) -> tuple[float, float, float]:
    """(centred cosine to the target ``records[0]``, MSE to it, best cosine to any record)."""
    cosines = _cosines(reconstruction, records, mean)
    mse = float(np.mean((reconstruction - records[0]) ** 2))
    return float(cosines[0]), mse, float(cosines.max())


def chance_cosine(
    records: np.ndarray, *, mean: np.ndarray, draws: int = 64, seed: int = 0
) -> float:
    """Best centred cosine to any record that a random direction gets, on average.

    The floor that ``best_cosine`` must be read against: with many records in an update,
    noise alone comes close to *some* record.
    """
    return ChanceBand.of(records, mean=mean, draws=draws, seed=seed).best_mean


@dataclass(frozen=True)
class ChanceBand:
    """What a random direction reaches against the records of an update.

    One attack on a noised aggregate is one draw, so it is read against the spread of
    random guesses, not their mean: ``best_high`` and ``target_high`` are the upper
    ``quantile`` of a random direction's best cosine to any record and its cosine to the
    target (``records[0]``). An attack that stays under them has learnt nothing a guess
    would not give; one above them (rate ``1 - quantile`` for a guess) has.
    """

    best_mean: float
    best_high: float
    target_high: float
    quantile: float

    @classmethod
    def of(
        cls,
        records: np.ndarray,
        *,
        mean: np.ndarray,
        draws: int = 20_000,
        quantile: float = 0.999,
        seed: int = 0,
    ) -> ChanceBand:
        """Measure the band over ``draws`` standard normal directions around ``mean``."""
        rng = np.random.default_rng(seed)
        guesses = rng.standard_normal((draws, len(mean)))
        centred = records - mean[None, :]
        cosines = (guesses @ centred.T) / (
            np.linalg.norm(guesses, axis=1)[:, None] * np.linalg.norm(centred, axis=1)[None, :]
            + 1e-12
        )
        best = cosines.max(axis=1)
        return cls(
            best_mean=float(best.mean()),
            best_high=float(np.quantile(best, quantile)),
            target_high=float(np.quantile(cosines[:, 0], quantile)),
            quantile=quantile,
        )


@dataclass(frozen=True)
class InversionResult:
    """One attack on one update: how close the reconstruction came to the target record.

    ``cosine`` and ``mse`` compare with the target record (the one the raw update was
    computed from; it is in every aggregate); ``best_cosine`` with whichever record of
    the update came closest, against ``chance_cosine``, what a random guess gets on
    average. One attack is one draw: ``chance_best_high`` and ``chance_target_high`` are
    the upper 99.9% of random guesses (``ChanceBand``), the lines an attack that learnt
    something would cross.
    """

    setting: str
    cosine: float
    mse: float
    best_cosine: float
    chance_cosine: float
    chance_best_high: float
    chance_target_high: float
    label_correct: bool
    records_in_update: int
    seconds: float
    reconstruction: np.ndarray = field(repr=False)
    target: np.ndarray = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """Figures only (never the records)."""
        return {
            "setting": self.setting,
            "cosine": round(self.cosine, 4),
            "mse": round(self.mse, 6),
            "best_cosine": round(self.best_cosine, 4),
            "chance_cosine": round(self.chance_cosine, 4),
            "chance_best_high": round(self.chance_best_high, 4),
            "chance_target_high": round(self.chance_target_high, 4),
            "label_correct": self.label_correct,
            "records_in_update": self.records_in_update,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class InversionDemo:
    """The raw update against what the aggregator sees with insitu's protections."""

    results: tuple[InversionResult, ...]
    sites: int
    records_per_site: int
    max_grad_norm: float
    noise_multiplier: float

    def to_json(self) -> dict[str, Any]:
        """Figures only."""
        return {
            "sites": self.sites,
            "records_per_site": self.records_per_site,
            "max_grad_norm": self.max_grad_norm,
            "noise_multiplier": self.noise_multiplier,
            "results": [r.to_json() for r in self.results],
        }


def _attack(
    setting: str,
    model: nn.Module,
    gradient: list[torch.Tensor],
    records: np.ndarray,
    labels: np.ndarray,
    *,
    mean: np.ndarray,
    restarts: int,
    iterations: int,
    seed: int,
) -> InversionResult:
    started = time.perf_counter()
    band = ChanceBand.of(records, mean=mean, seed=seed)
    if len(records) == 1:  # the raw update: no other record to come close to by chance
        band = ChanceBand(0.0, 0.0, band.target_high, band.quantile)
    best: InversionResult | None = None
    for objective in ("l2", "cosine"):
        x, label, _ = invert_gradient(
            model,
            gradient,
            n_features=records.shape[1],
            objective=objective,
            restarts=restarts,
            iterations=iterations,
            seed=seed,
        )
        cosine, mse, best_cosine = reconstruction_quality(x, records, mean=mean)
        if best is None or cosine > best.cosine:
            best = InversionResult(
                setting=setting,
                cosine=cosine,
                mse=mse,
                best_cosine=best_cosine,
                chance_cosine=band.best_mean,
                chance_best_high=band.best_high,
                chance_target_high=band.target_high,
                label_correct=bool(label == int(labels[0])),
                records_in_update=len(records),
                seconds=0.0,
                reconstruction=x,
                target=records[0],
            )
    assert best is not None
    return InversionResult(
        **{**best.__dict__, "seconds": time.perf_counter() - started}  # frozen: rebuild
    )


def inversion_demo(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    sites: int = 5,
    records_per_site: int = 16,
    max_grad_norm: float = 1.0,
    noise_multiplier: float = 1.0,
    restarts: int = 4,
    iterations: int = 60,
    seed: int = 0,
) -> InversionDemo:
    """Attack one site's raw one-record update, the plain sum, and the DP SecAgg+ sum.

    ``features`` must hold at least ``sites * records_per_site`` records; the first is
    the record the raw update is computed from; the data's mean is the public prior.
    """
    needed = sites * records_per_site
    if len(labels) < needed:
        raise ValueError(f"need {needed} records for {sites} sites of {records_per_site}")
    features = np.asarray(features, dtype=np.float32)
    mean = features.mean(axis=0)
    model = model.eval()
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(labels), size=needed, replace=False)
    x, y = features[chosen], np.asarray(labels)[chosen]
    site_sets = [
        (x[i * records_per_site : (i + 1) * records_per_site],
         y[i * records_per_site : (i + 1) * records_per_site])
        for i in range(sites)
    ]  # fmt: skip
    common = {"mean": mean, "restarts": restarts, "iterations": iterations, "seed": seed}
    raw = _attack("raw update, one record", model, raw_update(model, x[:1], y[:1]),
                  x[:1], y[:1], **common)  # fmt: skip
    plain = _attack(
        "SecAgg+ sum, no DP",
        model,
        dp_secagg_aggregate(model, site_sets, max_grad_norm=np.inf, noise_multiplier=0.0),
        x,
        y,
        **common,
    )
    protected = _attack(
        "SecAgg+ sum of clipped, noised updates",
        model,
        dp_secagg_aggregate(
            model,
            site_sets,
            max_grad_norm=max_grad_norm,
            noise_multiplier=noise_multiplier,
            seed=seed,
        ),
        x,
        y,
        **common,
    )
    return InversionDemo(
        results=(raw, plain, protected),
        sites=sites,
        records_per_site=records_per_site,
        max_grad_norm=max_grad_norm,
        noise_multiplier=noise_multiplier,
    )
