"""Privacy accounting and the per-site privacy budgets that sites enforce themselves."""

from __future__ import annotations

from insitu.privacy._accountant import PrivacyEvent, calibrate_noise, epsilon_of
from insitu.privacy._budget import BudgetCharge, SiteBudget

__all__ = ["BudgetCharge", "PrivacyEvent", "SiteBudget", "calibrate_noise", "epsilon_of"]
