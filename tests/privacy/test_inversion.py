"""Gradient inversion: a raw one-record update gives the record away; the DP aggregate does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from insitu.attacks import (
    ChanceBand,
    dp_secagg_aggregate,
    infer_label,
    inversion_demo,
    invert_gradient,
    raw_update,
)
from insitu.training import build_model


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


@pytest.fixture(scope="module")
def demo(digits):
    features, labels = digits
    torch.manual_seed(0)
    model = build_model("mlp", 64, hidden=32, n_classes=10)
    return inversion_demo(
        model, features, labels, sites=5, records_per_site=16, noise_multiplier=1.0, seed=0
    )


def test_a_single_raw_update_gives_the_record_away(demo):
    raw = demo.results[0]
    assert raw.records_in_update == 1
    assert raw.cosine > 0.9
    assert raw.mse < 1e-3
    assert raw.label_correct


def test_the_clipped_and_noised_secagg_sum_does_not(demo):
    # The noise is secret and fresh, so this attack is one draw: it is read against the
    # upper 99.9% of random guesses (a guess crosses each line once in a thousand runs),
    # not against their mean, which one draw in twenty crossed by 0.1.
    protected = demo.results[-1]
    assert protected.records_in_update == 80
    assert protected.cosine < protected.chance_target_high < 0.45
    # Nor does it come closer to any other record of the round than a random guess does.
    assert protected.best_cosine < protected.chance_best_high < 0.55


def test_the_chance_band_is_the_spread_of_random_guesses(digits):
    features, _ = digits
    records, mean = features[:80], features.mean(axis=0)
    band = ChanceBand.of(records, mean=mean, seed=0)
    guesses = ChanceBand.of(records, mean=mean, draws=2_000, quantile=0.5, seed=1)
    assert band.best_mean == pytest.approx(guesses.best_mean, abs=0.01)
    assert guesses.best_high < band.best_high  # the median under the 99.9% line
    assert 0.0 < band.target_high < band.best_high


def test_the_report_holds_figures_only(demo):
    doc = demo.to_json()
    assert [r["setting"] for r in doc["results"]] == [
        "raw update, one record",
        "SecAgg+ sum, no DP",
        "SecAgg+ sum of clipped, noised updates",
    ]
    for result in doc["results"]:
        assert set(result) == {
            "setting",
            "cosine",
            "mse",
            "best_cosine",
            "chance_cosine",
            "chance_best_high",
            "chance_target_high",
            "label_correct",
            "records_in_update",
            "seconds",
        }


def test_idlg_reads_the_label_of_a_binary_model_from_the_bias_gradient(adult):
    torch.manual_seed(1)
    model = build_model("mlp", adult.x_m.shape[1], hidden=16)
    for index in range(6):
        gradient = raw_update(model, adult.x_m[index : index + 1], adult.y_m[index : index + 1])
        assert infer_label(model, gradient) == adult.y_m[index]


def test_a_tabular_record_is_reconstructed_from_its_raw_update(adult):
    torch.manual_seed(2)
    model = build_model("mlp", adult.x_m.shape[1], hidden=16)
    record, label = adult.x_m[3:4], adult.y_m[3:4]
    reconstruction, inferred, _ = invert_gradient(
        model, raw_update(model, record, label), n_features=record.shape[1], seed=0
    )
    mean = adult.x_n.mean(axis=0)
    a, b = reconstruction - mean, record[0] - mean
    assert inferred == label[0]
    assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) > 0.9


def test_clipping_bounds_each_records_contribution(digits):
    features, labels = digits
    torch.manual_seed(0)
    model = build_model("mlp", 64, hidden=32, n_classes=10)
    site = (features[:8], labels[:8])
    total = dp_secagg_aggregate(model, [site], max_grad_norm=0.1, noise_multiplier=0.0)
    norm = float(torch.sqrt(sum((t**2).sum() for t in total)))
    assert norm <= 8 * 0.1 + 1e-6
