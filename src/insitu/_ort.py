"""The one place insitu creates ONNX Runtime sessions.

ONNX Runtime's Linux wheel carries Microsoft's 1DS telemetry: on by default, it writes a
device id and an event database under ``~/.cache/Microsoft/DeveloperTools/.onnxruntime``
at the first session. ``ORT_DISABLE_TELEMETRY=1`` (forced by ``insitu/__init__``) stops
it; :func:`create_session` also calls ``disable_telemetry_events()`` in case the
variable was read before insitu was imported, and refuses to run if the variable has
been changed since. A test creates a session with an empty ``HOME`` and checks that
nothing appears there.
"""

from __future__ import annotations

import os
from typing import Any

from insitu import _privacy_env
from insitu.errors import InsituError

__all__ = ["create_session"]


def create_session(
    model: bytes | str, *, intra_op_threads: int | None = None, spinning: bool = True
) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU for a serialized model, telemetry off.

    ``model`` is the serialized model, or a path to one (``insitu.bundle`` passes the
    path of an in-memory file holding a decrypted model).

    ``intra_op_threads`` defaults to the number of cores (ONNX Runtime's own default
    also spins inter-op threads that a small edge box cannot spare). ``spinning=False``
    makes idle intra-op threads sleep rather than spin: a server shares its cores with
    its HTTP event loop, and spinning workers take them from it (ADR 0502).
    """
    for name, value in _privacy_env.NO_TELEMETRY_ENV.items():
        if os.environ.get(name) != value:
            raise InsituError(
                f"{name} was changed to {os.environ.get(name)!r} after insitu started; "
                f"insitu never runs models with telemetry on: unset it"
            )
    import onnxruntime as ort

    ort.disable_telemetry_events()
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
