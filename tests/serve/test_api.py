"""The HTTP API: auth, bad bodies, binary forms, fuzzing, hot swap, no plaintext on disk."""

from __future__ import annotations

import contextlib
import io
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import APIRouter, Request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insitu.serve import RunningServer, running
from tests.serve.conftest import Site, make_site

ROW = [0.25] * 8


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, mlp_models: tuple[bytes, bytes]
) -> Iterator[tuple[RunningServer, Site]]:
    site = make_site(tmp_path_factory.mktemp("api") / "site", mlp_models[0])
    background = np.random.default_rng(0).random((40, 8))
    router = APIRouter(prefix="/site")

    @router.get("/snapshot")
    def snapshot(request: Request) -> dict[str, object]:
        return dict(request.app.state.metrics.snapshot().to_json())

    with running(site.workspace, backgrounds={"mlp": (background, None)}, routers=[router]) as srv:
        yield srv, site


@pytest.fixture
def client(served: tuple[RunningServer, Site]) -> Iterator[httpx.Client]:
    srv, _ = served
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=30) as http:
        yield http


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_predict_json_npy_and_raw_agree(client: httpx.Client) -> None:
    rows = np.random.default_rng(1).random((5, 8)).astype(np.float32)
    as_json = client.post("/v1/models/mlp/predict", json={"inputs": rows.tolist()})
    as_npy = client.post(
        "/v1/models/mlp/predict",
        content=_npy(rows),
        headers={"content-type": "application/x-npy", "accept": "application/x-npy"},
    )
    as_raw = client.post(
        "/v1/models/mlp/predict",
        content=rows.tobytes(),
        headers={"content-type": "application/octet-stream", "x-insitu-shape": "-1,8"},
    )
    assert as_json.status_code == as_npy.status_code == as_raw.status_code == 200
    assert as_npy.headers["x-insitu-version"] == "1.0.0"
    from_json = np.array(as_json.json()["outputs"]["y"])
    np.testing.assert_allclose(np.load(io.BytesIO(as_npy.content)), from_json, rtol=1e-6)
    np.testing.assert_allclose(np.array(as_raw.json()["outputs"]["y"]), from_json, rtol=1e-6)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [({}, 401), ({"Authorization": "Bearer wrong-token-of-some-length"}, 401)],
)
def test_missing_or_wrong_token_is_401(
    served: tuple[RunningServer, Site], headers: dict[str, str], expected: int
) -> None:
    srv, _ = served
    for method, path in [
        ("GET", "/v1/models"),
        ("POST", "/v1/models/mlp/predict"),
        ("GET", "/metrics"),
        ("POST", "/v1/models/mlp/explain"),
    ]:
        response = httpx.request(method, srv.url + path, headers=headers, json={"inputs": [ROW]})
        assert response.status_code == expected, path
        assert "bearer token" in response.json()["detail"]
    assert httpx.get(srv.url + "/healthz").status_code == 200


@pytest.mark.parametrize(
    ("content", "headers", "status", "words"),
    [
        (b"{not json", {"content-type": "application/json"}, 400, "not valid JSON"),
        (b'{"rows": []}', {"content-type": "application/json"}, 422, '"inputs"'),
        (b'{"inputs": [[1, 2, 3]]}', {"content-type": "application/json"}, 422, "axis 1 must"),
        (b'{"inputs": [[1, 2], [3]]}', {"content-type": "application/json"}, 422, "equal length"),
        (
            b'{"inputs": [["a","b","c","d","e","f","g","h"]]}',
            {"content-type": "application/json"},
            422,
            "text",
        ),
        (
            b'{"inputs": [[NaN, 1, 1, 1, 1, 1, 1, 1]]}',
            {"content-type": "application/json"},
            422,
            "NaN or infinite",
        ),
        (
            b'{"inputs": [[Infinity, 1, 1, 1, 1, 1, 1, 1]]}',
            {"content-type": "application/json"},
            422,
            "NaN or infinite",
        ),
        (b'{"inputs": []}', {"content-type": "application/json"}, 422, "shape"),
        (
            np.ones((2, 8)).tobytes(),
            {
                "content-type": "application/octet-stream",
                "x-insitu-shape": "2,8",
                "x-insitu-dtype": "float64",
            },
            422,
            "float64",
        ),
        (
            np.ones((2, 8), np.float32).tobytes(),
            {"content-type": "application/octet-stream"},
            400,
            "X-Insitu-Shape",
        ),
        (
            np.ones((2, 8), np.float32).tobytes(),
            {"content-type": "application/octet-stream", "x-insitu-shape": "3,8"},
            400,
            "needs 24 values",
        ),
        (b"\x93NUMPY garbage", {"content-type": "application/x-npy"}, 400, ".npy"),
        (b"<xml/>", {"content-type": "application/xml"}, 415, "content type"),
    ],
)
def test_malformed_bodies_get_a_4xx_with_a_clear_message(
    client: httpx.Client, content: bytes, headers: dict[str, str], status: int, words: str
) -> None:
    response = client.post("/v1/models/mlp/predict", content=content, headers=headers)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_wrong_dtype_in_npy_is_refused(client: httpx.Client) -> None:
    response = client.post(
        "/v1/models/mlp/predict",
        content=_npy(np.ones((2, 8), dtype=np.int64).astype(np.float64)),
        headers={"content-type": "application/x-npy"},
    )
    assert response.status_code == 422
    assert "float32" in response.json()["detail"]


def test_oversize_requests_are_413_and_too_many_rows_422(client: httpx.Client) -> None:
    big = np.zeros((600_000, 8), dtype=np.float32).tobytes()  # 19 MB > 16 MiB
    response = client.post(
        "/v1/models/mlp/predict",
        content=big,
        headers={"content-type": "application/octet-stream", "x-insitu-shape": "-1,8"},
    )
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]
    rows = np.zeros((5000, 8), dtype=np.float32)
    response = client.post(
        "/v1/models/mlp/predict", content=_npy(rows), headers={"content-type": "application/x-npy"}
    )
    assert response.status_code == 422
    assert "1 to 4096 rows" in response.json()["detail"]


def test_unknown_model_is_404(client: httpx.Client) -> None:
    response = client.post("/v1/models/nope/predict", json={"inputs": [ROW]})
    assert response.status_code == 404
    assert "GET /v1/models" in response.json()["detail"]


def test_models_metrics_and_dashboard_router(client: httpx.Client) -> None:
    listed = client.get("/v1/models").json()["models"]
    assert [(m["name"], m["version"]) for m in listed] == [("mlp", "1.0.0")]
    assert client.post("/v1/models/mlp/predict", json={"inputs": [ROW]}).status_code == 200
    text = client.get("/metrics").text
    for name in (
        "insitu_requests_total",
        "insitu_request_seconds_bucket",
        "insitu_batch_rows",
        'insitu_model_info{model="mlp",version="1.0.0"} 1.0',
    ):
        assert name in text
    snapshot = client.get("/site/snapshot").json()
    assert snapshot["models"] == {"mlp": "1.0.0"}
    assert snapshot["latency_p50_ms"] > 0
    assert client.get("/docs").status_code == 200
    # The site dashboard (issue 10) is mounted and reads the server's live figures.
    page = client.get("/dashboard/")
    assert page.status_code == 200
    assert "mlp" in page.text


def test_explain_endpoint(client: httpx.Client) -> None:
    response = client.post("/v1/models/mlp/explain", json={"inputs": [ROW, ROW]})
    assert response.status_code == 200, response.text
    doc = response.json()
    values = np.array(doc["attributions"])
    assert values.shape == (2, 8)
    # SHAP's efficiency: base value plus attributions is the model's output.
    np.testing.assert_allclose(values.sum(axis=1) + doc["base_value"], doc["outputs"], atol=1e-4)
    too_many = client.post("/v1/models/mlp/explain", json={"inputs": [ROW] * 20})
    assert too_many.status_code == 422


def test_fuzzing_the_openapi_schema_finds_no_5xx(served: tuple[RunningServer, Site]) -> None:
    import schemathesis
    from schemathesis.generation.modes import GenerationMode

    srv, _ = served
    schema = schemathesis.openapi.from_dict(srv.app.openapi())
    strategies = [
        result.ok().as_strategy(generation_mode=mode)
        for result in schema.get_all_operations()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ]
    seen: set[int] = set()

    @settings(
        max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(case=st.one_of(strategies), authorized=st.booleans())
    def fuzz(case: object, authorized: bool) -> None:
        response = case.call(  # type: ignore[attr-defined]
            base_url=srv.url, headers=srv.headers if authorized else {}, timeout=30
        )
        seen.add(response.status_code)
        assert response.status_code < 500, (response.status_code, response.text)

    fuzz()
    assert 200 in seen, seen
    assert seen & {401, 404, 415, 422}, seen


def _plaintext_files(roots: list[Path], model: bytes) -> list[Path]:
    marker = model[-64:]  # the last initializer bytes: present in any plaintext copy
    found = []
    for root in roots:
        for path in root.rglob("*"):
            try:
                if path.is_file() and not path.is_symlink() and marker in path.read_bytes():
                    found.append(path)
            except OSError:
                continue
    return found


def test_no_plaintext_model_on_disk_while_serving_and_hot_swap_under_load(
    tmp_path: Path, mlp_models: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The process's temp directory is a fresh one, so that the scan sees what this
    # server writes (and not the rest of a shared machine's /tmp).
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    site = make_site(tmp_path / "site", mlp_models[0])
    roots = [site.workspace.home, Path(tempfile.gettempdir())]
    assert roots[1] == temp
    errors: list[str] = []
    versions: set[str] = set()
    stop = threading.Event()
    with running(site.workspace) as srv:

        def load(index: int) -> None:
            rows = np.full((1 + index, 8), 0.5, dtype=np.float32)
            with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=30) as http:
                while not stop.is_set():
                    try:
                        response = http.post(
                            "/v1/models/mlp/predict",
                            content=rows.tobytes(),
                            headers={
                                "content-type": "application/octet-stream",
                                "x-insitu-shape": "-1,8",
                            },
                        )
                        if response.status_code != 200:
                            errors.append(f"{response.status_code} {response.text}")
                        versions.add(response.headers.get("x-insitu-version", "?"))
                    except httpx.HTTPError as exc:
                        errors.append(repr(exc))

        threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        try:
            for _ in range(400):  # the clients are running on 1.0.0
                if "1.0.0" in versions:
                    break
                stop.wait(0.05)
            assert _plaintext_files(roots, mlp_models[0]) == []
            site.publish("1.1.0", mlp_models[1])
            assert site.update()["installed"] == "1.1.0"  # what 'insitu update' does
            for _ in range(400):
                if "1.1.0" in versions:
                    break
                stop.wait(0.05)
            assert _plaintext_files(roots, mlp_models[0]) == []
            assert _plaintext_files(roots, mlp_models[1]) == []
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert srv.snapshot().models == {"mlp": "1.1.0"}
    assert errors == []
    assert versions == {"1.0.0", "1.1.0"}
    with site.workspace.ledger() as ledger:
        loads = [e.payload for e in ledger.entries(event_type="inference.loaded")]
        counted = [e.payload for e in ledger.entries(event_type="inference.counted")]
    assert [(p["version"], p["reason"]) for p in loads] == [
        ("1.0.0", "first use"),
        ("1.1.0", "new version installed"),
    ]
    assert {p["version"] for p in counted} == {"1.0.0", "1.1.0"}
    assert all(
        set(p) == {"model", "version", "hour", "requests", "rows", "errors", "partial"}
        for p in counted
    )
    assert sum(p["errors"] for p in counted) == 0
    # The anonymous memory files the sessions were built from are all closed.
    assert _open_model_memfds() == []


def _open_model_memfds() -> list[str]:
    targets = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            targets.append(str(fd.readlink()))
    return [t for t in targets if "insitu-model" in t]
