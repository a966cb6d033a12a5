"""The report's plots, drawn from section data as inline SVG (no file, no network).

Matplotlib with the Agg backend; text is kept as SVG text (``svg.fonttype = none``) so
the page's fonts apply and the figures stay sharp when printed to PDF.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["accuracy_plot", "drift_plot", "epsilon_plot", "flow_plot", "optimize_plot", "roc_plot"]

_COLORS = ["#1f5f8b", "#d1495b", "#edae49", "#00798c", "#66a182", "#8d6a9f", "#2e4057"]


@contextmanager
def _figure(width: float = 6.4, height: float = 3.4) -> Iterator[tuple[Any, Any]]:
    import matplotlib as mpl

    mpl.use("Agg", force=True)
    import matplotlib.pyplot as plt

    with mpl.rc_context(
        {
            "svg.fonttype": "none",
            "svg.hashsalt": "insitu-report",
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
        }
    ):
        fig, ax = plt.subplots(figsize=(width, height))
        try:
            yield fig, ax
        finally:
            plt.close(fig)


def _svg(fig: Any) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    # Matplotlib's RDF block (creator, format) names namespaces by URL; the page needs none.
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.DOTALL)


def accuracy_plot(rounds: list[dict[str, Any]], baseline: float | None) -> str | None:
    """Accuracy per round (coordinator's hold-out and sites' held-out) and the baseline."""
    if not rounds:
        return None
    with _figure() as (fig, ax):
        xs = [r["round"] for r in rounds]
        for key, label, color in (
            ("central_accuracy", "coordinator hold-out", _COLORS[0]),
            ("accuracy", "sites' held-out records", _COLORS[2]),
        ):
            ys = [r.get(key) for r in rounds]
            if any(y is not None for y in ys):
                ax.plot(xs, ys, marker="o", label=label, color=color)
        if baseline is not None:
            ax.axhline(baseline, linestyle="--", color=_COLORS[1], label="non-private baseline")
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy")
        ax.set_xticks(xs)
        ax.legend(loc="lower right", frameon=False)
        return _svg(fig)


def epsilon_plot(by_site: dict[str, list[dict[str, Any]]], target: float | None) -> str | None:
    """Each site's epsilon of this run after each round, beside the most spent in total.

    Solid: what this run cost (from 0, against the run's target); dashed, in the same
    colour: the most any subject of the site has spent, earlier uses included (where the
    site's budget bites). Round 0 is before training.
    """
    if not by_site:
        return None
    from matplotlib.lines import Line2D

    with _figure() as (fig, ax):
        rounds: set[int] = set()
        for index, site in enumerate(sorted(by_site)):
            points = by_site[site]
            xs = [int(p["round"]) for p in points]
            rounds.update(xs)
            color = _COLORS[index % len(_COLORS)]
            ax.plot(xs, [p["epsilon"] for p in points], marker="o", markersize=3, color=color)
            ax.plot(
                xs,
                [p["epsilon_total"] for p in points],
                linestyle="--",
                linewidth=1,
                color=color,
                alpha=0.7,
            )
        handles = [
            Line2D([], [], color=_COLORS[i % len(_COLORS)], label=site)
            for i, site in enumerate(sorted(by_site))
        ]
        handles += [
            Line2D([], [], color="#333333", marker="o", markersize=3, label="this run"),
            Line2D([], [], color="#333333", linestyle="--", linewidth=1, label="most spent, total"),
        ]
        if target is not None:
            ax.axhline(target, linestyle=":", color="#555555")
            handles.append(
                Line2D([], [], color="#555555", linestyle=":", label=f"run target {target:g}")
            )
        ax.set_xlabel("round (0: before training)")
        ax.set_ylabel("epsilon")
        ax.set_xticks(sorted(rounds))
        ax.set_ylim(bottom=0)
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        return _svg(fig)


def roc_plot(
    roc: dict[str, Any], epsilon: float | None, delta: float, non_members: int
) -> str | None:
    """The attack's ROC on log axes, with chance and the (epsilon, delta) bound.

    Drawn from FPR 1/non-members up: below it the curve has no resolution.
    """
    import numpy as np

    fpr = np.asarray(roc.get("fpr", []), dtype=float)
    tpr = np.asarray(roc.get("tpr", []), dtype=float)
    low = 1.0 / max(1, non_members)
    keep = fpr >= low
    if not keep.any():
        return None
    with _figure(5.0, 3.6) as (fig, ax):
        grid = np.geomspace(low, 1.0, 200)
        ax.plot(fpr[keep], np.maximum(tpr[keep], 1e-4), color=_COLORS[0], label=roc["attack"])
        ax.plot(grid, grid, linestyle=":", color="#777777", label="chance")
        if epsilon is not None:
            bound = np.minimum(1.0, math.exp(epsilon) * grid + delta)
            ax.plot(
                grid, bound, linestyle="--", color=_COLORS[1], label=f"DP bound (eps {epsilon:.2f})"
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(grid[0], 1)
        ax.set_ylim(min(low, 1e-2), 1.05)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(loc="lower right", frameon=False)
        return _svg(fig)


def flow_plot(flows: list[dict[str, Any]]) -> str | None:
    """Bytes each site sent, stacked by kind."""
    if not any(f["recorded"] for f in flows):
        return None
    kinds = [
        ("model_update_bytes", "model update"),
        ("protocol_bytes", "SecAgg+ protocol"),
        ("metrics_bytes", "metrics"),
        ("envelope_bytes", "envelope"),
        ("unclassified_bytes", "unclassified (raw data would be here)"),
    ]
    with _figure(6.4, 0.45 * len(flows) + 1.2) as (fig, ax):
        names = [f["site"] for f in flows]
        left = [0.0] * len(flows)
        for index, (key, label) in enumerate(kinds):
            values = [f[key] / 1024 for f in flows]
            ax.barh(names, values, left=left, label=label, color=_COLORS[index % len(_COLORS)])
            left = [a + b for a, b in zip(left, values, strict=True)]
        ax.invert_yaxis()
        ax.set_xlabel("KiB sent by the site over the run")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        return _svg(fig)


def optimize_plot(candidates: list[dict[str, Any]]) -> str | None:
    """Size against p50 latency of the optimized candidates (when the step ran)."""
    points = [c for c in candidates if c.get("bytes") is not None and c.get("p50_ms") is not None]
    if not points:
        return None
    with _figure(5.0, 3.2) as (fig, ax):
        for index, c in enumerate(points):
            ax.scatter(c["bytes"] / 1024, c["p50_ms"], color=_COLORS[index % len(_COLORS)])
            ax.annotate(str(c.get("name", index)), (c["bytes"] / 1024, c["p50_ms"]), fontsize=8)
        ax.set_xlabel("model size (KiB)")
        ax.set_ylabel("p50 latency (ms)")
        return _svg(fig)


def drift_plot(latest: list[dict[str, Any]]) -> str | None:
    """PSI of each monitored statistic at its last recorded transition, with the threshold.

    ``latest``: per site, version and statistic, the figures of its last
    ``drift.detected`` (flagged, red) or ``drift.cleared`` entry.
    """
    shown = [f for f in latest if f.get("psi") is not None]
    if not shown:
        return None
    with _figure(height=max(1.6, 0.32 * len(shown) + 0.8)) as (fig, ax):
        labels = [f"{f['feature']} ({f['site']}, {f['version']})" for f in shown]
        ys = list(range(len(shown)))
        colors = [_COLORS[1] if f.get("flagged") else "#999999" for f in shown]
        ax.barh(ys, [float(f["psi"]) for f in shown], color=colors)
        ax.set_yticks(ys, labels)
        ax.invert_yaxis()
        thresholds = {float(f["psi_threshold"]) for f in shown if f.get("psi_threshold")}
        for threshold in sorted(thresholds):
            ax.axvline(
                threshold, linestyle="--", color=_COLORS[0], label=f"threshold {threshold:g}"
            )
        ax.set_xlabel("PSI (red: flagged; grey: cleared)")
        if thresholds:
            ax.legend(loc="lower right", frameon=False)
        return _svg(fig)
