"""Empirical privacy audit: insitu attacks its own models and updates (SPEC capability 7).

An epsilon is a promise on paper; these attacks measure what an attacker actually
extracts, and check the measurement against the promise:

* membership inference against a trained model (``loss``, ``lira-offline``), reported as
  ROC AUC and TPR at low FPR with bootstrap intervals, beside the bound
  ``TPR <= e^epsilon * FPR + delta`` that no attack on an (epsilon, delta)-DP model can
  exceed (:func:`audit_membership`, ``insitu privacy audit``);
* gradient inversion (DLG with the iDLG label trick) against one site's raw update and
  against what the aggregator sees under SecAgg+ with DP clipping and noise
  (:func:`inversion_demo`, ``insitu privacy inversion``);
* a white-box one-run audit with canaries (Steinke et al. 2023) of insitu's own DP-SGD,
  reported as an empirical lower bound on epsilon (:func:`one_run_audit`, ``insitu
  privacy one-run``).

Each module's docstring says what its attack assumes and what it does not cover. See
``docs/privacy-audit.md``.

Layer 8: a package of its own above ``insitu.training`` (its shadow models and audited
mechanisms are trained there), ``insitu.data`` and ``insitu.privacy`` (the bounds it
measures against); nothing below imports it.
"""

from __future__ import annotations

from insitu.attacks._inversion import (
    ChanceBand,
    InversionDemo,
    InversionResult,
    dp_secagg_aggregate,
    infer_label,
    inversion_demo,
    invert_gradient,
    raw_update,
)
from insitu.attacks._lira import lira_offline_scores
from insitu.attacks._membership import (
    ATTACKS,
    AttackResult,
    MembershipAudit,
    Predict,
    ShadowTrainer,
    audit_membership,
    check_sets,
    logit_confidence,
    loss_scores,
    per_record_loss,
)
from insitu.attacks._one_run import (
    InsituMechanism,
    Mechanism,
    OneRunAudit,
    epsilon_lower_bound,
    insitu_mechanism,
    one_run_audit,
    one_run_p_value,
    record_one_run_audit,
)
from insitu.attacks._plot import plot_inversion, plot_roc
from insitu.attacks._records import (
    record_inversion,
    record_membership_audit,
    run_of_model,
    write_audit_evidence,
)
from insitu.attacks._roc import (
    RocPoint,
    RocSummary,
    auc,
    dp_tpr_bound,
    required_non_members,
    roc_curve,
    tpr_at_fpr,
)
from insitu.attacks._target import AuditTarget, ShadowRecipe, load_records, load_target

__all__ = [
    "ATTACKS",
    "AttackResult",
    "AuditTarget",
    "ChanceBand",
    "InsituMechanism",
    "InversionDemo",
    "InversionResult",
    "Mechanism",
    "MembershipAudit",
    "OneRunAudit",
    "Predict",
    "RocPoint",
    "RocSummary",
    "ShadowRecipe",
    "ShadowTrainer",
    "auc",
    "audit_membership",
    "check_sets",
    "dp_secagg_aggregate",
    "dp_tpr_bound",
    "epsilon_lower_bound",
    "infer_label",
    "insitu_mechanism",
    "inversion_demo",
    "invert_gradient",
    "lira_offline_scores",
    "load_records",
    "load_target",
    "logit_confidence",
    "loss_scores",
    "one_run_audit",
    "one_run_p_value",
    "per_record_loss",
    "plot_inversion",
    "plot_roc",
    "raw_update",
    "record_inversion",
    "record_membership_audit",
    "record_one_run_audit",
    "required_non_members",
    "roc_curve",
    "run_of_model",
    "tpr_at_fpr",
    "write_audit_evidence",
]
