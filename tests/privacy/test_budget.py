"""Per-subject budgets: enforced across uses, recorded in the ledger, hard to forget.

Each attack here is something a site operator (or a bug) could do to make spent privacy
disappear: a second budget object, a deleted ledger entry, a deleted or edited cohort
file, an edited cache.
"""

from __future__ import annotations

import numpy as np
import pytest

from insitu.errors import BudgetEvidenceError, BudgetExceededError
from insitu.privacy import PrivacyEvent, SubjectBudget, calibrate_noise, epsilon_of

# One use worth epsilon 0.8: a budget of 1 takes one such use per subject, not two.
EVENT = PrivacyEvent(
    calibrate_noise(target_epsilon=0.8, delta=1e-5, sample_rate=0.02, steps=200), 0.02, 200
)
KEYS = np.arange(1, 1001, dtype=np.uint64) * np.uint64(7919)


def budget(ledger, workspace, epsilon=1.0):
    return SubjectBudget(
        ledger,
        workspace.home / "privacy",
        epsilon_budget=epsilon,
        delta=1e-5,
        mac_key=workspace.secret("data"),
    )


def test_a_subject_charged_once_is_left_out_of_a_second_use(ledger, workspace):
    first = budget(ledger, workspace).charge(KEYS[:600], EVENT, mechanism="dp-sgd", run="r1")
    assert first.admission.subjects == 600
    assert 0 < first.epsilon_max_after <= 1.0
    assert epsilon_of([EVENT, EVENT], delta=1e-5) > 1.0
    # A *new* budget object (a second run, another process) sees the first charge: the
    # 600 subjects already charged are left out, the 400 others are admitted.
    second = budget(ledger, workspace).charge(KEYS, EVENT, mechanism="dp-sgd", run="r2")
    assert second.admission.subjects == 400
    assert second.admission.excluded_over_budget == 600
    assert not second.admission.admitted[:600].any()
    assert budget(ledger, workspace).spent(KEYS) == pytest.approx(first.epsilon_max_after)
    spent = ledger.entries(event_type="privacy.spent")
    assert [e.payload["subjects"] for e in spent] == [600, 400]
    assert spent[1].payload["excluded_over_budget"] == 600


def test_a_use_no_subject_can_afford_is_refused_and_recorded(ledger, workspace):
    budget(ledger, workspace).charge(KEYS, EVENT, mechanism="dp-sgd", run="r1")
    with pytest.raises(BudgetExceededError, match="no subject has privacy budget left"):
        budget(ledger, workspace).charge(KEYS, EVENT, mechanism="dp-sgd", run="r2")
    refused = ledger.entries(event_type="privacy.budget_refused")
    assert len(refused) == 1
    assert refused[0].payload["run"] == "r2"
    assert refused[0].payload["candidates"] == 1000
    assert len(ledger.entries(event_type="privacy.spent")) == 1


def test_epsilon_of_a_run_composes_its_rounds_and_nothing_else(ledger, workspace):
    small = PrivacyEvent(EVENT.noise_multiplier * 3, 0.02, 50)
    b = budget(ledger, workspace, epsilon=10.0)
    b.charge(KEYS, small, mechanism="dp-sgd", run="earlier")
    one = b.charge(KEYS, small, mechanism="dp-sgd", run="now", round=1)
    two = b.charge(KEYS, small, mechanism="dp-sgd", run="now", round=2)
    assert one.epsilon_run == pytest.approx(epsilon_of([small], delta=1e-5))
    assert two.epsilon_run == pytest.approx(epsilon_of([small, small], delta=1e-5))
    assert two.epsilon_max_after == pytest.approx(epsilon_of([small] * 3, delta=1e-5))


def test_deleting_a_cohort_file_refuses_every_later_use_instead_of_forgetting(ledger, workspace):
    budget(ledger, workspace).charge(KEYS, EVENT, mechanism="dp-sgd", run="r1")
    for path in (workspace.home / "privacy").glob("index.*"):
        path.unlink()
    for cohort in (workspace.home / "privacy" / "cohorts").iterdir():
        cohort.unlink()
    with pytest.raises(BudgetEvidenceError, match="is missing"):
        budget(ledger, workspace).charge(KEYS, EVENT, mechanism="dp-sgd", run="r2")
    assert len(ledger.entries(event_type="privacy.spent")) == 1


def test_editing_a_cohort_file_to_drop_subjects_is_found(ledger, workspace):
    budget(ledger, workspace).charge(KEYS, EVENT, mechanism="dp-sgd", run="r1")
    for path in (workspace.home / "privacy").glob("index.*"):
        path.unlink()
    (cohort,) = (workspace.home / "privacy" / "cohorts").iterdir()
    cohort.write_bytes(cohort.read_bytes()[:800])  # the first 100 subjects only
    with pytest.raises(BudgetEvidenceError, match="was altered"):
        budget(ledger, workspace).charge(KEYS, EVENT, mechanism="dp-sgd", run="r2")


def test_an_edited_cache_is_not_trusted(ledger, workspace):
    budget(ledger, workspace).charge(KEYS, EVENT, mechanism="dp-sgd", run="r1")
    index = workspace.home / "privacy" / "index.npz"
    data = bytearray(index.read_bytes())
    data[-200] ^= 0xFF
    index.write_bytes(bytes(data))
    # The cache no longer verifies: it is rebuilt from the ledger and the cohorts.
    with pytest.raises(BudgetExceededError):
        budget(ledger, workspace).charge(KEYS, EVENT, mechanism="dp-sgd", run="r2")


def test_deleting_the_record_of_spending_breaks_the_ledger(ledger, workspace):
    from insitu.errors import LedgerIntegrityError
    from tests.audit._tamper import raw, rebuild_merkle_state

    budget(ledger, workspace).charge(KEYS, EVENT, mechanism="dp-sgd")
    ledger.record("federation.site_round", round=1)
    kept = ledger.sign_head()
    conn = raw(ledger.path)
    conn.execute("DELETE FROM entries WHERE type = 'privacy.spent'")
    rebuild_merkle_state(conn)
    with pytest.raises(LedgerIntegrityError):
        ledger.verify()
    with pytest.raises(LedgerIntegrityError):
        ledger.verify(trusted_head=kept)


def test_a_use_of_no_record_admits_no_one_and_costs_nothing(ledger, workspace):
    # A site whose records all lack consent asks about none: the answer is "no one", not
    # a crash inside the accountant (np.stack of no curve, found by a run without consent).
    admission = budget(ledger, workspace).admit(KEYS[:0], EVENT)
    assert admission.subjects == 0
    assert admission.admitted.shape == (0,)
    assert admission.epsilon_max_after == 0.0
