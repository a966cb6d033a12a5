"""The PLD accountant against Google's dp-accounting, RDP as a cross-check, calibration.

The product composes with privacy loss distributions (PLD); the Rényi-DP bound it used
before stays here as an independent upper bound: PLD must never report *more* than RDP
(both are valid upper bounds, PLD the tighter one), and must agree with dp-accounting's
own PLD accountant.
"""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import rdp
from dp_accounting.pld import pld_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st

from insitu.errors import UsageError
from insitu.privacy import (
    PrivacyEvent,
    calibrate_noise,
    epsilon_of,
    rdp_epsilon_of,
    within_budget,
)

CASES = [(1.0, 0.01, 1000), (0.8, 0.05, 200), (2.0, 0.004, 5000), (1.3, 1.0, 10)]


def _dp_event(sigma: float, q: float) -> dp_accounting.DpEvent:
    event = dp_accounting.GaussianDpEvent(sigma)
    return dp_accounting.PoissonSampledDpEvent(q, event) if q < 1 else event


@pytest.mark.parametrize(("sigma", "q", "steps"), CASES)
def test_epsilon_matches_dp_accountings_pld_accountant(sigma, q, steps):
    ours = epsilon_of([PrivacyEvent(sigma, q, steps)], delta=1e-5)
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(_dp_event(sigma, q), steps)
    theirs = accountant.get_epsilon(1e-5)
    # Ours is discretized ten times more coarsely, pessimistically: never below theirs, and
    # above by at most 3% (the rounding error grows with the number of compositions).
    assert theirs <= ours <= theirs * 1.03 + 1e-3


@pytest.mark.parametrize(("sigma", "q", "steps"), CASES)
def test_the_rdp_cross_check_matches_dp_accounting_and_is_never_below_pld(sigma, q, steps):
    events = [PrivacyEvent(sigma, q, steps)]
    accountant = rdp.RdpAccountant()
    accountant.compose(_dp_event(sigma, q), steps)
    assert rdp_epsilon_of(events, delta=1e-5) == pytest.approx(
        accountant.get_epsilon(1e-5), rel=0.01
    )
    assert epsilon_of(events, delta=1e-5) <= rdp_epsilon_of(events, delta=1e-5)


def test_pld_is_tighter_than_rdp_in_the_regimes_insitu_trains_in():
    # 5 rounds of one local epoch at 5 Adult-sized sites, at epsilon 1 and 3 by RDP.
    for target in (1.0, 3.0):
        q, steps = 256 / 4800, 95
        sigma = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps)
        events = [PrivacyEvent(sigma, q, steps)]
        ratio = epsilon_of(events, delta=1e-5) / rdp_epsilon_of(events, delta=1e-5)
        assert ratio < 0.95


def test_events_compose_across_runs():
    one = PrivacyEvent(1.0, 0.02, 300)
    assert epsilon_of([one, one], delta=1e-5) == pytest.approx(
        epsilon_of([PrivacyEvent(1.0, 0.02, 600)], delta=1e-5), rel=1e-9
    )
    two = PrivacyEvent(2.0, 0.1, 50)
    assert epsilon_of([one, two], delta=1e-5) > epsilon_of([one], delta=1e-5)
    assert epsilon_of([], delta=1e-5) == 0.0


def test_a_round_is_within_budget_if_either_bound_says_so():
    events = [PrivacyEvent(1.0, 256 / 4800, 95)]
    pld, bound = epsilon_of(events, delta=1e-5), rdp_epsilon_of(events, delta=1e-5)
    assert pld < bound
    assert within_budget(events, delta=1e-5, budget=(pld + bound) / 2)
    assert not within_budget(events, delta=1e-5, budget=pld * 0.99)


@settings(max_examples=15, deadline=None)
@given(
    target=st.floats(min_value=0.3, max_value=10.0),
    q=st.floats(min_value=0.001, max_value=0.2),
    steps=st.integers(min_value=1, max_value=2000),
)
def test_calibrated_noise_never_overshoots_the_target(target, q, steps):
    sigma = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps)
    assert epsilon_of([PrivacyEvent(sigma, q, steps)], delta=1e-5) <= target
    # ... and is tight: a little less noise would overshoot (or sigma is at its floor).
    if sigma > 0.06:
        assert epsilon_of([PrivacyEvent(sigma - 0.002, q, steps)], delta=1e-5) > target * 0.97


def test_calibration_accounts_for_what_was_spent_before():
    prior = [PrivacyEvent(1.5, 0.02, 300)]
    fresh = calibrate_noise(target_epsilon=3, delta=1e-5, sample_rate=0.02, steps=500)
    after = calibrate_noise(target_epsilon=3, delta=1e-5, sample_rate=0.02, steps=500, prior=prior)
    assert after > fresh
    assert epsilon_of([*prior, PrivacyEvent(after, 0.02, 500)], delta=1e-5) <= 3
    with pytest.raises(UsageError, match="already spent"):
        calibrate_noise(target_epsilon=0.1, delta=1e-5, sample_rate=0.02, steps=5, prior=prior)
