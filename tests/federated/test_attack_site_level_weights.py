"""Attack: a large site's influence on a count-weighted mean outruns the site-level noise.

DP-FedAvg adds noise of standard deviation ``sigma * C / m`` to the mean of ``m`` clipped
updates: enough when each site moves the mean by at most ``C / m``. A mean weighted by
example counts lets the largest site move it by ``C * w_max / sum(w)``: the claimed
epsilon 1 was 2.16 for the largest site under ``dirichlet:0.5``. These tests *measure*
the aggregator (the influence of the largest site's update, and the noise it adds) and
recompute that site's true epsilon from the measurements.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters
from flwr.common import parameters_to_ndarrays as to_arrays
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

from insitu.errors import RoundFailedError
from insitu.federated._server_app import SiteLevelDP
from insitu.privacy import PrivacyEvent, calibrate_noise, epsilon_of

CLAIMED, DELTA, ROUNDS, CLIP, DIM = 1.0, 1e-5, 5, 1.0, 4000
#: Example counts of three sites of a Dirichlet (alpha 0.5) split of Adult.
SIZES = [5210, 812, 301]


def _result(update: np.ndarray, weight: int) -> tuple[None, FitRes]:
    return None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([update]), weight, {})


def _aggregate(strategy, updates, weights) -> np.ndarray:
    results = [_result(u, w) for u, w in zip(updates, weights, strict=True)]
    aggregated, _ = strategy.aggregate_fit(1, results, [])
    assert isinstance(aggregated, Parameters)
    return to_arrays(aggregated)[0]


class _NoNoise:
    def normal(self, shape, *, std):
        return np.zeros(shape)


def _true_epsilon(make, weights) -> float:
    """Influence of the largest site (noise off) and the noise (on): that site's epsilon."""
    rng = np.random.default_rng(0)
    updates = [rng.standard_normal(DIM) * 0.001 for _ in weights]
    moved = [updates[0] + CLIP * np.eye(1, DIM, 7)[0], *updates[1:]]  # largest site: norm C
    quiet = make(noise=False)
    influence = float(
        np.linalg.norm(_aggregate(quiet, moved, weights) - _aggregate(quiet, updates, weights))
    )
    noisy = make(noise=True)
    noise = _aggregate(noisy, updates, weights) - _aggregate(quiet, updates, weights)
    sigma_effective = float(np.std(noise)) / influence
    return epsilon_of([PrivacyEvent(sigma_effective, 1.0, ROUNDS)], delta=DELTA)


def test_the_largest_sites_true_epsilon_is_within_the_claim():
    sigma = calibrate_noise(target_epsilon=CLAIMED, delta=DELTA, sample_rate=1.0, steps=ROUNDS)

    def make(*, noise: bool) -> SiteLevelDP:
        strategy = SiteLevelDP(FedAvg(), noise_multiplier=sigma, clipping_norm=CLIP)
        if not noise:
            strategy._random = _NoNoise()  # type: ignore[assignment]
        return strategy

    # Sites send weight 1 under site-level privacy, whatever their size.
    assert _true_epsilon(make, [1, 1, 1]) <= CLAIMED * 1.05  # 4,000 draws: ~2% error


def test_a_site_sending_its_example_count_as_weight_is_refused():
    sigma = calibrate_noise(target_epsilon=CLAIMED, delta=DELTA, sample_rate=1.0, steps=ROUNDS)
    strategy = SiteLevelDP(FedAvg(), noise_multiplier=sigma, clipping_norm=CLIP)
    with pytest.raises(RoundFailedError, match="weight other than 1"):
        _aggregate(strategy, [np.zeros(DIM)] * 3, SIZES)


def test_noise_is_scaled_to_the_sites_actually_averaged():
    sigma = calibrate_noise(target_epsilon=CLAIMED, delta=DELTA, sample_rate=1.0, steps=ROUNDS)

    def make(*, noise: bool) -> SiteLevelDP:
        strategy = SiteLevelDP(FedAvg(), noise_multiplier=sigma, clipping_norm=CLIP)
        if not noise:
            strategy._random = _NoNoise()  # type: ignore[assignment]
        return strategy

    # Three sites planned, two returned: each moves the mean by C / 2, and the noise follows.
    assert _true_epsilon(make, [1, 1]) <= CLAIMED * 1.05


def test_control_flowers_wrapper_over_a_count_weighted_mean_understates_epsilon():
    sigma = calibrate_noise(target_epsilon=CLAIMED, delta=DELTA, sample_rate=1.0, steps=ROUNDS)

    def make(*, noise: bool) -> DifferentialPrivacyClientSideFixedClipping:
        return DifferentialPrivacyClientSideFixedClipping(
            FedAvg(),
            noise_multiplier=sigma if noise else 1e-12,
            clipping_norm=CLIP,
            num_sampled_clients=3,
        )

    assert _true_epsilon(make, SIZES) > 1.5 * CLAIMED
