"""Image files through the real server: uploads predicted and explained as heat maps.

The digits CNN is published with its array schema in the signed card (shape (1, 8, 8),
values 0 to 16, classes "0" to "9"), installed by an update and served on loopback. An
uploaded PNG must give the prediction its values give; its explanation is an occlusion
map over the ONNX session, as JSON or as a PNG heat map; every bad upload is one 4xx
line.
"""

from __future__ import annotations

import io
import json
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from insitu.bundle import ModelCard, create_bundle, schema_of
from insitu.errors import InvalidInputError, MissingDependencyError, UnreadableImageError
from insitu.runtime import ImageInput, ModelRuntime, explain_image, heat_map_png
from insitu.serve import RunningServer, running
from insitu.training import ArrayModelFn, export_array_onnx, train
from tests.serve.conftest import Site, make_site

PREDICT = "/v1/models/digits/predict"
EXPLAIN = "/v1/models/digits/explain"
DIGITS_SCHEMA: dict[str, Any] = {
    "dataset": {"name": "digits", "kind": "images", "label": "y"},
    "arrays": {
        "x": "x",
        "shape": [1, 8, 8],
        "value_range": [0, 16],
        "label_names": [str(d) for d in range(10)],
    },
    "consent": {"required": False, "legal_basis": "public data set"},
}


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images[:, None].astype(np.float32), data.target.astype(np.int64)


def publish_with_schema(site: Site, version: str, onnx: bytes) -> None:
    """Publish ``onnx`` as 'digits' with the array schema in its signed card; install it."""
    inputs, outputs = schema_of(onnx)
    card = ModelCard(
        name="digits",
        version=version,
        inputs=inputs,
        outputs=outputs,
        drift_reference={"schema": DIGITS_SCHEMA},
    )
    recipients = [site.workspace.encryption_public_key, site.publisher_enc.public_key()]
    blob = create_bundle(onnx, card, site.publisher, recipients=recipients)
    site.sim.repo.publish(blob, publisher_key=site.publisher_enc)
    assert site.update()["installed"] == version


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
    site = make_site(Path(tmp_path_factory.mktemp("uploads")) / "site", onnx, name="digits")
    publish_with_schema(site, "1.1.0", onnx)
    with running(site.workspace, dashboard=False) as srv:
        yield srv, site


@pytest.fixture
def http(served: tuple[RunningServer, Site]) -> Iterator[httpx.Client]:
    srv, _ = served
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=60) as client:
        yield client


def png_of(record: np.ndarray, *, high: float = 16.0, mode: str = "L") -> bytes:
    """A record (1, H, W) in [0, high] as an 8-bit PNG (or JPEG for mode 'RGB')."""
    pixels = np.round(np.clip(record[0] / high, 0, 1) * 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if mode == "L" else "JPEG", quality=95)
    return buffer.getvalue()


def npy_logits(http: httpx.Client, batch: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    np.save(buffer, batch.astype(np.float32))
    response = http.post(
        PREDICT,
        content=buffer.getvalue(),
        headers={"content-type": "application/x-npy", "accept": "application/x-npy"},
    )
    assert response.status_code == 200, response.text
    logits: np.ndarray = np.load(io.BytesIO(response.content))
    return logits


def test_a_digit_png_uploaded_as_a_form_field_is_predicted_as_its_values_are(
    http: httpx.Client, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = digits
    record = images[1700]
    response = http.post(PREDICT, files={"image": ("digit.png", png_of(record), "image/png")})
    assert response.status_code == 200, response.text
    doc = response.json()
    logits = np.array(doc["outputs"][next(iter(doc["outputs"]))])
    # The PNG holds the values to within half a grey level of 16/255.
    decoded = np.round(record / 16 * 255) / 255 * 16
    assert np.allclose(logits, npy_logits(http, decoded[None]), atol=1e-4)
    assert doc["classes"] == [str(d) for d in range(10)]
    predicted = doc["predictions"][0]
    assert predicted["label"] == str(int(logits.argmax()))
    assert predicted["label"] == str(labels[1700])
    assert sum(predicted["probabilities"]) == pytest.approx(1.0)


def test_a_raw_png_and_an_rgb_jpeg_body_are_predicted(
    http: httpx.Client, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = digits
    raw = http.post(PREDICT, content=png_of(images[1701]), headers={"content-type": "image/png"})
    jpeg = http.post(
        PREDICT,
        content=png_of(images[1701], mode="RGB"),
        headers={"content-type": "image/jpeg"},
    )
    for response in (raw, jpeg):
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] == str(labels[1701])


def test_a_digit_is_explained_by_occlusion_over_the_onnx_session(
    http: httpx.Client, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = digits
    response = http.post(EXPLAIN, files={"image": ("digit.png", png_of(images[1700]))})
    assert response.status_code == 200, response.text
    doc = response.json()
    heat = np.array(doc["attributions"])
    assert heat.shape == (8, 8)  # one value per pixel
    assert doc["method"] == "occlusion"
    assert doc["patch"] == 2
    assert doc["baseline"] == 0.0  # the low end of the declared range
    assert doc["label"] == str(doc["class"])
    decoded = np.round(images[1700] / 16 * 255) / 255 * 16
    assert doc["class"] == int(npy_logits(http, decoded[None]).argmax())
    assert heat.max() > 0  # hiding some region lowers the predicted digit's score
    # The same record's values as NPY explain the same way.
    buffer = io.BytesIO()
    np.save(buffer, decoded[None].astype(np.float32))
    by_values = http.post(
        EXPLAIN, content=buffer.getvalue(), headers={"content-type": "application/x-npy"}
    )
    assert by_values.status_code == 200, by_values.text
    assert np.allclose(by_values.json()["attributions"], heat, atol=1e-5)


@pytest.mark.parametrize(
    ("query", "accept"), [("?format=png", "*/*"), ("", "image/png")], ids=["query", "accept"]
)
def test_a_digit_heat_map_is_a_png_with_the_image_aspect(
    http: httpx.Client, digits: tuple[np.ndarray, np.ndarray], query: str, accept: str
) -> None:
    images, _ = digits
    response = http.post(
        EXPLAIN + query,
        content=png_of(images[1700]),
        headers={"content-type": "image/png", "accept": accept},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as picture:
        picture.load()
        assert picture.format == "PNG"
        width, height = picture.size
        pixels = np.asarray(picture.convert("RGB"))
    # An 8x8 image enlarged 32 times (256 x 256), then the 64-pixel colour scale.
    assert (width - 64, height) == (256, 256)
    assert (width - 64) * 8 == height * 8  # the image part keeps the 8x8 aspect
    drawn = pixels[:, :256].astype(int)
    assert (drawn[..., 0] - drawn[..., 2]).max() > 50  # red where a region mattered
    assert response.headers["x-insitu-class"].isdigit()


def test_an_image_of_another_size_is_refused_unless_resize_is_asked(
    http: httpx.Client, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = digits
    big = np.kron(images[1702], np.ones((1, 4, 4)))  # 32 x 32
    refused = http.post(PREDICT, files={"image": ("digit.png", png_of(big))})
    assert refused.status_code == 422
    detail = refused.json()["detail"]
    assert "32x32" in detail
    assert "8x8" in detail
    assert "resize=true" in detail
    assert "\n" not in detail
    resized = http.post(PREDICT + "?resize=true", files={"image": ("digit.png", png_of(big))})
    assert resized.status_code == 200, resized.text
    assert resized.json()["predictions"][0]["label"] == str(labels[1702])
    explained = http.post(
        EXPLAIN + "?resize=true&format=png", files={"image": ("d.png", png_of(big))}
    )
    assert explained.status_code == 200, explained.text


@pytest.mark.parametrize(
    ("body", "content_type", "names"),
    [
        (b"these are not the pixels you are looking for", "image/png", "not a readable PNG"),
        (b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "image/png", "not a readable PNG"),
        (None, "image/png", "not a readable PNG"),  # a truncated PNG
    ],
    ids=["text", "gif", "truncated"],
)
def test_a_body_that_is_not_a_png_or_jpeg_is_refused_in_one_line(
    http: httpx.Client,
    digits: tuple[np.ndarray, np.ndarray],
    body: bytes | None,
    content_type: str,
    names: str,
) -> None:
    if body is None:
        noisy = np.random.default_rng(0).uniform(0, 16, (1, 8, 8))
        body = png_of(noisy)[:-30]  # the IDAT chunk is cut short
    for path in (PREDICT, EXPLAIN):
        response = http.post(path, content=body, headers={"content-type": content_type})
        assert response.status_code == 400, response.text
        detail = response.json()["detail"]
        assert names in detail
        assert "\n" not in detail


def bomb_png(side: int) -> bytes:
    """A valid grey PNG of ``side`` x ``side`` black pixels: huge decoded, tiny on the wire."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit grey
    packer = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0, then the row
    rows_per_piece = max(1, (1 << 20) // len(row))
    piece = row * rows_per_piece
    pieces = [packer.compress(piece) for _ in range(side // rows_per_piece)]
    pieces.append(packer.compress(row * (side % rows_per_piece)))
    pieces.append(packer.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(pieces))
        + chunk(b"IEND", b"")
    )


def test_attack_decompression_bomb_upload_is_refused(http: httpx.Client) -> None:
    bomb = bomb_png(20_000)  # 400 million pixels (400 MB decoded) in a few hundred KB
    assert len(bomb) < 1 << 20
    for path in (PREDICT, EXPLAIN):
        response = http.post(path, files={"image": ("bomb.png", bomb, "image/png")})
        assert response.status_code == 413, response.text
        detail = response.json()["detail"]
        assert "pixels" in detail
        assert "\n" not in detail
    # One just over insitu's own limit (and under Pillow's) is refused from its header too.
    response = http.post(PREDICT, content=bomb_png(4200), headers={"content-type": "image/png"})
    assert response.status_code == 413, response.text
    assert "4200x4200" in response.json()["detail"]
    assert http.get("/v1/models").status_code == 200  # the server is still there


def form(boundary: str, *parts: tuple[str, bytes]) -> bytes:
    out = b""
    for name, content in parts:
        out += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
            ).encode()
            + content
            + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize(
    ("body", "content_type", "names"),
    [
        (
            form("b0und", ("image", b"a"), ("image", b"b")),
            "multipart/form-data; boundary=b0und",
            "the form has 2 fields",
        ),
        (form("b0und", ("image", b"a")), "multipart/form-data", "no valid boundary"),
        (form("b0und", ("picture", b"a")), "multipart/form-data; boundary=b0und", "'picture'"),
        (
            form("b0und", ("image", b"a"))[:-12],
            "multipart/form-data; boundary=b0und",
            "not closed by its boundary",
        ),
        (form("b0und", ("image", b"a")), "multipart/form-data; boundary=other", "start with"),
    ],
    ids=["two-fields", "no-boundary", "other-name", "unclosed", "wrong-boundary"],
)
def test_a_form_that_is_not_one_image_field_is_refused(
    http: httpx.Client, body: bytes, content_type: str, names: str
) -> None:
    for path in (PREDICT, EXPLAIN):
        response = http.post(path, content=body, headers={"content-type": content_type})
        assert response.status_code == 400, response.text
        detail = response.json()["detail"]
        assert names in detail
        assert "image" in detail  # names what to send
        assert "\n" not in detail


def test_a_form_from_a_browser_like_client_is_read(
    http: httpx.Client, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = digits
    boundary = "----WebKitFormBoundary7MA4YWxkTrZu0gW"
    body = form(boundary, ("image", png_of(images[1703])))
    response = http.post(
        PREDICT,
        content=body,
        headers={"content-type": f'multipart/form-data; boundary="{boundary}"'},
    )
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == str(labels[1703])


def test_an_upload_without_pillow_is_one_line_naming_the_package(
    http: httpx.Client, digits: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    images, _ = digits
    upload = png_of(images[1700])
    monkeypatch.setitem(sys.modules, "PIL", None)  # a device install: no Pillow
    response = http.post(PREDICT, files={"image": ("digit.png", upload)})
    assert response.status_code == 501
    detail = response.json()["detail"]
    assert "pip install pillow" in detail
    assert "NPY" in detail
    monkeypatch.undo()
    buffer = io.BytesIO()
    np.save(buffer, images[1700:1701])
    ok = http.post(
        PREDICT, content=buffer.getvalue(), headers={"content-type": "application/x-npy"}
    )
    assert ok.status_code == 200


def test_the_python_api_writes_the_heat_map_to_a_file(
    served: tuple[RunningServer, Site], digits: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    _, site = served
    images, _ = digits
    with ModelRuntime.for_workspace(site.workspace) as runtime:
        model = runtime.get("digits")
        described = ImageInput.from_card(model.card)
        assert described is not None
        assert (described.channels, described.height, described.width) == (1, 8, 8)
        assert described.value_range == (0.0, 16.0)
        record = described.decode(png_of(images[1700]))[0]
        explanation = explain_image(model, record, patch=1)
        path = explanation.save(tmp_path / "digit-heat.png")
    assert explanation.heat.shape == (8, 8)
    assert len(np.unique(explanation.heat)) > 16  # patch 1: a value of its own per pixel
    with Image.open(path) as picture:
        assert picture.size == (256 + 64, 256)
    assert json.dumps(explanation.to_json())  # what /explain returns


def test_image_errors_are_raised_as_their_classes() -> None:
    card = ModelCard(
        name="digits",
        version="1.0.0",
        inputs=[{"name": "features", "type": "float", "shape": ["batch", 1, 8, 8]}],
        outputs=[{"name": "logits", "type": "float", "shape": ["batch", 10]}],
    )
    described = ImageInput.from_card(card)
    assert described is not None
    with pytest.raises(InvalidInputError, match="declares no value range"):
        described.decode(png_of(np.zeros((1, 8, 8))))
    ranged = ImageInput("digits", "features", 1, 8, 8, (0.0, 16.0), None)
    with pytest.raises(UnreadableImageError, match="not a readable PNG or JPEG"):
        ranged.decode(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UnreadableImageError, match="over the limit of 63"):
        ranged.decode(png_of(np.zeros((1, 8, 8))), max_pixels=63)
    with pytest.raises(InvalidInputError, match="a record \\(C, H, W\\) and a map"):
        heat_map_png(np.zeros((1, 8, 8)), np.zeros((4, 4)))
    tabular = ModelCard(
        name="mlp",
        version="1.0.0",
        inputs=[{"name": "x", "type": "float", "shape": ["batch", 8]}],
        outputs=[{"name": "y", "type": "float", "shape": ["batch", 1]}],
    )
    assert ImageInput.from_card(tabular) is None


def test_images_without_pillow_raise_missing_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)
    ranged = ImageInput("digits", "features", 1, 8, 8, (0.0, 16.0), None)
    with pytest.raises(MissingDependencyError, match="pip install pillow"):
        ranged.decode(b"\x89PNG")


def test_fuzzing_an_image_model_finds_no_5xx(served: tuple[RunningServer, Site]) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.generation.modes import GenerationMode

    srv, _ = served
    schema = schemathesis.openapi.from_dict(srv.app.openapi())
    strategies = [
        result.ok().as_strategy(generation_mode=mode)
        for result in schema.get_all_operations()
        if result.ok().path.endswith(("/predict", "/explain"))
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ]
    seen: set[int] = set()

    @settings(
        max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(case=st.one_of(strategies))
    def fuzz(case: Any) -> None:
        case.path_parameters = {"name": "digits"}  # the image model, not a random name
        response = case.call(base_url=srv.url, headers=srv.headers, timeout=60)
        seen.add(response.status_code)
        assert response.status_code < 500, (response.status_code, response.text)

    fuzz()
    assert seen & {400, 415, 422}, seen


def test_a_signal_is_explained_by_occlusion_along_its_length() -> None:
    from insitu.runtime import InputSpec, LoadedModel, create_session

    torch.manual_seed(0)
    onnx, _ = export_array_onnx(ArrayModelFn((1, 32), 3)(32), (1, 32), (-1.0, 1.0))
    inputs, outputs = schema_of(onnx)
    card = ModelCard(name="ecg", version="1.0.0", inputs=inputs, outputs=outputs)
    spec = InputSpec(str(inputs[0]["name"]), np.dtype(np.float32), (None, 1, 32))
    model = LoadedModel(
        name="ecg", version="1.0.0", bundle_id="b", card=card, session=create_session(onnx),
        token=None, size=len(onnx), inputs=[spec], output_names=[o["name"] for o in outputs],
    )  # fmt: skip
    signal = np.sin(np.linspace(0, 6, 32, dtype=np.float32))[None]
    explanation = explain_image(model, signal, patch=4)
    assert explanation.heat.shape == (32,)
    assert explanation.baseline == 0.0  # the card declares no range: zeros hide a region
    assert explanation.label is None
    assert 0 <= explanation.target < 3
    with pytest.raises(InvalidInputError, match="patch 40 is outside"):
        explain_image(model, signal, patch=40)
