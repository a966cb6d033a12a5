"""Small ONNX models built with onnx.helper and numpy initializers (no torch)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def mlp(widths: list[int], *, seed: int = 0, scale: float = 0.1) -> tuple[bytes, list[np.ndarray]]:
    """An MLP (MatMul + Add + Relu) with the given layer widths; returns bytes and weights."""
    rng = np.random.default_rng(seed)
    weights = []
    for a, b in itertools.pairwise(widths):
        weights.append((rng.standard_normal((a, b)) * scale).astype(np.float32))
        weights.append((rng.standard_normal((b,)) * scale).astype(np.float32))
    return build(widths, weights), weights


def build(widths: list[int], weights: list[np.ndarray]) -> bytes:
    nodes, inits = [], []
    current = "x"
    layers = len(widths) - 1
    for i in range(layers):
        w, b = weights[2 * i], weights[2 * i + 1]
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        inits.append(numpy_helper.from_array(b, f"b{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}" if i < layers - 1 else out])
        )
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [out]))
        current = out
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", widths[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", widths[-1]])
    graph = helper.make_graph(nodes, "mlp", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model.SerializeToString()


def fine_tune(
    widths: list[int],
    weights: list[np.ndarray],
    *,
    last_layer_only: bool,
    seed: int = 1,
    step: float = 1e-3,
) -> bytes:
    rng = np.random.default_rng(seed)
    new = [w.copy() for w in weights]
    indices = range(len(new) - 2, len(new)) if last_layer_only else range(len(new))
    for i in indices:
        new[i] = (
            new[i]
            + rng.standard_normal(new[i].shape).astype(np.float32) * step * np.abs(new[i]).mean()
        ).astype(np.float32)
    return build(widths, new)


def write_trained_pair(
    publisher_home: str | Path, widths: list[int], first: Path, second: Path
) -> None:
    """Write a base model and its last-layer fine-tune, recording both trainings.

    A card may claim an epsilon only for a model whose private training the publisher's
    ledger records, so runs ``r1`` and ``r2`` (epsilon 3) are recorded for them.
    """
    import hashlib

    from insitu.workspace import Workspace

    base, weights = mlp(widths)
    first.write_bytes(base)
    second.write_bytes(fine_tune(widths, weights, last_layer_only=True))
    with Workspace.open(publisher_home).ledger() as ledger:
        for run_id, path in (("r1", first), ("r2", second)):
            ledger.record(
                "federation.completed",
                run=run_id,
                rounds=1,
                onnx_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                epsilon_run=3.0,
                delta=1e-5,
                round_entries=[],
            )
