"""Membership inference against a trained model: the audit and the loss-threshold attack.

The question an audit answers: given the trained model and a record, can an attacker
tell whether the record was in the training set? The auditor (the data owner) holds
records known to be *members* (used in training) and *non-members* (held out, from the
same distribution); every attack scores all of them, and the ROC figures of
``_roc`` say how well the scores separate the two.

Attacks:

* ``loss`` (Yeom et al. 2018): the score is minus the model's loss on the record.
  Assumes only black-box access to the model's outputs (logits) and the true label.
  The cheapest attack, and a weak one at low FPR: it flags records that are easy for
  any model, members or not.
* ``lira-offline`` (Carlini et al. 2022, offline variant): see ``_lira``.

What an audit does not cover: attacks that use the training trajectory, white-box
gradients, or poisoning; attribute inference; and records the sets do not contain (the
figures are averages over the sets given, a lower bound on what a stronger attack on
the worst-case record could do). A DP guarantee covers all of those; an audit measures
only what these attacks extract.

The set checks are why this is an audit and not a script: overlapping sets (a record
both "in" and "out") and sets too small to read a TPR at the requested FPR are refused
with the number of records needed.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from insitu.attacks._roc import RocSummary, required_non_members, summarize
from insitu.errors import OverlappingSetsError, TooFewRecordsError, UsageError

__all__ = [
    "ATTACKS",
    "MIN_MEMBERS",
    "AttackResult",
    "MembershipAudit",
    "Predict",
    "ShadowTrainer",
    "audit_membership",
    "check_sets",
    "logit_confidence",
    "loss_scores",
    "per_record_loss",
]

#: Features (float32, rows x features) -> logits (rows x 1 for a binary label, or rows
#: x classes). A model's ``forward`` under ``no_grad``, or an ONNX Runtime session.
Predict = Callable[[np.ndarray], np.ndarray]

#: Trains a fresh model like the target on (features, labels) with a seed; returns its
#: :data:`Predict`. Needed by shadow-model attacks.
ShadowTrainer = Callable[[np.ndarray, np.ndarray, int], Predict]

ATTACKS = ("loss", "lira-offline")

#: Below this many members a TPR has a resolution coarser than 5%.
MIN_MEMBERS = 20


def per_record_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of each record (binary with one logit, else softmax), stable."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if logits.ndim == 1 or logits.shape[1] == 1:
        z = logits.reshape(-1)
        # BCE with logits: log(1 + e^z) - y z, computed without overflow.
        result: np.ndarray = np.logaddexp(0.0, z) - labels * z
        return result
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    picked = shifted[np.arange(len(labels)), labels]
    out: np.ndarray = log_norm - picked
    return out


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``log(p_y / (1 - p_y))`` of the true label: LiRA's scaled confidence.

    Carlini et al. take the logit of the confidence because it is close to Gaussian
    across shadow models, where the raw probability is not.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if logits.ndim == 1 or logits.shape[1] == 1:
        z = logits.reshape(-1)
        result: np.ndarray = np.where(labels == 1, z, -z)
        return result
    true = logits[np.arange(len(labels)), labels]
    others = logits.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    top = others.max(axis=1)
    rest = top + np.log(np.exp(others - top[:, None]).sum(axis=1))
    out: np.ndarray = true - rest
    return out


def loss_scores(predict: Predict, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The loss attack's scores: minus the loss (members tend to have lower loss)."""
    return -per_record_loss(predict(features), labels)


def _row_digests(features: np.ndarray, labels: np.ndarray) -> list[bytes]:
    features = np.ascontiguousarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    return [
        hashlib.sha256(row.tobytes() + label.tobytes()).digest()
        for row, label in zip(features, labels, strict=True)
    ]


def check_sets(
    *,
    members: int,
    non_members: int,
    fprs: Sequence[float],
    member_ids: Sequence[str] | None = None,
    non_member_ids: Sequence[str] | None = None,
) -> None:
    """Refuse sets that cannot give the figures asked for.

    Raises:
        UsageError: an FPR outside (0, 1).
        OverlappingSetsError: a record in both sets (by id).
        TooFewRecordsError: too few members, or too few non-members for the lowest FPR.

    """
    for fpr in fprs:
        if not 0 < fpr < 1:
            raise UsageError(f"FPR {fpr} is not in (0, 1); pass e.g. --fpr 0.01")
    if member_ids is not None and non_member_ids is not None:
        shared = set(member_ids) & set(non_member_ids)
        if shared:
            raise OverlappingSetsError(
                f"{len(shared)} records are both members and non-members; a record is "
                "either in the training set or not: remove them from one of the two sets "
                "(records are matched by subject id, or by the whole row without one)"
            )
    if members < MIN_MEMBERS:
        raise TooFewRecordsError(
            f"{members} members; the audit needs at least {MIN_MEMBERS} members (records "
            "that were in the training set)"
        )
    if fprs:
        lowest = min(fprs)
        needed = required_non_members(lowest)
        if non_members < needed:
            raise TooFewRecordsError(
                f"{non_members} non-members; a TPR at {lowest:g} FPR needs at least {needed} "
                f"non-members (so that {needed * lowest:.0f} false positives set the "
                "threshold): give more held-out records or ask for a higher --fpr"
            )


@dataclass(frozen=True)
class AttackResult:
    """One attack's figures and its scores (scores stay in memory: never recorded)."""

    attack: str
    summary: RocSummary
    seconds: float
    member_scores: np.ndarray = field(repr=False)
    non_member_scores: np.ndarray = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """Figures only."""
        return {"attack": self.attack, "seconds": round(self.seconds, 3)} | (self.summary.to_json())


@dataclass(frozen=True)
class MembershipAudit:
    """Every attack's figures, and the (epsilon, delta) they were checked against."""

    results: tuple[AttackResult, ...]
    members: int
    non_members: int
    fprs: tuple[float, ...]
    epsilon: float | None
    delta: float
    seconds: float
    shadow_models: int = 0

    @property
    def above_bound(self) -> bool:
        """Some point estimate lies above the DP bound."""
        return any(p.above_bound for r in self.results for p in r.summary.points)

    @property
    def violation(self) -> bool:
        """Some interval lies wholly above the DP bound: the epsilon cannot hold."""
        return any(p.violation for r in self.results for p in r.summary.points)

    def to_json(self) -> dict[str, Any]:
        """Figures only: what the ledger and the report receive."""
        return {
            "members": self.members,
            "non_members": self.non_members,
            "fprs": list(self.fprs),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "shadow_models": self.shadow_models,
            "seconds": round(self.seconds, 3),
            "above_bound": self.above_bound,
            "violation": self.violation,
            "attacks": [r.to_json() for r in self.results],
        }


def audit_membership(
    predict: Predict,
    members: tuple[np.ndarray, np.ndarray],
    non_members: tuple[np.ndarray, np.ndarray],
    *,
    attacks: Sequence[str] = ("loss",),
    fprs: Sequence[float] = (0.01, 0.001),
    epsilon: float | None = None,
    delta: float = 0.0,
    member_ids: Sequence[str] | None = None,
    non_member_ids: Sequence[str] | None = None,
    shadow_trainer: ShadowTrainer | None = None,
    shadow_models: int = 16,
    bootstrap: int = 1000,
    seed: int = 0,
) -> MembershipAudit:
    """Run membership attacks on ``predict`` and check them against (epsilon, delta).

    Args:
        predict: the target model's logits.
        members: (features, labels) of records in the training set.
        non_members: (features, labels) of held-out records of the same distribution.
        attacks: names from :data:`ATTACKS`.
        fprs: the false-positive rates at which TPRs (and the bound) are reported.
        epsilon: the model's epsilon on paper (None: a non-private model, no bound).
        delta: the model's delta.
        member_ids: record ids for the overlap check (default: digests of the encoded
            rows with their labels, so identical rows count as the same record).
        non_member_ids: as ``member_ids``.
        shadow_trainer: trains a model like the target (needed by ``lira-offline``).
        shadow_models: shadow models LiRA trains.
        bootstrap: bootstrap resamples for the intervals.
        seed: seeds shadow sampling and the bootstrap.

    Raises:
        UsageError: an unknown attack, LiRA without a shadow trainer, a bad FPR.
        OverlappingSetsError: a record in both sets.
        TooFewRecordsError: sets too small for the requested FPRs.

    """
    started = time.perf_counter()
    x_m, y_m = members
    x_n, y_n = non_members
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise UsageError(f"unknown attack {unknown}; choose from {', '.join(ATTACKS)} or all")
    if member_ids is None or non_member_ids is None:
        member_ids = [d.hex() for d in _row_digests(x_m, y_m)]
        non_member_ids = [d.hex() for d in _row_digests(x_n, y_n)]
    check_sets(
        members=len(y_m),
        non_members=len(y_n),
        fprs=fprs,
        member_ids=member_ids,
        non_member_ids=non_member_ids,
    )
    if "lira-offline" in attacks:
        if shadow_trainer is None:
            raise UsageError(
                "lira-offline trains shadow models like the target: give a workspace model "
                "directory (with model.pt), not a bare ONNX file, or use --attack loss"
            )
        if shadow_models < 4:
            raise UsageError("lira-offline needs at least 4 shadow models (16 or more is usual)")
    results = []
    for name in attacks:
        t0 = time.perf_counter()
        if name == "loss":
            s_m, s_n = loss_scores(predict, x_m, y_m), loss_scores(predict, x_n, y_n)
        else:
            from insitu.attacks._lira import lira_offline_scores

            assert shadow_trainer is not None
            both = lira_offline_scores(
                predict,
                np.concatenate([x_m, x_n]),
                np.concatenate([y_m, y_n]),
                shadow_trainer=shadow_trainer,
                shadow_models=shadow_models,
                target_train_size=len(y_m),
                seed=seed,
            )
            s_m, s_n = both[: len(y_m)], both[len(y_m) :]
        summary = summarize(
            s_m,
            s_n,
            fprs=tuple(fprs),
            epsilon=epsilon,
            delta=delta,
            bootstrap=bootstrap,
            seed=seed,
        )
        results.append(AttackResult(name, summary, time.perf_counter() - t0, s_m, s_n))
    return MembershipAudit(
        results=tuple(results),
        members=len(y_m),
        non_members=len(y_n),
        fprs=tuple(fprs),
        epsilon=epsilon,
        delta=delta,
        seconds=time.perf_counter() - started,
        shadow_models=shadow_models if "lira-offline" in attacks else 0,
    )
