"""The choice ``auto`` makes, from measurements only.

1. A candidate is *feasible* when its accuracy drop against the source model is at most
   ``max_accuracy_drop`` points and it is within ``max_size_mb`` and ``max_latency_ms``
   (p50 at batch 1) when those are given. A candidate that failed to build is not.
2. Among feasible candidates no slower than fp32 at batch 1 (p50), the smallest wins
   (ties: the faster). fp32 itself is such a candidate whenever it is feasible, so a
   slower model is never chosen over it.
3. Only when no such candidate exists, which happens when fp32 itself is too large for
   ``max_size_mb``, the smallest feasible candidate wins even if slower, and the reason
   says the size constraint forced it.
4. Otherwise nothing is chosen, and the reason lists why each candidate failed.

A candidate *not built* on purpose (``skipped``, e.g. one that would learn from
calibration records not declared public) is never feasible; the reason names it
without repeating why (the report does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Candidate", "Constraints", "select"]


@dataclass(frozen=True)
class Constraints:
    """What the chosen model must meet. Accuracy drop in percentage points."""

    max_accuracy_drop: float = 0.5
    max_size_mb: float | None = None
    max_latency_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Figures only."""
        return {
            "max_accuracy_drop": self.max_accuracy_drop,
            "max_size_mb": self.max_size_mb,
            "max_latency_ms": self.max_latency_ms,
        }


@dataclass
class Candidate:
    """One optimized model and what it measured on this machine."""

    name: str
    technique: str
    onnx: bytes | None = field(default=None, repr=False)
    size_bytes: int = 0
    latency_p50_ms: float = float("inf")
    latency_p99_ms: float = float("inf")
    throughput_per_s: float = 0.0
    accuracy: float | None = None
    accuracy_drop: float | None = None
    max_abs_diff: float | None = None
    label_agreement: float | None = None
    error: str | None = None
    failures: list[str] = field(default_factory=list)
    slower_than_fp32: bool = False
    #: Not built on purpose; ``error`` says why (not a failure of the candidate).
    skipped: bool = False

    @property
    def feasible(self) -> bool:
        """Built, measured, and within every constraint."""
        return self.error is None and not self.skipped and not self.failures

    def to_json(self) -> dict[str, Any]:
        """Every figure (no model bytes)."""
        finite = self.error is None
        return {
            "name": self.name,
            "technique": self.technique,
            "size_bytes": self.size_bytes,
            "latency_p50_ms": self.latency_p50_ms if finite else None,
            "latency_p99_ms": self.latency_p99_ms if finite else None,
            "throughput_per_s": self.throughput_per_s if finite else None,
            "accuracy": self.accuracy,
            "accuracy_drop_points": self.accuracy_drop,
            "max_abs_diff": self.max_abs_diff,
            "label_agreement": self.label_agreement,
            "slower_than_fp32": self.slower_than_fp32,
            "feasible": self.feasible,
            "failures": list(self.failures),
            "error": self.error,
            "built": self.error is None and not self.skipped,
            "not_built_reason": self.error if self.skipped else None,
        }


def _judge(candidate: Candidate, constraints: Constraints) -> list[str]:
    failures: list[str] = []
    if candidate.skipped:
        return ["not built"]
    if candidate.error is not None:
        return [f"failed to build: {candidate.error}"]
    drop = candidate.accuracy_drop
    if drop is None or drop > constraints.max_accuracy_drop + 1e-9:
        failures.append(
            f"accuracy drop {drop:.2f} pts > {constraints.max_accuracy_drop:g}"
            if drop is not None
            else "accuracy unknown"
        )
    mb = candidate.size_bytes / 1e6
    if constraints.max_size_mb is not None and mb > constraints.max_size_mb:
        failures.append(f"size {mb:.3f} MB > {constraints.max_size_mb:g}")
    p50 = candidate.latency_p50_ms
    if constraints.max_latency_ms is not None and p50 > constraints.max_latency_ms:
        failures.append(f"p50 latency {p50:.3f} ms > {constraints.max_latency_ms:g}")
    return failures


def select(
    candidates: list[Candidate], constraints: Constraints, *, baseline: str = "fp32"
) -> tuple[Candidate | None, str]:
    """(chosen candidate or None, why); fills each candidate's ``failures``."""
    fp32 = next((c for c in candidates if c.name == baseline and c.error is None), None)
    for candidate in candidates:
        candidate.failures = _judge(candidate, constraints)
        candidate.slower_than_fp32 = (
            fp32 is not None
            and candidate is not fp32
            and candidate.error is None
            and candidate.latency_p50_ms > fp32.latency_p50_ms
        )
    feasible = [c for c in candidates if c.feasible]

    def smallest(pool: list[Candidate]) -> Candidate:
        return min(pool, key=lambda c: (c.size_bytes, c.latency_p50_ms))

    fast = [c for c in feasible if not c.slower_than_fp32]
    if fast:
        chosen = smallest(fast)
        return chosen, (
            f"{chosen.name}: the smallest candidate that meets the constraints and is no "
            f"slower than fp32 at batch 1"
        )
    size_forced = fp32 is not None and any("size" in f for f in fp32.failures)
    if feasible and (size_forced or fp32 is None):
        chosen = smallest(feasible)
        return chosen, (
            f"{chosen.name}: every candidate as fast as fp32 is over --max-size; this is the "
            f"smallest that fits, slower than fp32 at batch 1"
        )
    why = "; ".join(
        f"{c.name}: {', '.join(c.failures) or 'slower than fp32 at batch 1'}"
        for c in candidates
        if not c.skipped
    )
    skipped = [c.name for c in candidates if c.skipped]
    if skipped:
        why += f"; not built: {', '.join(skipped)}"
    return None, f"no candidate meets the constraints ({why})"
