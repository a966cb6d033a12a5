"""Privacy accounting for DP-SGD and DP-FedAvg: privacy loss distributions (PLD).

Every private step insitu takes is a Poisson-subsampled Gaussian mechanism described by
a :class:`PrivacyEvent` ``(noise_multiplier, sample_rate, steps)``, under add-or-remove
adjacency. Epsilon for a list of events is computed by Google's ``dp-accounting``
privacy-loss-distribution (PLD) accountant (Koskela et al. 2020; Doroshenko et al.
2022, "connect the dots"), with a *pessimistic* discretization of
:data:`PLD_INTERVAL`: the value returned is an upper bound on the true epsilon, never
an estimate that may fall below it. PLDs compose under adaptive composition, so a
subject's history across separate runs, fine-tunes and releases composes by
concatenating its events, exactly like RDP did.

PLD is tighter than the Rényi-DP bound used before (Opacus' analysis, kept here as
:func:`rdp_epsilon_of`): 10-20% lower epsilon for the same events in the regimes
insitu runs (``benchmarks/accounting_bench.py`` measures it), hence less noise for the
same target. RDP stays as a cross-check in the tests and as a fast upper bound: any
valid upper bound may admit a round, so :func:`within_budget` tries RDP first and pays
for a PLD only when RDP alone would refuse.

:func:`calibrate_noise` finds the smallest noise multiplier whose PLD epsilon does not
exceed a target; a hypothesis test checks it never overshoots.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from insitu.errors import UsageError

__all__ = [
    "ALPHAS",
    "PLD_INTERVAL",
    "PrivacyEvent",
    "calibrate_noise",
    "epsilon_of",
    "rdp_curve",
    "rdp_epsilon_of",
    "rdp_epsilon_of_curve",
    "rdp_epsilons",
    "rdp_noise_multiplier",
    "within_budget",
]

#: RDP orders: Opacus' defaults, extended upwards for small-epsilon, low-noise regimes.
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256, 512]

#: Discretization of privacy losses (pessimistic): epsilon is over-estimated by at most
#: about this much per composition, and never under-estimated.
PLD_INTERVAL = 1e-3


@dataclass(frozen=True, slots=True)
class PrivacyEvent:
    """``steps`` applications of a Gaussian mechanism on Poisson samples of rate ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and 0 < self.sample_rate <= 1 and self.steps >= 0):
            raise ValueError(f"invalid privacy event {self}")

    def to_json(self) -> dict[str, Any]:
        """The event as recorded in a ledger."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }


def _grouped(events: Iterable[PrivacyEvent]) -> tuple[tuple[float, float, int], ...]:
    """Events of one mechanism merged (steps add up), in a canonical order (cache key)."""
    steps: Counter[tuple[float, float]] = Counter()
    for event in events:
        if event.steps > 0:
            steps[(event.noise_multiplier, event.sample_rate)] += event.steps
    return tuple(sorted((sigma, rate, count) for (sigma, rate), count in steps.items()))


@functools.lru_cache(maxsize=512)
def _pld(noise_multiplier: float, sample_rate: float, steps: int) -> Any:
    from dp_accounting.pld import privacy_loss_distribution as pld

    one = pld.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        sensitivity=1.0,
        sampling_prob=sample_rate,
        value_discretization_interval=PLD_INTERVAL,
        pessimistic_estimate=True,
    )
    return one.self_compose(steps) if steps > 1 else one


@functools.lru_cache(maxsize=4096)
def _pld_epsilon(grouped: tuple[tuple[float, float, int], ...], delta: float) -> float:
    composed = None
    for sigma, rate, steps in grouped:
        part = _pld(sigma, rate, steps)
        composed = part if composed is None else composed.compose(part)
    if composed is None:
        return 0.0
    return max(0.0, float(composed.get_epsilon_for_delta(delta)))


def epsilon_of(events: Iterable[PrivacyEvent], *, delta: float) -> float:
    """Epsilon of all ``events`` composed, at ``delta`` (0 for no events); PLD, pessimistic.

    Events of the same mechanism are merged first (a site's history of identical rounds
    is one self-composition), and results are cached by the merged history.
    """
    return _pld_epsilon(_grouped(events), delta)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one step at every order in ALPHAS (Opacus' analysis)."""
    from opacus.accountants.analysis import rdp

    return tuple(
        rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=ALPHAS)
    )


def rdp_curve(event: PrivacyEvent) -> np.ndarray:
    """The RDP of ``event`` at every order in :data:`ALPHAS` (additive under composition)."""
    return event.steps * np.asarray(_rdp_per_step(event.noise_multiplier, event.sample_rate))


def rdp_epsilon_of_curve(curve: np.ndarray, *, delta: float) -> float:
    """Epsilon at ``delta`` of a composed RDP curve (0 for the zero curve)."""
    from opacus.accountants.analysis import rdp

    if not np.any(curve):
        return 0.0
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": still a valid upper bound.
        warnings.simplefilter("ignore", UserWarning)
        epsilon, _ = rdp.get_privacy_spent(orders=ALPHAS, rdp=curve, delta=delta)
    return float(epsilon)


def rdp_epsilons(curves: np.ndarray, *, delta: float) -> np.ndarray:
    """Epsilon at ``delta`` of each row of ``curves`` (one composed RDP curve per row).

    The same conversion as Opacus' ``get_privacy_spent`` (Balle et al. 2020, Theorem
    21), vectorized: a site with many distinct subject histories checks them at once.
    """
    orders = np.asarray(ALPHAS)
    eps = (
        np.atleast_2d(curves)
        - (np.log(delta) + np.log(orders)) / (orders - 1)
        + np.log((orders - 1) / orders)
    )
    result: np.ndarray = np.nanmin(eps, axis=1)
    result[~np.any(np.atleast_2d(curves), axis=1)] = 0.0
    return result


def rdp_epsilon_of(events: Iterable[PrivacyEvent], *, delta: float) -> float:
    """Epsilon of all ``events`` by the Rényi-DP bound (Opacus' analysis): looser than PLD.

    RDP composes by addition, and ``steps`` steps of one mechanism cost ``steps`` times
    one step, so the per-step RDP of each distinct (noise, sample rate) is cached.
    """
    from opacus.accountants.analysis import rdp

    total = np.zeros(len(ALPHAS))
    seen = False
    for sigma, rate, steps in _grouped(events):
        total += steps * np.asarray(_rdp_per_step(sigma, rate))
        seen = True
    if not seen:
        return 0.0
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": still a valid upper bound.
        warnings.simplefilter("ignore", UserWarning)
        epsilon, _ = rdp.get_privacy_spent(orders=ALPHAS, rdp=total, delta=delta)
    return float(epsilon)


def within_budget(events: Iterable[PrivacyEvent], *, delta: float, budget: float) -> bool:
    """Whether ``events`` composed stay within ``budget`` by *some* valid upper bound.

    RDP first (microseconds), PLD only when RDP alone would say no.
    """
    events = list(events)
    return (
        rdp_epsilon_of(events, delta=delta) <= budget or epsilon_of(events, delta=delta) <= budget
    )


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: Iterable[PrivacyEvent] = (),
) -> float:
    """Smallest noise multiplier (to 1e-3) keeping ``prior`` + these steps within the target.

    Raises:
        UsageError: the target is unreachable even with very large noise (the prior
            events alone exceed it), or arguments are out of range.

    """
    if not 0 < target_epsilon < math.inf or not 0 < delta < 1:
        raise UsageError("epsilon must be positive and delta in (0, 1)")
    prior = list(prior)
    spent = epsilon_of(prior, delta=delta)
    if spent >= target_epsilon:
        raise UsageError(
            f"epsilon {spent:.3f} is already spent, at or above the target {target_epsilon}"
        )

    def eps(sigma: float) -> float:
        return epsilon_of([*prior, PrivacyEvent(sigma, sample_rate, steps)], delta=delta)

    # RDP's bound is looser, so noise that meets the target by RDP meets it by PLD: a
    # cheap upper end of the bracket.
    low, high = (
        0.05,
        rdp_noise_multiplier(
            target_epsilon=target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            prior=prior,
        ),
    )
    if eps(high) > target_epsilon:  # pragma: no cover - PLD never exceeds RDP
        raise UsageError(f"no noise level reaches epsilon {target_epsilon}")
    low = max(low, high * 0.5)
    while eps(low) <= target_epsilon and low > 0.05:
        high, low = low, max(0.05, low * 0.5)
    # Invariant: eps(high) <= target < eps(low) (or low is the floor); bisect to 1e-3.
    while high - low > 1e-3:
        mid = (low + high) / 2
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


def rdp_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: Iterable[PrivacyEvent] = (),
) -> float:
    """A noise multiplier (to 1e-2) meeting the target by the RDP bound, hence by PLD too.

    Fast (microseconds per evaluation): for estimates, such as the smallest workable
    site size, where a slightly larger noise than needed errs on the safe side.

    Raises:
        UsageError: no noise level reaches the target.

    """
    target, prior = target_epsilon, list(prior)

    def eps(sigma: float) -> float:
        return rdp_epsilon_of([*prior, PrivacyEvent(sigma, sample_rate, steps)], delta=delta)

    low, high = 0.05, 1.0
    while eps(high) > target:
        low, high = high, high * 2
        if high > 1e4:
            raise UsageError(
                f"no noise level reaches epsilon {target} with {steps} steps at "
                f"sample rate {sample_rate:.4g}; train fewer steps or raise epsilon"
            )
    while high - low > 1e-2:
        mid = (low + high) / 2
        if eps(mid) > target:
            low = mid
        else:
            high = mid
    return high
