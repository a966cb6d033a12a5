"""Request bodies of ``/predict`` and ``/explain``: JSON, NPY, or raw little-endian values.

JSON parsing costs more than the model for small tabular models, so two binary forms
are accepted beside JSON:

* ``application/x-npy``: a NumPy ``.npy`` file (shape and dtype in its own header;
  read with ``allow_pickle=False``, so it can never carry objects);
* ``application/octet-stream``: raw little-endian values, with the shape in the
  ``X-Insitu-Shape`` header (``32,14``; ``-1`` for the batch axis is allowed) and the
  dtype in ``X-Insitu-Dtype`` (default ``float32``).

Every failure is a :class:`BodyError` carrying the HTTP status and one clear line.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

__all__ = ["BINARY_DTYPES", "BodyError", "decode_inputs", "encode_npy"]

BINARY_DTYPES = {"float32", "float64", "int64", "int32", "uint8", "float16"}
_MAX_DIMS = 8


class BodyError(Exception):
    """A request body that cannot be read; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _shape(header: str | None, size: int, itemsize: int) -> tuple[int, ...]:
    if not header:
        raise BodyError(
            400, "a raw body needs the X-Insitu-Shape header, e.g. 'X-Insitu-Shape: 32,14'"
        )
    try:
        dims = [int(part) for part in header.split(",")]
    except ValueError:
        raise BodyError(400, f"X-Insitu-Shape {header!r} is not comma-separated integers") from None
    if not 1 <= len(dims) <= _MAX_DIMS or dims.count(-1) > 1 or any(d < -1 for d in dims):
        raise BodyError(400, f"X-Insitu-Shape {header!r} is not a valid shape")
    known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
    count, rest = divmod(size, itemsize)
    if rest:
        raise BodyError(400, f"a raw body of {size} bytes is not a whole number of values")
    if -1 in dims:
        if known == 0 or count % known:
            raise BodyError(400, f"{count} values do not fit X-Insitu-Shape {header!r}")
        dims[dims.index(-1)] = count // known
    elif known != count:
        raise BodyError(
            400, f"X-Insitu-Shape {header!r} needs {known} values, the body has {count}"
        )
    return tuple(dims)


def decode_inputs(body: bytes, content_type: str, headers: Any) -> Any:
    """The ``inputs`` of a request body: a nested list, an array, or a mapping of them."""
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
        try:
            array = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError, TypeError) as exc:
            raise BodyError(400, f"the body is not a valid .npy array ({exc})") from None
        if not isinstance(array, np.ndarray):
            raise BodyError(400, "the body is an .npz archive; send one .npy array")
        return array
    if kind == "application/octet-stream":
        dtype_name = (headers.get("x-insitu-dtype") or "float32").strip().lower()
        if dtype_name not in BINARY_DTYPES:
            raise BodyError(
                400,
                f"X-Insitu-Dtype {dtype_name!r} is not one of {', '.join(sorted(BINARY_DTYPES))}",
            )
        dtype = np.dtype(dtype_name).newbyteorder("<")
        shape = _shape(headers.get("x-insitu-shape"), len(body), dtype.itemsize)
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
