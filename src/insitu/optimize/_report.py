"""The outcome of an optimization: every candidate's figures, the choice, and its reason.

``provenance`` links the choice to what it came from: the source's ONNX digest (the
one its run's ledger entry names), that entry's ``seq`` and ``hash`` when the workspace
ledger holds it, the chosen model's digest, whether the calibration records were
declared public (and their digest when they were), and what the chosen model learnt
from. The same figures go into the ``model.optimized`` ledger entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from insitu.optimize._select import Candidate, Constraints

__all__ = ["OptimizationReport", "plot_candidates"]


@dataclass
class OptimizationReport:
    """What ``optimize`` measured and chose.

    ``chosen`` is None when no candidate met the constraints (the CLI then exits 1);
    ``model_path`` is the chosen model's file when an output directory was given.
    """

    source: dict[str, Any]
    constraints: Constraints
    candidates: list[Candidate]
    chosen: str | None
    reason: str
    seconds: float
    threads: int
    quick: bool
    out_dir: Path | None = None
    ledger_seq: int | None = None
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def chosen_candidate(self) -> Candidate | None:
        """The chosen candidate, or None."""
        return next((c for c in self.candidates if c.name == self.chosen), None)

    @property
    def candidate(self) -> dict[str, Candidate]:
        """Candidates by name."""
        return {c.name: c for c in self.candidates}

    @property
    def onnx(self) -> bytes | None:
        """The chosen model's ONNX bytes."""
        chosen = self.chosen_candidate
        return None if chosen is None else chosen.onnx

    @property
    def model_path(self) -> Path | None:
        """``<out_dir>/model.onnx`` when a model was chosen and written."""
        if self.out_dir is None or self.chosen is None:
            return None
        return self.out_dir / "model.onnx"

    def ratios(self) -> dict[str, float | None]:
        """The chosen model against fp32: size reduction, batch-1 speed-up, accuracy drop."""
        chosen, fp32 = self.chosen_candidate, self.candidate.get("fp32")
        if chosen is None or fp32 is None or fp32.error is not None:
            return {"size_reduction": None, "speedup_p50": None, "accuracy_drop_points": None}
        return {
            "size_reduction": fp32.size_bytes / chosen.size_bytes,
            "speedup_p50": fp32.latency_p50_ms / chosen.latency_p50_ms,
            "accuracy_drop_points": chosen.accuracy_drop,
        }

    def to_json(self) -> dict[str, Any]:
        """The report's JSON document (figures only)."""
        return {
            "source": self.source,
            "constraints": self.constraints.to_json(),
            "candidates": [c.to_json() for c in self.candidates],
            "chosen": self.chosen,
            "reason": self.reason,
            "chosen_vs_fp32": self.ratios(),
            "seconds": round(self.seconds, 2),
            "intra_op_threads": self.threads,
            "quick": self.quick,
            "out_dir": None if self.out_dir is None else str(self.out_dir),
            "model_path": None if self.model_path is None else str(self.model_path),
            "ledger_seq": self.ledger_seq,
            "notes": list(self.notes),
            "provenance": dict(self.provenance),
        }


def plot_candidates(report: OptimizationReport) -> bytes:
    """PNG: size (x, log) against p50 latency (y), coloured by accuracy; the choice starred."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    built = [c for c in report.candidates if c.error is None and math.isfinite(c.latency_p50_ms)]
    figure, axes = plt.subplots(figsize=(7.5, 5))
    try:
        accuracies = [100 * (c.accuracy if c.accuracy is not None else 0.0) for c in built]
        points = axes.scatter(
            [c.size_bytes / 1024 for c in built],
            [c.latency_p50_ms * 1000 for c in built],
            c=accuracies,
            cmap="viridis",
            s=70,
            edgecolors=["black" if c.feasible else "red" for c in built],
            linewidths=1.2,
        )
        for c in built:
            axes.annotate(
                c.name,
                (c.size_bytes / 1024, c.latency_p50_ms * 1000),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
        chosen = report.chosen_candidate
        if chosen is not None:
            axes.scatter(
                [chosen.size_bytes / 1024],
                [chosen.latency_p50_ms * 1000],
                marker="*",
                s=320,
                facecolors="none",
                edgecolors="crimson",
                linewidths=1.5,
                label=f"chosen: {chosen.name}",
            )
            axes.legend(loc="best", fontsize=8)
        axes.set_xscale("log")
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.set_xlabel("size (KiB, log scale)")
        axes.set_ylabel("p50 latency at batch 1 (µs)")
        axes.set_title(
            f"{report.source.get('name', 'model')}: candidates "
            "(colour: accuracy %, red edge: fails a constraint)",
            fontsize=9,
        )
        figure.colorbar(points, ax=axes, label="accuracy (%)")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(figure)
    return buffer.getvalue()
