"""Privacy accounting for DP-SGD and DP-FedAvg: Rényi DP over subsampled Gaussians.

Every private step insitu takes is a Poisson-subsampled Gaussian mechanism described by
a :class:`PrivacyEvent` ``(noise_multiplier, sample_rate, steps)``. Epsilon for a list of
events is computed by Opacus' RDP accountant (the same analysis as Google's
``dp-accounting`` and Flower's ``RdpAccountant``; a test checks the three agree to 1%).
RDP is used rather than PRV because its guarantee composes across *separate* runs by
simply concatenating events, which is what a site's budget needs (``_budget``); it is
slightly pessimistic (PRV reports about 10% lower epsilon for the same events).

:func:`calibrate_noise` finds the smallest noise multiplier whose epsilon does not
exceed a target; a hypothesis test checks it never overshoots.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from insitu.errors import UsageError

__all__ = ["ALPHAS", "PrivacyEvent", "calibrate_noise", "epsilon_of"]

#: RDP orders: Opacus' defaults, extended upwards for small-epsilon, low-noise regimes.
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256, 512]


@dataclass(frozen=True, slots=True)
class PrivacyEvent:
    """``steps`` applications of a Gaussian mechanism on Poisson samples of rate ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and 0 < self.sample_rate <= 1 and self.steps >= 0):
            raise ValueError(f"invalid privacy event {self}")


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one step at every order in ALPHAS (Opacus' analysis)."""
    from opacus.accountants.analysis import rdp

    return tuple(
        rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=ALPHAS)
    )


def epsilon_of(events: Iterable[PrivacyEvent], *, delta: float) -> float:
    """Epsilon of all ``events`` composed, at ``delta`` (0 for no events).

    RDP composes by addition, and ``steps`` steps of one mechanism cost ``steps`` times
    one step (Opacus' ``compute_rdp`` is exactly that product), so the per-step RDP of
    each distinct (noise, sample rate) is computed once and cached: a site's history of
    identical rounds costs one computation, not one per round.
    """
    from opacus.accountants.analysis import rdp

    total = np.zeros(len(ALPHAS))
    seen = False
    for event in events:
        if event.steps > 0:
            total += event.steps * np.asarray(
                _rdp_per_step(event.noise_multiplier, event.sample_rate)
            )
            seen = True
    if not seen:
        return 0.0
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the bound could be tighter with more
        # orders; the epsilon returned is still a valid upper bound. ALPHAS reaches far
        # enough that this is rare.
        warnings.simplefilter("ignore", UserWarning)
        epsilon, _ = rdp.get_privacy_spent(orders=ALPHAS, rdp=total, delta=delta)
    return float(epsilon)


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

    low, high = 0.05, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise UsageError(
                f"no noise level reaches epsilon {target_epsilon} with {steps} steps at "
                f"sample rate {sample_rate:.4g}; train fewer steps or raise epsilon"
            )
    # Invariant: eps(high) <= target; bisect down to a 1e-3 interval.
    while high - low > 1e-3:
        mid = (low + high) / 2
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
