"""A white-box privacy audit in one training run, with canaries (Steinke et al. 2023).

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS
2023): insert m *canaries*, each independently included with probability 1/2, train
once, and let an attacker guess, from the output, whether each canary was in. An
(epsilon, delta)-DP mechanism cannot let any attacker be right much more often than
``e^eps / (1 + e^eps)`` of the time on the canaries it chooses to guess (their theorem
for approximate DP, which also charges ``delta``); many correct guesses falsify the
epsilon at a stated significance, and :func:`epsilon_lower_bound` is the largest
epsilon falsified.

The audited mechanism here is insitu's own DP-SGD (:func:`insitu.training.train`)
on a bias-free linear model with one logit, zero initial weights and ``d + m`` inputs:
real records use the first ``d`` (the other ``m`` are zero), and canary ``i`` is the
record ``canary_scale * e_{d+i}`` with label 1. An "out" canary is not removed but
replaced by an all-zero record with label 0: in a bias-free linear model a zero record
has a zero gradient, so it is exactly absent from every update, while the number of rows
(hence the expected batch size that normalizes each step, and the length of the Poisson
sampling stream) is the same whichever canaries are in. Canary ``i`` alone moves weight
``d + i``; its clipped gradient is ``max_grad_norm`` in that coordinate each time it is
sampled (``canary_scale / 2`` must exceed the clipping norm: the default 10 is five
times the usual norm of 1).

The attacker is white-box and knows everything a participant knows: the published
configuration and seed, and every record except the canaries' membership. It sees the
final weights, replays the *same mechanism with the same published seed* on the same
records with every canary out, and scores canary ``i`` by ``observed[d+i] -
replay[d+i]``. If the mechanism's noise and sampling follow from the seed (the bug this
audit exists to catch: ``torch.manual_seed(cfg.seed)``), the replay reproduces them
exactly, the noise cancels, and the score is the canary's clipped gradients alone: every
sampled "in" canary is found. With secret randomness the replay's noise is independent
and the score is signal plus twice the noise. The attacker guesses "in" for the ``k+``
highest scores and "out" for the ``k-`` lowest, over a fixed grid of (``k+``, ``k-``);
the best bound is kept, each tested at ``significance / len(grid)`` (Bonferroni), so
the reported bound keeps its significance.

What it detects: implementation bugs that break the privacy analysis of a single run,
such as predictable noise or sampling, unclipped gradients, or noise smaller than the
accountant assumed. What it cannot show: the bound is a *lower* bound from one attack
and one run; one-run audits are known to be loose (far below the true epsilon even for
a tight mechanism), so a mechanism that is not flagged is not thereby proven private.
It says nothing about the federated layer (aggregation, SecAgg+) or about the
accountant's composition across runs.

Why hand-written: the statistics are the paper's one theorem (a few lines of SciPy),
and the canary construction is specific to insitu's training function; no maintained
library audits an arbitrary DP-SGD implementation this way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from insitu.audit import events
from insitu.errors import AuditError, UsageError
from insitu.privacy import SecureRandom

if TYPE_CHECKING:
    from insitu.audit import Entry, Ledger

__all__ = [
    "GUESS_FRACTIONS",
    "MIN_CANARIES",
    "InsituMechanism",
    "Mechanism",
    "OneRunAudit",
    "epsilon_lower_bound",
    "insitu_mechanism",
    "one_run_audit",
    "one_run_p_value",
    "record_one_run_audit",
]

#: ``(features, labels, seed) -> final weights`` of the bias-free linear model trained on
#: them (``features.shape[1]`` weights), with whatever randomness the mechanism uses.
Mechanism = Callable[[np.ndarray, np.ndarray, int], np.ndarray]

#: Fractions of the canaries guessed "in" (highest scores) and, separately, "out"
#: (lowest scores); every pair is tried, so the significance is split over 25 tests.
GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.4)

#: Below this many canaries the smallest guess fraction is under one canary.
MIN_CANARIES = 20

#: Epsilon beyond which the search for a lower bound stops (e^64: certainty in practice).
_EPSILON_CEILING = 64.0


def one_run_p_value(
    *, canaries: int, guesses: int, correct: int, epsilon: float, delta: float
) -> float:
    """Probability of ``correct`` or more right guesses out of ``guesses`` under (eps, delta)-DP.

    The (eps, delta) theorem of Steinke, Nasr and Jagielski (2023), with m canaries, r
    guesses and v right: with ``q = e^eps / (1 + e^eps)``, ``beta = P[Binomial(r, q) >=
    v]`` and ``alpha = max_{i=1..v} (P[Binomial(r, q) >= v - i] - beta) / i``, the
    chance is at most ``min(1, beta + 2 m delta alpha)``.
    """
    from scipy.stats import binom

    _check_counts(canaries=canaries, guesses=guesses, correct=correct, delta=delta)
    if epsilon < 0 or math.isnan(epsilon):
        raise UsageError(f"epsilon {epsilon} must be non-negative")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(binom.sf(correct - 1, guesses, q))
    alpha = 0.0
    if correct > 0 and delta > 0:
        shifts = np.arange(1, correct + 1)
        tails = binom.sf(correct - 1 - shifts, guesses, q)
        alpha = float(np.max((tails - beta) / shifts))
    return min(1.0, beta + 2.0 * canaries * delta * alpha)


def epsilon_lower_bound(
    *, canaries: int, guesses: int, correct: int, delta: float, significance: float = 0.05
) -> float:
    """The largest epsilon that ``correct`` of ``guesses`` falsifies at ``significance``.

    Every epsilon below the value returned has a p-value (:func:`one_run_p_value`) under
    ``significance``: with probability at least ``1 - significance`` an (eps, delta)-DP
    mechanism does not produce a result that falsifies eps. 0 when nothing is falsified
    (at or near chance). Steinke, Nasr and Jagielski, "Privacy Auditing with One (1)
    Training Run", NeurIPS 2023 (the approximate-DP theorem). The p-value increases with
    epsilon, so the crossing is found by bracketing and Brent's method.
    """
    from scipy.optimize import brentq

    _check_counts(canaries=canaries, guesses=guesses, correct=correct, delta=delta)
    if not 0 < significance < 1:
        raise UsageError(f"significance {significance} is not in (0, 1); e.g. 0.05")

    def excess(epsilon: float) -> float:
        return (
            one_run_p_value(
                canaries=canaries, guesses=guesses, correct=correct, epsilon=epsilon, delta=delta
            )
            - significance
        )

    if excess(0.0) >= 0:
        return 0.0
    low, high = 0.0, 1.0
    while excess(high) < 0:
        if high >= _EPSILON_CEILING:
            return _EPSILON_CEILING
        low, high = high, min(2 * high, _EPSILON_CEILING)
    return float(brentq(excess, low, high, xtol=1e-6))


def _check_counts(*, canaries: int, guesses: int, correct: int, delta: float) -> None:
    if not 0 <= correct <= guesses <= canaries:
        raise UsageError(
            f"counts must satisfy 0 <= correct ({correct}) <= guesses ({guesses}) <= "
            f"canaries ({canaries})"
        )
    if not 0 <= delta < 1:
        raise UsageError(f"delta {delta} is not in [0, 1)")


@dataclass(frozen=True)
class InsituMechanism:
    """insitu's DP-SGD on the audit's bias-free linear model, as a :data:`Mechanism`.

    ``randomness_for_seed`` exists only for tests that plug in a deliberately broken
    generator derived from the seed; unset, every call draws from a fresh
    :class:`~insitu.privacy.SecureRandom` and ignores the seed, exactly as production does.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float = 1.0
    learning_rate: float = 0.5
    randomness_for_seed: Callable[[int], SecureRandom] | None = field(default=None, repr=False)

    def __call__(self, features: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
        """Train from zero weights; the final weights (float64, one per feature)."""
        import torch

        from insitu.privacy import PrivacyEvent
        from insitu.training import train

        model = torch.nn.Linear(features.shape[1], 1, bias=False)
        with torch.no_grad():
            model.weight.zero_()
        randomness = None if self.randomness_for_seed is None else self.randomness_for_seed(seed)
        train(
            model,
            np.ascontiguousarray(features, dtype=np.float32),
            np.asarray(labels, dtype=np.int64),
            epochs=1,
            batch_size=1,
            learning_rate=self.learning_rate,
            event=PrivacyEvent(self.noise_multiplier, self.sample_rate, self.steps),
            max_grad_norm=self.max_grad_norm,
            seed=seed,
            randomness=randomness,
        )
        weights: np.ndarray = model.weight.detach().numpy().reshape(-1).astype(np.float64)
        return weights

    def to_json(self) -> dict[str, Any]:
        """The settings audited (what the ledger receives)."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "max_grad_norm": self.max_grad_norm,
            "learning_rate": self.learning_rate,
            "randomness": "secret" if self.randomness_for_seed is None else "replaced",
        }


def insitu_mechanism(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    max_grad_norm: float = 1.0,
    learning_rate: float = 0.5,
    randomness_for_seed: Callable[[int], SecureRandom] | None = None,
) -> InsituMechanism:
    """The audit mechanism of insitu's own DP-SGD: ``steps`` steps at ``sample_rate``."""
    if not (noise_multiplier > 0 and 0 < sample_rate <= 1 and steps >= 1 and max_grad_norm > 0):
        raise UsageError(
            "the audited mechanism needs noise_multiplier > 0, sample_rate in (0, 1], "
            "steps >= 1 and max_grad_norm > 0"
        )
    return InsituMechanism(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        max_grad_norm=max_grad_norm,
        learning_rate=learning_rate,
        randomness_for_seed=randomness_for_seed,
    )


@dataclass(frozen=True)
class OneRunAudit:
    """The one-run audit's counts, its lower bound, and the epsilon it was checked against."""

    claimed_epsilon: float
    delta: float
    canaries: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    significance: float
    seconds: float
    included: int
    guessed_in: int
    guessed_out: int
    records: int
    mechanism: dict[str, Any] | None = None

    @property
    def flagged(self) -> bool:
        """The lower bound exceeds the claimed epsilon: the claim is falsified."""
        return self.epsilon_lower_bound > self.claimed_epsilon

    def to_json(self) -> dict[str, Any]:
        """Figures only: counts, bounds and settings; never scores or canary memberships."""
        return {
            "claimed_epsilon": self.claimed_epsilon,
            "delta": self.delta,
            "canaries": self.canaries,
            "included": self.included,
            "guesses": self.guesses,
            "guessed_in": self.guessed_in,
            "guessed_out": self.guessed_out,
            "correct": self.correct,
            "epsilon_lower_bound": round(self.epsilon_lower_bound, 6),
            "significance": self.significance,
            "flagged": self.flagged,
            "records": self.records,
            "mechanism": self.mechanism,
            "seconds": round(self.seconds, 3),
        }


def _with_canaries(
    features: np.ndarray, labels: np.ndarray, included: np.ndarray, *, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Real records padded with zero columns, then one row per canary (zero when out)."""
    n, d = features.shape
    m = len(included)
    x = np.zeros((n + m, d + m), dtype=np.float32)
    x[:n, :d] = features
    chosen = np.flatnonzero(included)
    x[n + chosen, d + chosen] = scale
    y = np.concatenate([labels.astype(np.int64), included.astype(np.int64)])
    return x, y


def _guess_grid(canaries: int) -> list[tuple[int, int]]:
    sizes = sorted({max(1, round(f * canaries)) for f in GUESS_FRACTIONS})
    return [(k_in, k_out) for k_in in sizes for k_out in sizes if k_in + k_out <= canaries]


def one_run_audit(
    mechanism: Mechanism,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    claimed_epsilon: float,
    delta: float,
    canaries: int = 1000,
    published_seed: int = 0,
    canary_scale: float = 10.0,
    significance: float = 0.05,
) -> OneRunAudit:
    """Audit ``mechanism`` with ``canaries`` canaries in one run (see the module docstring).

    Args:
        mechanism: trains the bias-free linear model; see :data:`Mechanism`.
        features: the real records (rows x d, values a participant holds).
        labels: their binary labels (0 or 1).
        claimed_epsilon: the epsilon on paper for one canary (one record).
        delta: the delta on paper.
        canaries: m, the number of canaries (each in with probability 1/2, secretly).
        published_seed: the seed in the published configuration; both the training and
            the attacker's replay are given it.
        canary_scale: a canary's one non-zero value (its gradient norm at zero weights is
            half of it; it must exceed the clipping norm).
        significance: the chance that a mechanism that is (claimed, delta)-DP is flagged
            anyway (at most; Bonferroni over the guess grid).

    Raises:
        UsageError: arguments out of range, non-binary labels, too few canaries.
        AuditError: the mechanism returned weights of the wrong shape.

    """
    started = time.perf_counter()
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise UsageError("features must be a rows x columns array with one label per row")
    if not np.isin(labels, (0, 1)).all():
        raise UsageError("the one-run audit trains one logit: labels must be 0 or 1")
    if canaries < MIN_CANARIES:
        raise UsageError(f"{canaries} canaries; the audit needs at least {MIN_CANARIES}")
    if claimed_epsilon < 0 or not 0 <= delta < 1 or not 0 < significance < 1:
        raise UsageError("need claimed epsilon >= 0, delta in [0, 1), significance in (0, 1)")
    if not canary_scale > 0:
        raise UsageError(f"canary scale {canary_scale} must be positive")
    included = SecureRandom().bernoulli(canaries, probability=0.5)
    x_in, y_in = _with_canaries(features, labels, included, scale=canary_scale)
    x_out, y_out = _with_canaries(
        features, labels, np.zeros(canaries, dtype=bool), scale=canary_scale
    )
    observed = np.asarray(mechanism(x_in, y_in, published_seed), dtype=np.float64).reshape(-1)
    replay = np.asarray(mechanism(x_out, y_out, published_seed), dtype=np.float64).reshape(-1)
    width = features.shape[1] + canaries
    if observed.shape != (width,) or replay.shape != (width,):
        raise AuditError(
            f"the mechanism returned {observed.size} and {replay.size} weights; a bias-free "
            f"linear model over {width} inputs has {width}"
        )
    d = features.shape[1]
    scores = observed[d:] - replay[d:]
    order = np.argsort(-scores, kind="stable")  # highest score (most likely in) first
    grid = _guess_grid(canaries)
    best: tuple[float, float, int, int, int] | None = None
    for k_in, k_out in grid:
        right = int(included[order[:k_in]].sum() + (~included[order[canaries - k_out :]]).sum())
        bound = epsilon_lower_bound(
            canaries=canaries,
            guesses=k_in + k_out,
            correct=right,
            delta=delta,
            significance=significance / len(grid),
        )
        candidate = (bound, right / (k_in + k_out), right, k_in, k_out)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    assert best is not None  # the grid is never empty: MIN_CANARIES canaries or more
    bound, _, right, k_in, k_out = best
    return OneRunAudit(
        claimed_epsilon=claimed_epsilon,
        delta=delta,
        canaries=canaries,
        guesses=k_in + k_out,
        correct=right,
        epsilon_lower_bound=bound,
        significance=significance,
        seconds=time.perf_counter() - started,
        included=int(included.sum()),
        guessed_in=k_in,
        guessed_out=k_out,
        records=len(labels),
        mechanism=mechanism.to_json() if isinstance(mechanism, InsituMechanism) else None,
    )


def record_one_run_audit(
    ledger: Ledger, audit: OneRunAudit, *, run: str | None, data: str | None = None
) -> Entry:
    """Record ``audit`` in ``ledger`` as ``privacy.one_run_audit`` (figures only)."""
    payload = audit.to_json() | {"run": run}
    if data is not None:
        payload["data"] = data
    return events.PRIVACY_ONE_RUN_AUDIT.record(ledger, **payload)
