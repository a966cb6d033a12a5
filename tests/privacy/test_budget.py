"""A site's budget, enforced across runs, recorded in its ledger."""

from __future__ import annotations

import pytest

from insitu.errors import BudgetExceededError
from insitu.privacy import PrivacyEvent, SiteBudget, calibrate_noise, epsilon_of

# One round worth epsilon 0.8: a budget of 1 takes one such round, not two.
EVENT = PrivacyEvent(
    calibrate_noise(target_epsilon=0.8, delta=1e-5, sample_rate=0.02, steps=200), 0.02, 200
)


def budget(ledger, workspace, epsilon=1.0, dataset="adult"):
    return SiteBudget(
        ledger, dataset, epsilon_budget=epsilon, delta=1e-5, lock=workspace.home / "privacy.lock"
    )


def test_charges_accumulate_and_the_one_that_would_exceed_is_refused(ledger, workspace):
    first = budget(ledger, workspace).charge(EVENT, run="r1", round=1)
    assert first.epsilon_before == 0
    assert 0 < first.epsilon_after <= 1.0
    second_would_be = epsilon_of([EVENT, EVENT], delta=1e-5)
    assert second_would_be > 1.0
    # A *new* budget object (a second run, another process) sees the first charge.
    with pytest.raises(BudgetExceededError, match="would bring it to"):
        budget(ledger, workspace).charge(EVENT, run="r2", round=1)
    refused = ledger.entries(event_type="privacy.budget_refused")
    assert len(refused) == 1
    assert refused[0].payload["run"] == "r2"
    assert len(ledger.entries(event_type="privacy.spent")) == 1
    assert budget(ledger, workspace).spent() == pytest.approx(first.epsilon_after)


def test_budgets_are_per_data_set(ledger, workspace):
    budget(ledger, workspace, dataset="a").charge(EVENT)
    assert budget(ledger, workspace, dataset="b").spent() == 0.0
    budget(ledger, workspace, dataset="b").charge(EVENT)


def test_deleting_the_record_of_spending_breaks_the_ledger(ledger, workspace):
    from insitu.errors import LedgerIntegrityError
    from tests.audit._tamper import raw, rebuild_merkle_state

    budget(ledger, workspace).charge(EVENT)
    ledger.record("federation.site_round", round=1)
    kept = ledger.sign_head()
    conn = raw(ledger.path)
    conn.execute("DELETE FROM entries WHERE type = 'privacy.spent'")
    rebuild_merkle_state(conn)
    with pytest.raises(LedgerIntegrityError):
        ledger.verify()
    with pytest.raises(LedgerIntegrityError):
        ledger.verify(trusted_head=kept)
