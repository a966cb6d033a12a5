"""Pictures of an audit: the ROC curve on log axes with the DP bound, and reconstructions.

Matplotlib with the Agg backend (files only, no display); imported lazily, since it
comes with the ``audit`` extra. Writes are atomic (a temporary file, then a rename).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from insitu._atomic import atomic_write_bytes
from insitu.attacks._inversion import InversionDemo
from insitu.attacks._membership import MembershipAudit
from insitu.attacks._roc import dp_tpr_bound
from insitu.errors import UsageError

__all__ = ["plot_inversion", "plot_roc"]


def _pyplot() -> Any:
    try:
        import matplotlib as mpl
    except ImportError as exc:
        raise UsageError(
            "plots need matplotlib: pip install 'insitu[audit]' (or pass --no-plot)"
        ) from exc
    mpl.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def plot_roc(audit: MembershipAudit, path: Path, *, title: str) -> None:
    """ROC curves of every attack on log-log axes, the diagonal, and the DP bound."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.5, 5))
    floor = 1.0 / max(audit.non_members, 1)
    grid = np.logspace(math.log10(floor), 0, 200)
    axes.plot(grid, grid, color="grey", linestyle=":", label="chance")
    if audit.epsilon is not None:
        bound = dp_tpr_bound(grid, epsilon=audit.epsilon, delta=audit.delta)
        axes.plot(
            grid,
            bound,
            color="black",
            linestyle="--",
            label=f"DP bound (eps={audit.epsilon:g}, delta={audit.delta:g})",
        )
    for result in audit.results:
        s = result.summary
        fpr = np.maximum(s.fpr_curve, floor / 2)
        tpr = np.maximum(s.tpr_curve, 1.0 / max(audit.members, 1) / 2)
        axes.plot(fpr, tpr, label=f"{result.attack} (AUC {s.auc:.3f})")
        for point in s.points:
            colour = "red" if point.above_bound else "black"
            axes.errorbar(
                [point.fpr],
                [max(point.tpr, floor / 2)],
                yerr=[[max(point.tpr - point.tpr_low, 0)], [point.tpr_high - point.tpr]],
                fmt="o",
                color=colour,
                markersize=3,
                capsize=2,
            )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlim(floor / 2, 1)
    axes.set_ylim(1.0 / max(audit.members, 1) / 2, 1)
    axes.set_xlabel("false-positive rate")
    axes.set_ylabel("true-positive rate")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7, loc="lower right")
    _save(figure, path)
    plt.close(figure)


def plot_inversion(demo: InversionDemo, path: Path, *, shape: tuple[int, int]) -> None:
    """The true record beside each reconstruction, as images of ``shape``."""
    plt = _pyplot()
    results = demo.results
    columns = len(results) + 1
    figure, axes = plt.subplots(1, columns, figsize=(2.2 * columns, 2.6))
    panels = [("true record", results[0].target)] + [
        (f"{r.setting}\ncosine {r.cosine:.2f}", r.reconstruction) for r in results
    ]
    for ax, (label, image) in zip(axes, panels, strict=True):
        ax.imshow(np.clip(image, 0, 1).reshape(shape), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(label, fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    _save(figure, path)
    plt.close(figure)
