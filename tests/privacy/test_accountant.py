"""The accountant against Google's dp-accounting, and noise calibration that never overshoots."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from insitu.errors import UsageError
from insitu.privacy import PrivacyEvent, calibrate_noise, epsilon_of


@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [(1.0, 0.01, 1000), (0.8, 0.05, 200), (2.0, 0.004, 5000), (1.3, 1.0, 10)],
)
def test_epsilon_matches_dp_accounting_within_one_percent(sigma, q, steps):
    ours = epsilon_of([PrivacyEvent(sigma, q, steps)], delta=1e-5)
    accountant = rdp.RdpAccountant()
    event = dp_accounting.GaussianDpEvent(sigma)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    accountant.compose(event, steps)
    theirs = accountant.get_epsilon(1e-5)
    assert ours == pytest.approx(theirs, rel=0.01)


def test_events_compose_across_runs():
    one = PrivacyEvent(1.0, 0.02, 300)
    assert epsilon_of([one, one], delta=1e-5) == pytest.approx(
        epsilon_of([PrivacyEvent(1.0, 0.02, 600)], delta=1e-5), rel=1e-9
    )
    assert epsilon_of([], delta=1e-5) == 0.0


@settings(max_examples=25, deadline=None)
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
