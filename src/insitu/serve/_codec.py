"""Request bodies of ``/predict`` and ``/explain``: JSON, NPY, or raw little-endian values.

JSON parsing costs more than the model for small tabular models, so two binary forms
are accepted beside JSON:

* ``application/x-npy``: a NumPy ``.npy`` file (shape and dtype in its own header;
  read with ``allow_pickle=False``, so it can never carry objects);
* ``application/octet-stream``: raw little-endian values, with the shape in the
  ``X-Insitu-Shape`` header (``32,14``; ``-1`` for the batch axis is allowed) and the
  dtype in ``X-Insitu-Dtype`` (default ``float32``).

Every failure is a :class:`BodyError` carrying the HTTP status and one clear line.

The body is hostile until proven otherwise, so nothing is allocated from what it
*claims*: :func:`read_body` stops at :data:`MAX_BODY_BYTES` (a Content-Length above it
is refused before a byte is read) and at :data:`BODY_TIMEOUT` (a client that dribbles
its body is cut off with 408, since uvicorn has no such timeout); a shape, from the
``X-Insitu-Shape`` header or an ``.npy`` header (parsed with NumPy's own header reader,
never ``np.load``), is checked dimension by dimension and against the bytes actually
received before any array exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import tokenize
from collections.abc import AsyncGenerator
from typing import Any

import numpy as np
from numpy.lib import format as npy_format
from starlette.requests import ClientDisconnect

__all__ = [
    "BINARY_DTYPES",
    "BODY_TIMEOUT",
    "MAX_BODY_BYTES",
    "BodyError",
    "decode_inputs",
    "encode_npy",
    "read_body",
]

#: The largest request body read, in bytes (16 MiB; 413 beyond). Half a million rows
#: of 8 float32 features: far above any model's ``max_rows`` (4096 by default), and
#: small enough that a few concurrent requests cannot exhaust an edge device's memory.
#: ``create_app(max_body_bytes=...)`` overrides it.
MAX_BODY_BYTES = 16 << 20
#: Seconds a client has to send its whole body once its headers arrived (408 after,
#: and the connection is closed). 16 MiB takes milliseconds on loopback and seconds on
#: a slow network; a slowloris client holds a connection for at most this long.
#: ``create_app(body_timeout=...)`` overrides it.
BODY_TIMEOUT = 30.0

BINARY_DTYPES = {"float32", "float64", "int64", "int32", "uint8", "float16"}
_MAX_DIMS = 8
_NPY_KINDS = "biuf"  # bool, signed, unsigned, floating: what a model can take
# What NumPy's header reader raises on a malformed header: TokenError from its fallback
# for Python 2 headers; warnings (that fallback, deprecated dtype aliases such as 'a')
# when warnings are errors, as in the tests.
_NPY_HEADER_ERRORS = (
    tokenize.TokenError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    SyntaxError,
    RecursionError,
    EOFError,
    Warning,
)


class BodyError(Exception):
    """A request body that cannot be read; ``status`` is the HTTP status to answer.

    ``unread``: the error came before the end of the body (too large, too slow), so the
    connection is closed after the answer rather than drained.
    """

    def __init__(self, status: int, message: str, *, unread: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.unread = unread


async def read_body(
    chunks: AsyncGenerator[bytes, None],
    content_length: str | None,
    *,
    max_bytes: int = MAX_BODY_BYTES,
    timeout: float = BODY_TIMEOUT,
) -> bytes:
    """The whole body from ``chunks`` (``request.stream()``), bounded in size and time.

    At most ``max_bytes``, all of it within ``timeout`` seconds of the first read.

    Raises:
        BodyError: 413 when ``content_length`` (the header) or the bytes received go over
            ``max_bytes``, before reading further; 408 when the body is not complete in
            time; 400 when the client disconnects before the end of its body.

    """
    if content_length is not None:
        declared = content_length.strip()
        # Compare lengths first: int() of thousands of digits is itself refused.
        if declared.isdigit() and (
            len(declared) > len(str(max_bytes)) or int(declared) > max_bytes
        ):
            raise BodyError(
                413,
                f"the body is {_amount(declared)} bytes; the limit is {max_bytes}: send "
                "fewer rows per request",
                unread=True,
            )
    parts: list[bytes] = []
    size = 0
    try:
        async with contextlib.aclosing(chunks), asyncio.timeout(timeout):
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise BodyError(
                        413,
                        f"the body exceeds the limit of {max_bytes} bytes: send fewer rows "
                        "per request",
                        unread=True,
                    )
                parts.append(chunk)
    except TimeoutError:
        raise BodyError(
            408,
            f"the body did not arrive within {timeout:g} s ({size} bytes received); send "
            "the whole body at once, right after the headers",
            unread=True,
        ) from None
    except ClientDisconnect:
        raise BodyError(
            400, "the client closed the connection before the end of the body"
        ) from None
    return b"".join(parts)


def _amount(digits: str) -> str:
    """``digits`` for a message: a number of thousands of digits is shortened."""
    return digits if len(digits) <= 24 else f"{digits[:6]}...({len(digits)} digits)"


def _check_dims(dims: tuple[int, ...], itemsize: int, limit: int, what: str) -> int:
    """The number of values of shape ``dims``, refused (413) beyond ``limit`` bytes.

    Python integers throughout: no product can overflow on the way.
    """
    most = limit // itemsize
    big = [d for d in dims if d > most]
    if big:
        raise BodyError(
            413,
            f"{what} has a dimension of {_amount(str(big[0]))}; at most {most} values fit "
            f"the limit of {limit} bytes: send fewer rows per request",
        )
    count = math.prod(d for d in dims if d != -1)
    if count * itemsize > limit:
        raise BodyError(
            413,
            f"{what} needs {count * itemsize} bytes, over the limit of {limit}: send fewer "
            "rows per request",
        )
    return count


def _shape(header: str | None, size: int, itemsize: int, limit: int) -> tuple[int, ...]:
    if not header:
        raise BodyError(
            400, "a raw body needs the X-Insitu-Shape header, e.g. 'X-Insitu-Shape: 32,14'"
        )
    shown = f"X-Insitu-Shape {header[:80]!r}"
    try:
        dims = [int(part) for part in header.split(",")]
    except ValueError:
        raise BodyError(400, f"{shown} is not comma-separated integers, e.g. 32,14") from None
    if not 1 <= len(dims) <= _MAX_DIMS or dims.count(-1) > 1 or any(d < -1 for d in dims):
        raise BodyError(
            400,
            f"{shown} is not a valid shape: 1 to {_MAX_DIMS} dimensions, each >= 0 "
            "(or one -1 for the batch axis)",
        )
    known = _check_dims(tuple(dims), itemsize, limit, shown)
    count, rest = divmod(size, itemsize)
    if rest:
        raise BodyError(400, f"a raw body of {size} bytes is not a whole number of values")
    if -1 in dims:
        if known == 0 or count % known:
            raise BodyError(400, f"{count} values do not fit {shown}")
        dims[dims.index(-1)] = count // known
    elif known != count:
        raise BodyError(400, f"{shown} needs {known} values, the body has {count}")
    return tuple(dims)


def _npy_header(stream: io.BytesIO) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """Shape, Fortran order and dtype from the header of an ``.npy`` body."""
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise BodyError(
                400,
                f"an .npy body of format version {version[0]}.{version[1]} is not accepted; "
                "write a numeric array with numpy.save (version 1.0 or 2.0)",
            )
    except _NPY_HEADER_ERRORS as exc:
        raise BodyError(
            400, f"the body is not a valid .npy array ({str(exc)[:200]}); write it with numpy.save"
        ) from None
    return shape, fortran, dtype


def _npy(body: bytes, limit: int) -> np.ndarray:
    """The array of an ``.npy`` body, its header checked before anything is allocated."""
    if body.startswith(b"PK\x03\x04"):
        raise BodyError(400, "the body is an .npz archive; send one .npy array (numpy.save)")
    stream = io.BytesIO(body)
    shape, fortran, dtype = _npy_header(stream)
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in _NPY_KINDS:
        raise BodyError(
            400,
            f"the .npy array has dtype {dtype.str!r}; send numbers (bool, int, uint or "
            "float; objects are never unpickled)",
        )
    shown = repr(shape) if len(repr(shape)) <= 80 else f"{repr(shape)[:76]}...)"
    if len(shape) > _MAX_DIMS or any(d < 0 for d in shape):
        raise BodyError(
            400, f"the .npy shape {shown} is not valid: at most {_MAX_DIMS} dimensions, each >= 0"
        )
    what = f"the .npy array of shape {shown} and dtype {dtype.str!r}"
    count = _check_dims(shape, dtype.itemsize, limit, what)
    data = memoryview(body)[stream.tell() :]
    if len(data) != count * dtype.itemsize:
        raise BodyError(
            400,
            f"{what} needs {count * dtype.itemsize} bytes after its header; the body has "
            f"{len(data)}: write it with numpy.save",
        )
    flat = np.frombuffer(data, dtype=dtype, count=count)
    array = flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def decode_inputs(
    body: bytes, content_type: str, headers: Any, *, max_bytes: int = MAX_BODY_BYTES
) -> Any:
    """The ``inputs`` of a request body: a nested list, an array, or a mapping of them.

    A shape declared in a header (``X-Insitu-Shape``, the ``.npy`` header) is refused
    with 413 when it needs more than ``max_bytes`` (or the body, when larger: it was
    accepted when read) and with 400 when it does not match the body.
    """
    limit = max(max_bytes, len(body))
    kind = content_type.split(";", 1)[0].strip().lower() or "application/json"
    if kind == "application/json":
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise BodyError(400, f"the body is not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or "inputs" not in doc:
            raise BodyError(
                422, 'the JSON body must be an object with "inputs": [[...], ...] (rows of numbers)'
            )
        inputs = doc["inputs"]
        if not isinstance(inputs, list | dict):
            raise BodyError(422, '"inputs" must be an array of rows, or an object of such arrays')
        return inputs
    if kind == "application/x-npy":
        return _npy(body, limit)
    if kind == "application/octet-stream":
        dtype_name = (headers.get("x-insitu-dtype") or "float32").strip().lower()
        if dtype_name not in BINARY_DTYPES:
            raise BodyError(
                400,
                f"X-Insitu-Dtype {dtype_name!r} is not one of {', '.join(sorted(BINARY_DTYPES))}",
            )
        dtype = np.dtype(dtype_name).newbyteorder("<")
        shape = _shape(headers.get("x-insitu-shape"), len(body), dtype.itemsize, limit)
        return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    raise BodyError(
        415,
        f"content type {kind!r} is not accepted; send application/json, application/x-npy, "
        "or application/octet-stream with X-Insitu-Shape",
    )


def encode_npy(array: np.ndarray) -> bytes:
    """``array`` as ``.npy`` bytes."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()
