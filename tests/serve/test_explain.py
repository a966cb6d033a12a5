"""Explanations: SHAP over the ONNX session agrees with a logistic regression's own terms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from insitu.errors import UsageError
from insitu.runtime import Explainer, ModelRuntime, global_importance, plot_global_importance
from tests.serve.conftest import linear_model, make_site


@pytest.fixture(scope="module")
def logistic(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelRuntime, np.ndarray]:
    coef = np.array([2.0, -1.5, 0.8, -0.3, 0.05, 1.1], dtype=np.float32)
    site = make_site(tmp_path_factory.mktemp("explain") / "site", linear_model(coef, 0.2))
    runtime = ModelRuntime.for_workspace(site.workspace, guard=False)
    yield runtime, coef  # type: ignore[misc]
    runtime.close()


def test_attributions_agree_with_coefficients_times_centered_features(
    logistic: tuple[ModelRuntime, np.ndarray],
) -> None:
    runtime, coef = logistic
    rng = np.random.default_rng(7)
    background = rng.normal(size=(80, 6))
    rows = rng.normal(size=(5, 6)) * 2
    explanation = Explainer(runtime.get("mlp"), background).explain(rows)
    expected = coef * (rows - background.astype(np.float32).mean(axis=0))
    for got, want in zip(explanation.values, expected, strict=True):
        assert np.array_equal(np.sign(got), np.sign(want))
        assert list(np.argsort(-np.abs(got))) == list(np.argsort(-np.abs(want)))
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(
        explanation.values.sum(axis=1) + explanation.base_value, explanation.outputs, atol=1e-4
    )


def test_global_importance_plot(logistic: tuple[ModelRuntime, np.ndarray], tmp_path: Path) -> None:
    runtime, _ = logistic
    rng = np.random.default_rng(1)
    names = ["age", "hours", "education", "capital", "noise", "tenure"]
    explanation = Explainer(
        runtime.get("mlp"), rng.normal(size=(50, 6)), feature_names=names
    ).explain(rng.normal(size=(40, 6)), max_rows=40)
    ranking = list(global_importance(explanation))
    assert ranking[0] == "age"
    assert ranking[-1] == "noise"
    figure = plot_global_importance(explanation, tmp_path / "importance.png", top=4)
    assert (tmp_path / "importance.png").stat().st_size > 1000
    assert len(figure.axes[0].patches) == 4


def test_wrong_number_of_feature_names_is_refused(
    logistic: tuple[ModelRuntime, np.ndarray],
) -> None:
    runtime, _ = logistic
    with pytest.raises(UsageError, match="feature names"):
        Explainer(runtime.get("mlp"), np.zeros((5, 6)), feature_names=["a"])
