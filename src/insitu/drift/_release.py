"""A site's paid release of its reference histograms (the budgeted half of the profile)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from insitu.drift._profile import ProfileLayout, noisy_release

if TYPE_CHECKING:
    from insitu.workspace import Workspace

__all__ = ["release_profile"]

MECHANISM = "drift-reference-histograms"


def release_profile(
    workspace: Workspace,
    layout: ProfileLayout,
    inputs: np.ndarray,
    outputs: np.ndarray | None,
    *,
    dataset: str,
    epsilon: float,
    run: str = "",
) -> dict[str, Any]:
    """Charge the release to the site's budget for ``dataset``, then return it.

    The delta is the site's configured ``privacy.delta``. The release holds only noisy
    counts; ``drift.profile_released`` records what was released and what it cost.

    Raises:
        BudgetExceededError: the release would take ``dataset`` past the site's budget
            (recorded as ``privacy.budget_refused``; nothing is released).

    """
    from insitu.federated._site_app import site_budget

    delta = float(workspace.config.get("privacy", "delta"))
    release, event = noisy_release(layout, inputs, outputs, epsilon=epsilon, delta=delta)
    with workspace.ledger() as ledger:
        charge = site_budget(workspace, ledger, dataset).charge(event, run=run, mechanism=MECHANISM)
        ledger.record(
            "drift.profile_released",
            dataset=dataset,
            histograms=len(release["counts"]),
            noise_std=round(float(release["noise_std"]), 6),
            epsilon=epsilon,
            epsilon_spent_total=round(charge.epsilon_after, 6),
            run=run,
        )
    return release
