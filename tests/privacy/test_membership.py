"""Membership inference: the figures, the DP bound, and the refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from insitu.attacks import (
    auc,
    audit_membership,
    dp_tpr_bound,
    per_record_loss,
    required_non_members,
    roc_curve,
    tpr_at_fpr,
)
from insitu.attacks._roc import summarize
from insitu.errors import OverlappingSetsError, TooFewRecordsError, UsageError

from .conftest import MEMBERS, NON_MEMBERS, predict_of


def _ids(split):
    return [f"m{i}" for i in range(len(split.y_m))], [f"n{i}" for i in range(len(split.y_n))]


# -- the figures ---------------------------------------------------------------------


def test_auc_and_curve_agree_with_scikit_learn():
    from sklearn.metrics import roc_auc_score
    from sklearn.metrics import roc_curve as sk_roc_curve

    rng = np.random.default_rng(0)
    members = np.round(rng.normal(0.3, 1, 400), 1)  # rounded: ties must count half
    non_members = np.round(rng.normal(0, 1, 700), 1)
    labels = np.r_[np.ones(400), np.zeros(700)]
    scores = np.r_[members, non_members]
    assert auc(members, non_members) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr = roc_curve(members, non_members)
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    assert np.allclose(fpr, sk_fpr)
    assert np.allclose(tpr, sk_tpr)


def test_tpr_at_fpr_never_admits_more_false_positives_than_asked():
    rng = np.random.default_rng(1)
    members, non_members = rng.normal(1, 1, 500), rng.normal(0, 1, 1000)
    for fpr in (0.001, 0.01, 0.1):
        threshold_tpr = tpr_at_fpr(members, non_members, fpr)
        curve_fpr, curve_tpr = roc_curve(members, non_members)
        # The best point of the curve at or below the FPR asked for.
        assert threshold_tpr == pytest.approx(curve_tpr[curve_fpr <= fpr + 1e-12].max())
    assert tpr_at_fpr(np.array([1.0, 2.0]), np.array([0.0, 3.0]), 0.4) == 0.0


def test_per_record_loss_is_cross_entropy():
    logits = np.array([[2.0], [-1.0]])
    expected = [math.log1p(math.exp(-2.0)), math.log1p(math.exp(-1.0))]
    assert per_record_loss(logits, np.array([1, 0])) == pytest.approx(expected)
    multi = np.array([[1.0, 2.0, 3.0]])
    soft = np.exp(multi) / np.exp(multi).sum()
    assert per_record_loss(multi, np.array([0]))[0] == pytest.approx(-math.log(soft[0, 0]))


def test_the_bound_is_the_dp_hypothesis_testing_region():
    assert dp_tpr_bound(0.01, epsilon=1.0, delta=1e-5) == pytest.approx(math.e * 0.01 + 1e-5)
    # At epsilon 0, no test beats chance (beyond delta).
    assert dp_tpr_bound(0.3, epsilon=0.0, delta=0.0) == pytest.approx(0.3)
    # The upper part of the region: 1 - e^-eps (1 - delta - FPR), capped at 1.
    assert dp_tpr_bound(0.9, epsilon=1.0, delta=0.0) == pytest.approx(1 - math.exp(-1) * 0.1)
    assert float(dp_tpr_bound(0.5, epsilon=1.0, delta=0.9)) == 1.0


def test_a_point_above_the_bound_is_flagged_and_a_significant_one_is_a_violation():
    rng = np.random.default_rng(2)
    leaky = summarize(
        rng.normal(3, 1, 2000),
        rng.normal(0, 1, 2000),
        fprs=(0.01,),
        epsilon=0.5,
        delta=1e-5,
        bootstrap=300,
    )
    assert leaky.points[0].above_bound
    assert leaky.points[0].violation
    fair = summarize(
        rng.normal(0, 1, 2000),
        rng.normal(0, 1, 2000),
        fprs=(0.01,),
        epsilon=0.5,
        delta=1e-5,
        bootstrap=300,
    )
    assert not fair.points[0].violation


# -- the attacks against real models -------------------------------------------------


def test_an_overfit_model_leaks_membership(adult, overfit_model):
    member_ids, non_member_ids = _ids(adult)
    audit = audit_membership(
        predict_of(overfit_model),
        (adult.x_m, adult.y_m),
        (adult.x_n, adult.y_n),
        fprs=(0.01, 0.1),
        member_ids=member_ids,
        non_member_ids=non_member_ids,
    )
    (loss,) = audit.results
    assert loss.summary.auc > 0.55
    assert loss.summary.auc_low > 0.5, "the interval must exclude chance"
    assert audit.epsilon is None
    assert loss.summary.points[0].bound is None


def test_a_dp_model_at_epsilon_1_stays_under_the_bound_at_every_fpr(adult, dp_model):
    member_ids, non_member_ids = _ids(adult)
    audit = audit_membership(
        predict_of(dp_model),
        (adult.x_m, adult.y_m),
        (adult.x_n, adult.y_n),
        fprs=(0.01, 0.05, 0.1, 0.5),
        epsilon=1.0,
        delta=1e-5,
        member_ids=member_ids,
        non_member_ids=non_member_ids,
    )
    # The noise is secret, so each run draws another model: at 300 members a point
    # estimate may sit above the bound by chance; its 95% interval may not.
    for point in audit.results[0].summary.points:
        assert point.bound is not None
        assert point.tpr_low <= point.bound, point
    assert not audit.violation
    assert audit.results[0].summary.auc < 0.56


def test_lira_offline_runs_with_shadow_models_and_finds_the_overfit_members(adult, overfit_model):
    from insitu.attacks._target import ShadowRecipe, _make_trainer

    from .conftest import HIDDEN, LEARNING_RATE

    n_features = adult.x_m.shape[1]
    trainer = _make_trainer(
        [(0, n_features, HIDDEN), (2, HIDDEN, 1)],
        ShadowRecipe(epochs=60, batch_size=32, learning_rate=LEARNING_RATE),
    )
    member_ids, non_member_ids = _ids(adult)
    audit = audit_membership(
        predict_of(overfit_model),
        (adult.x_m, adult.y_m),
        (adult.x_n, adult.y_n),
        attacks=("loss", "lira-offline"),
        fprs=(0.01,),
        member_ids=member_ids,
        non_member_ids=non_member_ids,
        shadow_trainer=trainer,
        shadow_models=4,
    )
    loss, lira = audit.results
    assert lira.attack == "lira-offline"
    assert audit.shadow_models == 4
    assert lira.summary.auc_low > 0.5
    print(f"loss AUC {loss.summary.auc:.3f}, lira-offline AUC {lira.summary.auc:.3f}")


# -- refusals ------------------------------------------------------------------------


def test_overlapping_sets_are_refused(adult, overfit_model):
    member_ids, non_member_ids = _ids(adult)
    with pytest.raises(OverlappingSetsError, match="5 records are both members and non-members"):
        audit_membership(
            predict_of(overfit_model),
            (adult.x_m, adult.y_m),
            (np.r_[adult.x_n, adult.x_m[:5]], np.r_[adult.y_n, adult.y_m[:5]]),
            fprs=(0.01,),
            member_ids=member_ids,
            non_member_ids=non_member_ids + member_ids[:5],
        )
    # Without ids, records are matched by their encoded rows and labels: the carried
    # Adult data has distinct people with identical rows, and those count as overlap too.
    with pytest.raises(OverlappingSetsError, match="records are both members"):
        audit_membership(
            predict_of(overfit_model), (adult.x_m, adult.y_m), (adult.x_n, adult.y_n), fprs=(0.01,)
        )


def test_too_few_non_members_for_the_fpr_is_refused_with_the_number_needed(adult, overfit_model):
    assert required_non_members(0.001) == 10_000
    member_ids, non_member_ids = _ids(adult)
    with pytest.raises(TooFewRecordsError, match=r"1000 non-members; .* at least 10000"):
        audit_membership(
            predict_of(overfit_model),
            (adult.x_m, adult.y_m),
            (adult.x_n, adult.y_n),
            fprs=(0.01, 0.001),
            member_ids=member_ids,
            non_member_ids=non_member_ids,
        )
    with pytest.raises(TooFewRecordsError, match="at least 20 members"):
        audit_membership(
            predict_of(overfit_model),
            (adult.x_m[:5], adult.y_m[:5]),
            (adult.x_n, adult.y_n),
            fprs=(0.01,),
            member_ids=member_ids[:5],
            non_member_ids=non_member_ids,
        )


def test_lira_without_a_shadow_trainer_and_unknown_attacks_are_usage_errors(adult, overfit_model):
    args = (predict_of(overfit_model), (adult.x_m, adult.y_m), (adult.x_n, adult.y_n))
    ids = dict(zip(("member_ids", "non_member_ids"), _ids(adult), strict=True))
    with pytest.raises(UsageError, match="shadow models"):
        audit_membership(*args, attacks=("lira-offline",), fprs=(0.01,), **ids)
    with pytest.raises(UsageError, match="unknown attack"):
        audit_membership(*args, attacks=("gradient",), fprs=(0.01,), **ids)
    assert (len(adult.y_m), len(adult.y_n)) == (MEMBERS, NON_MEMBERS)
