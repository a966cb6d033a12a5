"""Local inference with ONNX Runtime (sessions are created only through this package)."""

from __future__ import annotations

from insitu.runtime._ort import create_session

__all__ = ["create_session"]
