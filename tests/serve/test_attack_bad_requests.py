"""Bad requests, from the attacker's side: every one is a 4xx, none allocates what it claims.

Three bodies used to answer 500 and drop the connection: an ``X-Insitu-Shape`` whose
size overflows int64 (``ValueError``), one too large to convert (``OverflowError``),
and an ``.npy`` header claiming a 447 GiB array (``MemoryError``, after NumPy tried to
allocate it). Slow clients were never cut off: uvicorn has no timeout for a request
head or a body. The server here runs with a 1 s timeout so that the slow clients are
cut quickly; a raw socket plays the client where httpx would be too polite.
"""

from __future__ import annotations

import io
import json
import select
import socket
import time
import tracemalloc
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insitu.serve import RunningServer, running
from insitu.serve._codec import BodyError, decode_inputs
from tests.serve.conftest import make_site

TIMEOUT = 1.0
ROW = [0.25] * 8
RAW = {"content-type": "application/octet-stream"}
NPY = {"content-type": "application/x-npy"}


@pytest.fixture(scope="module")
def srv(
    tmp_path_factory: pytest.TempPathFactory, mlp_models: tuple[bytes, bytes]
) -> Iterator[RunningServer]:
    site = make_site(tmp_path_factory.mktemp("bad") / "site", mlp_models[0])
    with running(site.workspace, dashboard=False, body_timeout=TIMEOUT) as server:
        yield server


@pytest.fixture
def client(srv: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=30) as http:
        yield http


def _npy_header(shape: tuple[int, ...], descr: object = "<f4", *, fortran: bool = False) -> bytes:
    """An ``.npy`` header as numpy.save writes it, declaring any shape at all."""
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": fortran, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def _head(srv: RunningServer, *lines: str, token: str | None = None) -> bytes:
    """A request head for ``/predict`` with the given extra header lines."""
    text = [
        "POST /v1/models/mlp/predict HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {token or srv.token}",
        "Content-Type: application/octet-stream",
        "X-Insitu-Shape: -1,8",
        *lines,
    ]
    return ("\r\n".join(text) + "\r\n\r\n").encode()


def _connect(srv: RunningServer) -> socket.socket:
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case) and body of the response on ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without answering ({data!r})"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection in the middle of its answer"
        body += chunk
    return int(status_line.split()[1]), headers, body


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (whatever it sent before)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def _still_answers(client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200
    response = client.post("/v1/models/mlp/predict", json={"inputs": [ROW]})
    assert response.status_code == 200, response.text


# -- The former 500s --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "headers", "words"),
    [
        pytest.param(
            b"",
            {**RAW, "x-insitu-shape": "4294967296,4294967296"},
            "X-Insitu-Shape '4294967296,4294967296' has a dimension of 4294967296",
            id="int64-overflow-ValueError",
        ),
        pytest.param(
            b"",
            {**RAW, "x-insitu-shape": "99999999999999999999,1"},
            "has a dimension of 99999999999999999999",
            id="too-large-to-convert-OverflowError",
        ),
        pytest.param(
            b"",
            {**RAW, "x-insitu-shape": "0,99999999999999999999"},
            "has a dimension of 99999999999999999999",
            id="zero-times-too-large",
        ),
        pytest.param(
            _npy_header((120_000_000_000,)),
            NPY,
            "the .npy array of shape (120000000000,) and dtype '<f4' has a dimension",
            id="npy-447-GiB-MemoryError",
        ),
    ],
)
def test_attack_former_500s_are_413_naming_the_problem_and_the_server_keeps_answering(
    client: httpx.Client, content: bytes, headers: dict[str, str], words: str
) -> None:
    response = client.post("/v1/models/mlp/predict", content=content, headers=headers)
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert words in detail
    assert "send fewer rows per request" in detail
    # The body was read whole: the connection stays open for the next request.
    assert response.headers.get("connection") != "close"
    _still_answers(client)


@pytest.mark.parametrize(
    ("content", "status", "words"),
    [
        (_npy_header((2, 8), "|O") + bytes(16), 400, "dtype '|O'"),
        (_npy_header((2, 8), "<U3") + bytes(192), 400, "send numbers"),
        (_npy_header((2, 8), [("a", "<f4")]) + bytes(64), 400, "send numbers"),
        (_npy_header((-1, 8)) + bytes(64), 400, "each >= 0"),
        (_npy_header((1000, 8)) + bytes(64), 400, "needs 32000 bytes after its header"),
        (_npy_header((2, 8)) + bytes(65), 400, "the body has 65"),
        (b"\x93NUMPY\x03\x00" + bytes(64), 400, "version 3.0"),
        (b"\x93NUMPY\x02\x00\xff\xff\xff\x7f{", 400, "not a valid .npy"),
        (b"PK\x03\x04" + bytes(64), 400, ".npz archive"),
    ],
)
def test_attack_hostile_npy_headers_are_4xx(
    client: httpx.Client, content: bytes, status: int, words: str
) -> None:
    response = client.post("/v1/models/mlp/predict", content=content, headers=NPY)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_npy_in_any_byte_order_and_layout_still_predicts(client: httpx.Client) -> None:
    rows = np.random.default_rng(2).random((3, 8)).astype(np.float32)
    expected = client.post("/v1/models/mlp/predict", json={"inputs": rows.tolist()}).json()
    for body in (
        _npy_header((3, 8), ">f4") + rows.astype(">f4").tobytes(),
        _npy_header((3, 8), fortran=True) + rows.tobytes(order="F"),
    ):
        response = client.post("/v1/models/mlp/predict", content=body, headers=NPY)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"] == expected["outputs"]


def test_attack_npy_header_claiming_a_huge_array_allocates_nothing(client: httpx.Client) -> None:
    # 1 GiB NumPy could allocate (np.load would have, before finding the body short),
    # and 447 GiB it could not.
    for shape in [(1 << 28,), (120_000_000_000,), (1 << 26, 8)]:
        body = _npy_header(shape) + bytes(64)
        tracemalloc.start()
        try:
            started = time.perf_counter()
            response = client.post("/v1/models/mlp/predict", content=body, headers=NPY)
            elapsed = time.perf_counter() - started
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert response.status_code == 413, response.text
        assert peak < 8 << 20, f"{peak} bytes allocated for a {shape} claim"
        assert elapsed < 1.0


# -- Any header, any body: a BodyError or an array no larger than the body ---------------


def _decoded(body: bytes, kind: str, headers: dict[str, str]) -> object:
    """What ``decode_inputs`` makes of ``body`` (a 1 KiB limit): its result or its error."""
    try:
        return decode_inputs(body, kind, headers, max_bytes=1024)
    except BodyError as exc:
        return exc


_DESCRS = ["<f4", ">f8", "|b1", "<i8", "|u1", "<f2", "|O", "<U2", "|S0", "|V0", "<M8[s]", "<c8"]
_dims = st.one_of(st.integers(-3, 40), st.integers(0, 1 << 70))


_FUZZ = settings(
    max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None
)


def _text_header(text: str) -> bytes:
    """An ``.npy`` version 1.0 header holding ``text`` as it is (any text at all)."""
    raw = text.encode("latin-1", errors="replace")[:1000] + b"\n"
    return b"\x93NUMPY\x01\x00" + len(raw).to_bytes(2, "little") + raw


@_FUZZ
@given(
    shape=st.lists(_dims, max_size=10).map(tuple),
    descr=st.one_of(st.sampled_from(_DESCRS), st.text(st.characters(max_codepoint=255))),
    fortran=st.booleans(),
    text=st.one_of(st.none(), st.text(max_size=80)),
    data=st.binary(max_size=200),
)
def test_attack_any_npy_header_is_a_body_error_or_an_array_the_body_holds(
    shape: tuple[int, ...], descr: str, fortran: bool, text: str | None, data: bytes
) -> None:
    header = _text_header(text) if text is not None else _npy_header(shape, descr, fortran=fortran)
    outcome = _decoded(header + data, "application/x-npy", {})
    if isinstance(outcome, BodyError):
        assert outcome.status in {400, 413}
        assert not outcome.unread
    else:
        assert isinstance(outcome, np.ndarray)
        assert outcome.nbytes == len(data)


@_FUZZ
@given(
    shape=st.one_of(
        st.lists(_dims, min_size=1, max_size=10).map(lambda d: ",".join(map(str, d))),
        st.text(max_size=40),
    ),
    dtype=st.one_of(
        st.sampled_from(["float32", "uint8", "float64", "object"]), st.text(max_size=8)
    ),
    data=st.binary(max_size=200),
    garbage=st.binary(max_size=200),
)
def test_attack_any_raw_shape_or_npy_body_is_a_body_error_or_an_array_the_body_holds(
    shape: str, dtype: str, data: bytes, garbage: bytes
) -> None:
    headers = {"x-insitu-shape": shape, "x-insitu-dtype": dtype}
    for kind, body in [
        ("application/octet-stream", data),
        ("application/x-npy", b"\x93NUMPY" + garbage),
        ("application/x-npy", garbage),
    ]:
        outcome = _decoded(body, kind, headers)
        if isinstance(outcome, BodyError):
            assert outcome.status in {400, 413}
        else:
            assert isinstance(outcome, np.ndarray)
            assert outcome.nbytes <= len(body)


# -- Too large: refused before the body is read ------------------------------------------


def test_attack_content_length_over_the_cap_is_413_before_any_body_byte(
    srv: RunningServer, client: httpx.Client
) -> None:
    with _connect(srv) as sock:
        started = time.monotonic()
        sock.sendall(_head(srv, f"Content-Length: {447 << 30}"))  # and never a body byte
        status, headers, body = _response(sock)
        elapsed = time.monotonic() - started
        assert status == 413
        assert elapsed < TIMEOUT / 2  # answered at once: the body was not waited for
        assert "the limit is 16777216" in json.loads(body)["detail"]
        assert headers["connection"] == "close"
        assert _closed_within(sock, TIMEOUT)
    _still_answers(client)


def test_attack_chunked_body_over_the_cap_is_cut_while_streaming(
    srv: RunningServer, client: httpx.Client
) -> None:
    sent = 0
    chunk = bytes(1 << 20)

    def endless() -> Iterator[bytes]:  # no Content-Length: chunked, 256 MiB offered
        nonlocal sent
        for _ in range(256):
            sent += len(chunk)
            yield chunk

    response = client.post("/v1/models/mlp/predict", content=endless(), headers=RAW)
    assert response.status_code == 413, response.text
    assert "exceeds the limit of 16777216 bytes" in response.json()["detail"]
    assert sent < 64 << 20, f"{sent >> 20} MiB sent before the answer"
    _still_answers(client)


# -- Too slow: cut off --------------------------------------------------------------------


def test_attack_slow_body_is_cut_with_408_within_the_timeout(
    srv: RunningServer, client: httpx.Client
) -> None:
    with _connect(srv) as sock:
        sock.sendall(_head(srv, "Content-Length: 32"))
        started = time.monotonic()
        dribbled = 0
        while not select.select([sock], [], [], 0.1)[0]:  # one byte every 0.1 s
            assert time.monotonic() - started < 5 * TIMEOUT, "never cut off"
            sock.sendall(b"\0")
            dribbled += 1
        status, headers, body = _response(sock)
        elapsed = time.monotonic() - started
        assert status == 408
        assert TIMEOUT <= elapsed < TIMEOUT + 1.5
        assert dribbled < 32
        assert "did not arrive within 1 s" in json.loads(body)["detail"]
        assert headers["connection"] == "close"
        assert _closed_within(sock, TIMEOUT)
    _still_answers(client)


def _dribble_until_closed(sock: socket.socket, data: bytes, seconds: float) -> float | None:
    """Send ``data`` a byte every 0.1 s; when the server closes the socket, how long it took."""
    started = time.monotonic()
    for byte in data:
        if time.monotonic() - started > seconds:
            return None
        try:
            if select.select([sock], [], [], 0.1)[0] and not sock.recv(65536):
                return time.monotonic() - started
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started
    return None


def test_attack_slow_or_missing_request_head_is_cut_within_the_timeout(
    srv: RunningServer, client: httpx.Client
) -> None:
    with _connect(srv) as idle:
        started = time.monotonic()
        assert _closed_within(idle, 3 * TIMEOUT)
        assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 1.5
    with _connect(srv) as slow:
        took = _dribble_until_closed(slow, _head(srv, "Content-Length: 0") * 4, 5 * TIMEOUT)
        assert took is not None, "a dribbled request head was never cut off"
        assert TIMEOUT <= took < TIMEOUT + 1.5
    _still_answers(client)


def test_attack_body_of_a_request_answered_early_is_not_drained_forever(
    srv: RunningServer, client: httpx.Client
) -> None:
    # A wrong token is answered at once; the body announced after it must not let the
    # client hold the connection by sending it a byte at a time.
    with _connect(srv) as sock:
        sock.sendall(_head(srv, "Content-Length: 1000000", token="x" * 32))
        status, _, _ = _response(sock)
        assert status == 401
        took = _dribble_until_closed(sock, bytes(1000), 5 * TIMEOUT)
        assert took is not None, "the server drained the body for ever"
        assert took < TIMEOUT + 1.5
    _still_answers(client)


def test_a_client_that_is_slow_between_requests_is_closed_but_not_failed(
    client: httpx.Client,
) -> None:
    # The head deadline re-arms after each response; a pooled connection closed by it
    # is replaced by httpx, and the requests on either side of the pause succeed.
    _still_answers(client)
    time.sleep(TIMEOUT + 0.5)
    _still_answers(client)
