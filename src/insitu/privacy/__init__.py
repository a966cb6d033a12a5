"""Privacy accounting, secret randomness, and the per-subject budgets sites enforce themselves.

Layer 4: the privacy math (PLD and RDP accounting), the secret randomness every DP
release draws from, and the per-subject budgets. Imports ``insitu.audit`` and
``insitu.workspace``; never data, training or federation.
"""

from __future__ import annotations

from insitu.privacy._accountant import (
    PrivacyEvent,
    calibrate_noise,
    epsilon_of,
    rdp_epsilon_of,
    rdp_noise_multiplier,
    within_budget,
)
from insitu.privacy._budget import (
    REFUSED,
    SPENT,
    Admission,
    BudgetCharge,
    SubjectBudget,
    as_keys,
)
from insitu.privacy._noise import SecureRandom

__all__ = [
    "REFUSED",
    "SPENT",
    "Admission",
    "BudgetCharge",
    "PrivacyEvent",
    "SecureRandom",
    "SubjectBudget",
    "as_keys",
    "calibrate_noise",
    "epsilon_of",
    "rdp_epsilon_of",
    "rdp_noise_multiplier",
    "within_budget",
]
