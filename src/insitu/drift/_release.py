"""A site's paid release of its reference histograms (the budgeted half of the profile)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from insitu.audit import events
from insitu.drift._profile import ProfileLayout, noisy_release
from insitu.privacy import PrivacyEvent, SecureRandom, SubjectBudget, calibrate_noise

if TYPE_CHECKING:
    from insitu.workspace import Workspace

__all__ = ["MECHANISM", "release_profile"]

MECHANISM = "drift-reference-histograms"


def release_profile(
    workspace: Workspace,
    layout: ProfileLayout,
    inputs: np.ndarray,
    outputs: np.ndarray | None,
    *,
    subject_keys: np.ndarray,
    dataset: str,
    epsilon: float,
    run: str = "",
) -> dict[str, Any]:
    """Charge the release to the subjects of the records, then return it.

    ``subject_keys`` (from :class:`~insitu.data.TrainingData`) names the subject of each
    row of ``inputs``. Subjects without budget left are left out of the histograms, and
    a subject with several records adds one of them, chosen at random (the histograms'
    sensitivity is that of one record per subject). The delta is the site's configured
    ``privacy.delta``. The release holds only noisy
    counts; ``drift.profile_released`` records what was released and what it cost.

    Raises:
        BudgetExceededError: no subject has budget left for the release (recorded as
            ``privacy.budget_refused``; nothing is released).

    """
    delta = float(workspace.config.get("privacy", "delta"))
    sigma = calibrate_noise(target_epsilon=epsilon, delta=delta, sample_rate=1.0, steps=1)
    with workspace.ledger() as ledger:
        charge = SubjectBudget.for_workspace(workspace, ledger).charge(
            subject_keys,
            PrivacyEvent(sigma, 1.0, 1),
            mechanism=MECHANISM,
            run=run,
            dataset=dataset,
        )
        rows = _one_row_per_subject(subject_keys, charge.admission.admitted)
        release, _ = noisy_release(
            layout,
            inputs[rows],
            None if outputs is None else outputs[rows],
            epsilon=epsilon,
            delta=delta,
        )
        events.DRIFT_PROFILE_RELEASED.record(
            ledger,
            dataset=dataset,
            histograms=len(release["counts"]),
            noise_std=round(float(release["noise_std"]), 6),
            epsilon=epsilon,
            epsilon_spent_max=round(charge.epsilon_max_after, 6),
            excluded_over_budget=charge.admission.excluded_over_budget,
            run=run,
        )
    return release


def _one_row_per_subject(keys: np.ndarray, admitted: np.ndarray) -> np.ndarray:
    """Indices of one admitted row per subject, each chosen by secret randomness."""
    candidates = np.flatnonzero(admitted)
    shuffled = candidates[np.argsort(SecureRandom().uniform(len(candidates)))]
    _, first = np.unique(np.asarray(keys)[shuffled], return_index=True)
    return np.sort(shuffled[first])
