"""The white-box one-run audit (Steinke, Nasr and Jagielski 2023) of insitu's DP-SGD.

The audit must catch the predictable-noise bug (noise and sampling replayed from the
published seed, :class:`SeededRandom`) at a claimed epsilon of 1, and must not flag
insitu's real mechanism (secret randomness) at 1 or 8. The real records are scikit-
learn's breast-cancer table scaled to [0, 1] (569 rows, 30 features): small and fast.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import binom

from insitu.attacks import (
    OneRunAudit,
    epsilon_lower_bound,
    insitu_mechanism,
    one_run_audit,
    one_run_p_value,
)
from insitu.cli import run
from insitu.errors import AuditError, UsageError
from insitu.privacy import calibrate_noise
from insitu.workspace import Workspace

from .conftest import SeededRandom

DELTA = 1e-5
SAMPLE_RATE = 0.1
STEPS = 100
CANARIES = 1000


@pytest.fixture(scope="module")
def breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    table = load_breast_cancer()
    low, high = table.data.min(axis=0), table.data.max(axis=0)
    return ((table.data - low) / (high - low)).astype(np.float32), table.target.astype(np.int64)


def audit_at(
    records: tuple[np.ndarray, np.ndarray], epsilon: float, *, broken: bool
) -> OneRunAudit:
    noise = calibrate_noise(
        target_epsilon=epsilon, delta=DELTA, sample_rate=SAMPLE_RATE, steps=STEPS
    )
    mechanism = insitu_mechanism(
        noise_multiplier=noise,
        sample_rate=SAMPLE_RATE,
        steps=STEPS,
        randomness_for_seed=SeededRandom if broken else None,
    )
    return one_run_audit(
        mechanism,
        *records,
        claimed_epsilon=epsilon,
        delta=DELTA,
        canaries=CANARIES,
        published_seed=1234,
    )


def test_the_one_run_audit_flags_noise_replayed_from_the_published_seed(breast_cancer):
    audit = audit_at(breast_cancer, 1.0, broken=True)
    assert audit.flagged
    assert audit.epsilon_lower_bound > 1.0
    # The replay cancels the noise: every guess is right (a canary never sampled in 100
    # steps at rate 0.1 would score 0 beside the "out" ones; that happens once in 37,000).
    assert audit.correct == audit.guesses
    assert audit.guesses >= 0.5 * CANARIES
    assert 0.4 * CANARIES < audit.included < 0.6 * CANARIES
    figures = audit.to_json()
    assert figures["flagged"] is True
    assert figures["mechanism"]["randomness"] == "replaced"
    json.dumps(figures)


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_the_one_run_audit_does_not_flag_secret_noise_at_epsilon_1_and_8(breast_cancer, epsilon):
    audit = audit_at(breast_cancer, epsilon, broken=False)
    assert not audit.flagged
    assert 0.0 <= audit.epsilon_lower_bound <= epsilon
    assert audit.correct < audit.guesses  # the noise is not replayed: some guesses miss
    assert audit.to_json()["mechanism"]["randomness"] == "secret"


def test_replayed_noise_gives_the_canaries_away_where_secret_noise_hides_them(breast_cancer):
    # Calibrated to 1 and not replayable, the canaries barely show; the same mechanism
    # with replayable noise gives them all away. A test that the scores carry the signal.
    secret = audit_at(breast_cancer, 1.0, broken=False)
    broken = audit_at(breast_cancer, 1.0, broken=True)
    assert broken.epsilon_lower_bound > secret.epsilon_lower_bound + 2


def test_the_lower_bound_grows_with_correct_guesses():
    bounds = [
        epsilon_lower_bound(canaries=1000, guesses=200, correct=v, delta=DELTA)
        for v in range(100, 201, 10)
    ]
    assert all(b <= a for a, b in zip(bounds[1:], bounds, strict=False))
    assert bounds[0] == 0.0
    assert bounds[-1] > bounds[5] > 0.0


def test_the_lower_bound_is_0_when_guesses_are_at_chance():
    assert epsilon_lower_bound(canaries=1000, guesses=500, correct=250, delta=DELTA) == 0.0
    assert epsilon_lower_bound(canaries=1000, guesses=500, correct=260, delta=0.0) == 0.0
    assert epsilon_lower_bound(canaries=100, guesses=0, correct=0, delta=DELTA) == 0.0


def test_with_delta_0_the_p_value_is_the_binomial_tail():
    m, r, v = 1000, 300, 230
    eps = epsilon_lower_bound(canaries=m, guesses=r, correct=v, delta=0.0, significance=0.05)
    q = np.exp(eps) / (1 + np.exp(eps))
    assert binom.sf(v - 1, r, q) == pytest.approx(0.05, rel=1e-4)
    for epsilon in (0.5, 1.0, 2.0):
        q = np.exp(epsilon) / (1 + np.exp(epsilon))
        p = one_run_p_value(canaries=m, guesses=r, correct=v, epsilon=epsilon, delta=0.0)
        assert p == pytest.approx(binom.sf(v - 1, r, q), rel=1e-9)


def test_delta_only_weakens_the_bound():
    at = {
        delta: epsilon_lower_bound(canaries=1000, guesses=300, correct=250, delta=delta)
        for delta in (0.0, 1e-6, 1e-5, 1e-4)
    }
    assert at[0.0] >= at[1e-6] >= at[1e-5] >= at[1e-4] > 0


def test_perfect_guessing_of_100_canaries_proves_about_3_5():
    bound = epsilon_lower_bound(canaries=100, guesses=100, correct=100, delta=0.0)
    assert bound == pytest.approx(3.49, abs=0.01)  # 0.05 = q^100, eps = log(q / (1 - q))


def test_counts_out_of_range_are_refused():
    with pytest.raises(UsageError, match="correct"):
        epsilon_lower_bound(canaries=10, guesses=20, correct=5, delta=DELTA)
    with pytest.raises(UsageError, match="significance"):
        epsilon_lower_bound(canaries=10, guesses=10, correct=5, delta=DELTA, significance=1.0)


def test_a_mechanism_that_does_not_return_the_linear_weights_is_refused(breast_cancer):
    def wrong(features, labels, seed):
        return np.zeros(features.shape[1] - 1)

    with pytest.raises(AuditError, match="weights"):
        one_run_audit(wrong, *breast_cancer, claimed_epsilon=1.0, delta=DELTA, canaries=50)
    with pytest.raises(UsageError, match="canaries"):
        one_run_audit(wrong, *breast_cancer, claimed_epsilon=1.0, delta=DELTA, canaries=5)


def test_the_one_run_command_reports_and_records_the_audit(tmp_path, capsys):
    home = tmp_path / "ws"
    assert run(["init", "--home", str(home)]) == 0
    capsys.readouterr()
    code = run(
        [
            "privacy",
            "one-run",
            "--epsilon",
            "8",
            "--data",
            "breast-cancer",
            "--canaries",
            "200",
            "--steps",
            "40",
            "--home",
            str(home),
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["canaries"] == 200
    assert report["flagged"] is False
    assert report["epsilon_lower_bound"] <= 8
    assert report["mechanism"]["steps"] == 40
    with Workspace.open(home).ledger() as ledger:
        entries = ledger.entries(event_type="privacy.one_run_audit")
    assert len(entries) == 1
    payload = entries[0].payload
    assert payload["data"] == "breast-cancer"
    assert payload["run"] is None
    assert payload["correct"] == report["correct"]


def test_the_one_run_command_exits_1_when_the_mechanism_replays_its_noise(
    tmp_path, capsys, monkeypatch
):
    import insitu.attacks as attacks

    real = attacks.insitu_mechanism

    def broken(**settings):
        return real(**settings, randomness_for_seed=SeededRandom)

    monkeypatch.setattr(attacks, "insitu_mechanism", broken)
    home = tmp_path / "ws"
    assert run(["init", "--home", str(home)]) == 0
    capsys.readouterr()
    args = ["privacy", "one-run", "--epsilon", "1", "--data", "breast-cancer"]
    code = run([*args, "--canaries", "500", "--steps", "50", "--home", str(home)])
    captured = capsys.readouterr()
    assert code == 1
    assert "FLAGGED" in captured.out
    assert len(captured.out.strip().splitlines()) == 1
    assert "above the claimed 1" in captured.err
    with Workspace.open(home).ledger() as ledger:
        (entry,) = ledger.entries(event_type="privacy.one_run_audit")
    assert entry.payload["flagged"] is True
    assert entry.payload["mechanism"]["randomness"] == "replaced"
