"""Reading, checking and running ONNX models: the checks every optimization step relies on.

ONNX Runtime 1.31 reads IR versions up to 11, while onnx 1.23 (and the exporters built on
it) may write IR 12 or newer; every model insitu writes is pinned to :data:`IR_VERSION`.
A model is refused *before* ONNX Runtime sees it when it is not a model at all (protobuf
parses many byte strings as an empty ``ModelProto``) or when it uses an operator that no
registered ONNX domain defines, so the user reads one line naming the file or the
operator instead of a runtime stack trace.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from insitu.errors import NotAModelError, UnsupportedOperatorError

__all__ = ["IR_VERSION", "check_model", "input_spec", "pin_ir", "run", "session_for"]

#: The IR version written: ONNX Runtime 1.31 refuses onnx 1.23's default (IR 12+).
IR_VERSION = 10

#: Domains whose operators ONNX Runtime's CPU provider implements beyond ``onnx.defs``.
_RUNTIME_DOMAINS = {"com.microsoft", "com.microsoft.nchwc", "com.ms.internal.nhwc"}


def pin_ir(data: bytes) -> bytes:
    """``data`` with its IR version lowered to :data:`IR_VERSION` when newer."""
    import onnx

    proto = onnx.load_from_string(data)
    if proto.ir_version <= IR_VERSION:
        return data
    proto.ir_version = IR_VERSION
    result: bytes = proto.SerializeToString()
    return result


def check_model(data: bytes, *, name: str) -> Any:
    """The parsed ``onnx.ModelProto`` of ``data``, or a one-line refusal.

    Raises:
        NotAModelError: not a serialized ONNX model, or one without a graph.
        UnsupportedOperatorError: an operator no known domain defines.

    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise NotAModelError(
            f"{name} is not an ONNX model (it does not parse: {exc}); give an .onnx file "
            "exported from PyTorch or scikit-learn"
        ) from exc
    if not proto.graph.node or not proto.graph.input or not proto.graph.output:
        raise NotAModelError(
            f"{name} is not an ONNX model (no graph, inputs or outputs in it); give an .onnx "
            "file exported from PyTorch or scikit-learn"
        )
    for node in proto.graph.node:
        domain = node.domain or ""
        if domain in _RUNTIME_DOMAINS:
            continue
        if not onnx.defs.has(node.op_type, domain=domain):
            where = f"{domain}::{node.op_type}" if domain else node.op_type
            raise UnsupportedOperatorError(
                f"{name} uses the operator {where} (node {node.name or '?'}), which neither ONNX "
                "nor ONNX Runtime's CPU provider implements; export the model without it"
            )
    return proto


def input_spec(proto: Any, *, name: str) -> tuple[str, tuple[int | None, ...], str]:
    """(input name, per-row shape with None for symbolic axes, element type) of the graph.

    Raises:
        NotAModelError: a graph with more than one input (insitu optimizes one-input models).

    """
    import onnx

    initializers = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise NotAModelError(
            f"{name} takes {len(inputs)} inputs; insitu optimizes models with one input "
            "tensor (concatenate the features before export)"
        )
    tensor = inputs[0].type.tensor_type
    dims: list[int | None] = [
        d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim
    ]
    element = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    return inputs[0].name, tuple(dims[1:]), element


def session_for(data: bytes, *, threads: int = 1, name: str = "model") -> Any:
    """An ONNX Runtime session through :func:`insitu.runtime.create_session`.

    One intra-op thread by default: on a small edge CPU (and this project's 2-core
    machine) the models insitu optimizes are too small for a second thread to pay for
    its synchronization; the benchmark measures it.

    Raises:
        UnsupportedOperatorError: ONNX Runtime cannot implement a node of the graph.

    """
    from insitu._ort import create_session

    try:
        return create_session(data, intra_op_threads=threads)
    except Exception as exc:  # ONNX Runtime raises its own untyped errors
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "NOT_IMPLEMENTED" in text or "implementation" in text:
            raise UnsupportedOperatorError(
                f"ONNX Runtime cannot run {name}: {text}; export the model with other operators"
            ) from exc
        raise NotAModelError(f"ONNX Runtime cannot load {name}: {text}") from exc


def run(session: Any, x: np.ndarray, *, chunk: int = 4096) -> list[np.ndarray]:
    """Every output of ``session`` on ``x``, computed in chunks and concatenated."""
    name = session.get_inputs()[0].name
    parts: list[list[np.ndarray]] = []
    for start in range(0, len(x), chunk):
        batch = np.ascontiguousarray(x[start : start + chunk])
        parts.append([np.asarray(o) for o in session.run(None, {name: batch})])
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
