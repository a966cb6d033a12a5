"""A site's privacy budget per data set, enforced by the site itself, across all runs.

The budget is derived from the site's own ledger: every private round a site takes part
in is a ``privacy.spent`` entry (noise multiplier, sample rate, steps) for a data set, and
the epsilon spent is the RDP composition of *all* of them, whichever run, federation or
fine-tuning they came from. Before a round, the site charges the round's event; if the
composition would pass the budget, it refuses (:class:`BudgetExceededError`) and records
a ``privacy.budget_refused`` entry instead. Nothing outside the site can spend its budget,
and deleting the record of spending breaks the ledger's hash chain.

Invariant (held under a per-workspace file lock, so concurrent trainings at one site
cannot both pass the check): the epsilon of the recorded events for a data set never
exceeds its budget.

The charge happens *before* local training, for the steps planned: a round that then
fails has still spent its budget (conservative, and the only safe order).
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from insitu.audit import Ledger
from insitu.errors import BudgetExceededError
from insitu.privacy._accountant import PrivacyEvent, epsilon_of

__all__ = ["BudgetCharge", "SiteBudget"]

logger = logging.getLogger(__name__)

SPENT = "privacy.spent"
REFUSED = "privacy.budget_refused"


@dataclass(frozen=True, slots=True)
class BudgetCharge:
    """A successful charge: epsilon spent before and after, and the budget."""

    epsilon_before: float
    epsilon_after: float
    budget: float
    delta: float


class SiteBudget:
    """The privacy budget of one data set at one site (see the module docstring)."""

    def __init__(
        self, ledger: Ledger, dataset: str, *, epsilon_budget: float, delta: float, lock: Path
    ) -> None:
        if epsilon_budget <= 0 or not 0 < delta < 1:
            raise ValueError("a budget needs epsilon > 0 and 0 < delta < 1")
        self._ledger = ledger
        self.dataset = dataset
        self.epsilon_budget = epsilon_budget
        self.delta = delta
        self._lock = lock

    def events(self) -> list[PrivacyEvent]:
        """Every private event charged to this data set, oldest first."""
        return [
            PrivacyEvent(p["noise_multiplier"], p["sample_rate"], p["steps"])
            for p in (e.payload for e in self._ledger.entries(event_type=SPENT))
            if p.get("dataset") == self.dataset
        ]

    def spent(self) -> float:
        """Epsilon spent so far on this data set, at this budget's delta."""
        return epsilon_of(self.events(), delta=self.delta)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._lock.parent.mkdir(parents=True, exist_ok=True)
        with self._lock.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def charge(self, event: PrivacyEvent, **context: Any) -> BudgetCharge:
        """Spend ``event`` on this data set, or refuse and record the refusal.

        ``context`` (run id, round number...) is recorded with the entry.

        Raises:
            BudgetExceededError: the event would take the data set past its budget.

        """
        with self._locked():
            prior = self.events()
            before = epsilon_of(prior, delta=self.delta)
            after = epsilon_of([*prior, event], delta=self.delta)
            common = {
                "dataset": self.dataset,
                "budget_epsilon": self.epsilon_budget,
                "delta": self.delta,
                "noise_multiplier": event.noise_multiplier,
                "sample_rate": event.sample_rate,
                "steps": event.steps,
                **context,
            }
            if after > self.epsilon_budget:
                self._ledger.record(REFUSED, epsilon_spent=before, epsilon_would_be=after, **common)
                raise BudgetExceededError(
                    f"data set {self.dataset!r} has spent epsilon {before:.3f} of its budget "
                    f"{self.epsilon_budget}; this round would bring it to {after:.3f}: refused. "
                    "Raise the site's privacy.epsilon_budget only if your DPO agrees"
                )
            self._ledger.record(SPENT, epsilon_before=before, epsilon_after=after, **common)
        logger.info(
            "dataset %s: epsilon %.3f -> %.3f of %.3f",
            self.dataset,
            before,
            after,
            self.epsilon_budget,
        )
        return BudgetCharge(before, after, self.epsilon_budget, self.delta)
