"""Explanations: per-prediction feature attributions (SHAP) over the ONNX session.

The GDPR's right to an explanation, for tabular models: SHAP's model-agnostic Kernel
SHAP (``shap.KernelExplainer``) over a background sample from this site's own data.
Features are hidden by replacing them with background values, so an attribution is the
change of the model's output (the first output, e.g. the logit) that the feature's value
causes relative to the site's typical record. For a linear model this is exactly
``coef * (x - mean(background))``; a test holds the explainer to that. Every feature
gets an attribution (``l1_reg=False``: SHAP's default keeps only ten).

Why Kernel SHAP rather than the permutation explainer: the latter's masker is compiled
by numba at its first call (14 s on this machine), a cost every server process would pay
at its first ``/explain``; Kernel SHAP is plain NumPy.

The model is called through :meth:`LoadedModel.run` directly: SHAP's thousands of
synthetic rows are neither counted as predictions nor shown to drift observers.

:func:`plot_global_importance` draws mean absolute attributions (the report's figure).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from insitu.errors import InvalidInputError, MissingDependencyError, UsageError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from insitu.runtime._runtime import LoadedModel

__all__ = [
    "Explainer",
    "Explanation",
    "global_importance",
    "plot_global_importance",
]

MAX_BACKGROUND = 100
MAX_EXPLAIN_ROWS = 16


def _shap() -> Any:
    with warnings.catch_warnings():
        # shap imports matplotlib pieces that emit a PendingDeprecationWarning.
        warnings.simplefilter("ignore")
        try:
            import shap
        except ModuleNotFoundError as exc:  # a device install: no numba/llvmlite stack
            raise MissingDependencyError(
                "explanations need shap, which this install lacks; install the extra "
                "that brings it: pip install 'insitu[serve]'"
            ) from exc
    return shap


@dataclass(frozen=True)
class Explanation:
    """Attributions of ``rows`` inputs: ``values[i, j]`` is feature j's share for row i.

    ``base_value`` is the model's mean output over the background; for each row,
    ``base_value + values[i].sum()`` equals the model's output (SHAP's efficiency).
    """

    values: np.ndarray
    base_value: float
    outputs: np.ndarray
    feature_names: list[str]

    def to_json(self) -> dict[str, Any]:
        """As ``/explain`` returns it."""
        return {
            "attributions": self.values.tolist(),
            "base_value": self.base_value,
            "outputs": self.outputs.tolist(),
            "feature_names": self.feature_names,
        }


class Explainer:
    """SHAP attributions for one loaded tabular model (one input ``[batch, features]``)."""

    def __init__(
        self,
        model: LoadedModel,
        background: np.ndarray,
        *,
        feature_names: list[str] | None = None,
        seed: int = 0,
    ) -> None:
        if len(model.inputs) != 1 or len(model.input.shape) != 2:
            raise UsageError(
                f"model {model.name!r} is not tabular (one input of [batch, features]); "
                "explanations cover tabular models"
            )
        background = model.input.check(np.asarray(background), max_rows=1 << 30, cast=True)
        if len(background) > MAX_BACKGROUND:
            picks = np.random.default_rng(seed).choice(
                len(background), MAX_BACKGROUND, replace=False
            )
            background = background[np.sort(picks)]
        self.model = model
        self.background = background
        width = background.shape[1]
        self.feature_names = feature_names or [f"x{j}" for j in range(width)]
        if len(self.feature_names) != width:
            raise UsageError(f"{len(self.feature_names)} feature names for {width} model inputs")
        self._seed = seed
        shap = _shap()
        self._shap = shap.KernelExplainer(self._predict, background.astype(np.float64))

    def _predict(self, rows: np.ndarray) -> np.ndarray:
        name = self.model.input.name
        out = self.model.run({name: np.ascontiguousarray(rows, dtype=self.model.input.dtype)})[0]
        return np.asarray(out, dtype=np.float64).reshape(len(rows), -1)[:, 0]

    def explain(self, inputs: Any, *, max_rows: int = MAX_EXPLAIN_ROWS) -> Explanation:
        """Attributions for the rows of ``inputs`` (checked against the card).

        ``max_rows`` bounds the work of one call (the API keeps the default; a report
        computing global importance over a sample raises it).
        """
        rows = self.model.input.check(inputs, max_rows=max_rows, cast=True)
        width = rows.shape[1]
        values = np.asarray(
            self._shap.shap_values(
                rows.astype(np.float64),
                nsamples=min(2 * width + 2048, 2**width + 2 * width) if width < 30 else "auto",
                l1_reg=False,
                silent=True,
            ),
            dtype=np.float64,
        ).reshape(len(rows), width)
        base = float(np.mean(self._predict(self.background)))
        return Explanation(
            values=values,
            base_value=base,
            outputs=self._predict(rows),
            feature_names=list(self.feature_names),
        )


def global_importance(explanation: Explanation) -> dict[str, float]:
    """Mean absolute attribution per feature, largest first."""
    if explanation.values.size == 0:
        raise InvalidInputError("no rows were explained")
    means = np.abs(explanation.values).mean(axis=0)
    order = np.argsort(-means, kind="stable")
    return {explanation.feature_names[j]: float(means[j]) for j in order}


def plot_global_importance(
    explanation: Explanation,
    path: str | os.PathLike[str] | None = None,
    *,
    top: int = 15,
    title: str = "",
) -> Figure:
    """A bar chart of the ``top`` features by mean absolute attribution; saved to ``path``.

    Uses matplotlib's object API (no global pyplot state), so it is safe in a server.
    """
    from matplotlib.figure import Figure

    importance = list(global_importance(explanation).items())[:top]
    figure = Figure(figsize=(6.4, 0.35 * len(importance) + 1.2), layout="constrained")
    axes = figure.add_subplot()
    names = [name for name, _ in reversed(importance)]
    values = [value for _, value in reversed(importance)]
    axes.barh(names, values, color="#3b6ea8")
    axes.set_xlabel("mean |SHAP value| (model output units)")
    axes.set_title(title or f"Global feature importance ({len(explanation.values)} records)")
    if path is not None:
        figure.savefig(path)
    return figure
