"""An image model served over HTTP: a batch of (N, 1, 8, 8) digits as an NPY body."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from insitu.serve import RunningServer, running
from insitu.training import ArrayModelFn, export_array_onnx, train
from tests.serve.conftest import Site, make_site


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images[:, None].astype(np.float32), data.target.astype(np.int64)


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, digits: tuple[np.ndarray, np.ndarray]
) -> Iterator[tuple[RunningServer, Site]]:
    images, labels = digits
    torch.manual_seed(0)
    model = ArrayModelFn((1, 8, 8), 10)(64)
    flat = images[:1500].reshape(1500, 64) / 16.0
    train(
        model, flat, labels[:1500], epochs=4, batch_size=32, learning_rate=0.2,
        event=None, max_grad_norm=1.0,
    )  # fmt: skip
    onnx, _ = export_array_onnx(model, (1, 8, 8), (0.0, 16.0))
    site = make_site(Path(tmp_path_factory.mktemp("images")) / "site", onnx, name="digits")
    with running(site.workspace) as srv:
        yield srv, site


def test_a_batch_of_images_is_predicted_from_an_npy_body(
    served: tuple[RunningServer, Site], digits: tuple[np.ndarray, np.ndarray]
) -> None:
    srv, _ = served
    images, labels = digits
    batch = images[1500:1600]
    buffer = io.BytesIO()
    np.save(buffer, batch)
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=30) as http:
        response = http.post(
            "/v1/models/digits/predict",
            content=buffer.getvalue(),
            headers={"content-type": "application/x-npy", "accept": "application/x-npy"},
        )
    assert response.status_code == 200, response.text
    logits = np.load(io.BytesIO(response.content))
    assert logits.shape == (100, 10)
    assert float((logits.argmax(1) == labels[1500:1600]).mean()) > 0.8


def test_an_image_of_the_wrong_shape_is_refused_in_one_line(
    served: tuple[RunningServer, Site],
) -> None:
    srv, _ = served
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 1, 28, 28), np.float32))
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=30) as http:
        response = http.post(
            "/v1/models/digits/predict",
            content=buffer.getvalue(),
            headers={"content-type": "application/x-npy"},
        )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "28" in detail
    assert "8" in detail
    assert "\n" not in detail


def test_occlusion_heat_map_lights_the_region_the_score_reads() -> None:
    from insitu.runtime import occlusion_map

    def predict(batch: np.ndarray) -> np.ndarray:  # class 1 reads the top-left 2x2 only
        score = batch[:, :, :2, :2].sum(axis=(1, 2, 3))
        return np.stack([np.zeros_like(score), score], axis=1)

    heat, target = occlusion_map(predict, np.ones((1, 8, 8), np.float32), patch=2)
    assert target == 1
    assert heat.shape == (8, 8)
    assert np.all(heat[:2, :2] == 4.0)
    assert heat.sum() == 16.0


def test_a_served_digit_is_explained_by_occlusion_over_the_onnx_graph(
    served: tuple[RunningServer, Site], digits: tuple[np.ndarray, np.ndarray]
) -> None:
    from insitu.runtime import occlusion_map

    srv, _ = served
    images, _labels = digits

    def predict(batch: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        np.save(buffer, batch)
        with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=30) as http:
            response = http.post(
                "/v1/models/digits/predict",
                content=buffer.getvalue(),
                headers={"content-type": "application/x-npy", "accept": "application/x-npy"},
            )
        return np.load(io.BytesIO(response.content))

    heat, target = occlusion_map(predict, images[1700], patch=2)
    assert heat.shape == (8, 8)
    assert target == int(predict(images[1700:1701]).argmax())
    assert heat.max() > 0  # hiding some region lowers the predicted digit's score
