"""Small CNNs for images and signals: trained by DP-SGD, refused when Opacus refuses them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from insitu.errors import UsageError
from insitu.privacy import PrivacyEvent
from insitu.training import (
    ArrayModelFn,
    build_cnn,
    check_dp_compatible,
    evaluate,
    export_array_onnx,
    onnx_parity,
    train,
)


def batchnorm_net(n_features: int) -> nn.Module:
    """A user's module with BatchNorm (module level: picklable)."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10)
    )


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def test_batchnorm_module_is_refused_naming_the_layer() -> None:
    with pytest.raises(
        UsageError, match=r"layer '1' \(BatchNorm2d\).*replace it with nn.GroupNorm"
    ):
        check_dp_compatible(batchnorm_net(64))


def test_attack_batchnorm_module_is_refused_before_any_private_step(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = digits
    model = ArrayModelFn((1, 8, 8), 10, module=batchnorm_net)(64)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UsageError, match=r"layer '1.1' \(BatchNorm2d\)"):
        train(
            model,
            x[:100],
            y[:100],
            epochs=1,
            batch_size=20,
            learning_rate=1.0,
            event=PrivacyEvent(1.0, 0.2, 5),
            max_grad_norm=1.0,
        )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 187), (2, 50), (1, 3, 3)])
def test_the_cnn_takes_images_and_signals_and_passes_opacus_validation(
    shape: tuple[int, ...],
) -> None:
    model = ArrayModelFn(shape, 5)(int(np.prod(shape)))
    check_dp_compatible(model)
    assert model(torch.rand(3, int(np.prod(shape)))).shape == (3, 5)
    assert build_cnn(shape, 2)(torch.rand(3, *shape)).shape == (3, 1)  # one logit, two classes


def test_dp_sgd_trains_the_digits_cnn(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    torch.manual_seed(0)
    model = ArrayModelFn((1, 8, 8), 10)(64)
    _, before = evaluate(model, x[1500:], y[1500:])
    train(
        model,
        x[:1500],
        y[:1500],
        epochs=1,
        batch_size=64,
        learning_rate=2.0,
        event=PrivacyEvent(0.8, 64 / 1500, 60),
        max_grad_norm=1.0,
    )
    _, after = evaluate(model, x[1500:], y[1500:])
    assert after > before + 0.3


def test_the_onnx_graph_takes_raw_images_in_their_declared_range() -> None:
    model = ArrayModelFn((1, 8, 8), 10)(64)
    onnx, served = export_array_onnx(model, (1, 8, 8), (0.0, 16.0))
    raw = np.random.default_rng(0).uniform(0, 16, (5, 1, 8, 8)).astype(np.float32)
    assert onnx_parity(served, onnx, raw).ok
    with torch.no_grad():
        flat = model(torch.from_numpy(raw.reshape(5, 64) / 16.0))
    assert np.allclose(served(torch.from_numpy(raw)).detach().numpy(), flat.numpy(), atol=1e-5)


def test_a_user_module_that_returns_no_module_is_refused() -> None:
    with pytest.raises(UsageError, match=r"returned int, not a torch.nn.Module"):
        ArrayModelFn((1, 8, 8), 10, module=lambda n: n)(64)
    with pytest.raises(UsageError, match=r"have 64 values, not 63"):
        ArrayModelFn((1, 8, 8), 10)(63)


def test_the_cnn_family_without_array_data_is_refused_in_one_line() -> None:
    from insitu.training import build_model

    with pytest.raises(UsageError, match=r"--model cnn takes array data"):
        build_model("cnn", 64)
