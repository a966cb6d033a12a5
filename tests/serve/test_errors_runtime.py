"""The runtime's refusals no other test names: a model that cannot be run as its card
says (:class:`InferenceError`) and egress while serving (:class:`EgressBlockedError`).

The egress guard is an audit hook, which cannot be removed from a process: it is engaged
in a child process, which reports what it caught as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from insitu.bundle import BundleVerifier, ModelCard, create_bundle, schema_of
from insitu.errors import InferenceError
from insitu.runtime import BundleFile, ModelRuntime
from tests.bundle._models import mlp

REPO = Path(__file__).resolve().parents[2]


def _fixed_batch_model() -> bytes:
    """A model exported with a batch of one baked in: Reshape to [1, 8] before its layer."""
    shape = numpy_helper.from_array(np.array([1, 8], dtype=np.int64), "shape")
    weight = numpy_helper.from_array(np.full((8, 1), 0.1, dtype=np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["y"]),
        ],
        "fixed-batch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        initializer=[shape, weight],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    return proto.SerializeToString()


def _runtime(tmp_path: Path, model: bytes, *, inputs: list | None = None) -> ModelRuntime:
    publisher, device = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    declared, outputs = schema_of(model)
    card = ModelCard(
        name="mlp",
        version="1.0.0",
        inputs=declared if inputs is None else inputs,
        outputs=outputs,
    )
    path = tmp_path / "mlp.insb"
    path.write_bytes(create_bundle(model, card, publisher, recipients=[device.public_key()]))
    source = BundleFile(path, verifier=BundleVerifier([publisher.public_key()]), device_key=device)
    return ModelRuntime([source], guard=False)


def test_a_model_that_fails_on_a_batch_its_card_allows_is_named(tmp_path):
    with _runtime(tmp_path, _fixed_batch_model()) as runtime:
        assert runtime.predict("mlp", np.zeros((1, 8)))["y"].shape == (1, 1)
        with pytest.raises(InferenceError, match=r"model mlp 1\.0\.0 failed: .*Reshape"):
            runtime.predict("mlp", np.zeros((3, 8)))


def test_a_card_that_declares_no_inputs_cannot_be_served(tmp_path):
    with (
        _runtime(tmp_path, mlp([8, 4, 1])[0], inputs=[]) as runtime,
        pytest.raises(InferenceError, match="model 'mlp' declares no inputs in its card"),
    ):
        runtime.get("mlp")


GUARDED_PROCESS = textwrap.dedent(
    """
    import json, socket

    from insitu.runtime import egress_guard

    caught = {}
    with egress_guard.engaged():
        try:
            socket.create_connection(("192.0.2.10", 443), timeout=2)
        except Exception as exc:
            caught = {
                "error": type(exc).__name__,
                "message": str(exc),
                "permission_error": isinstance(exc, PermissionError),
            }
    print(json.dumps(caught))
    """
)


def test_a_connection_to_another_host_while_serving_is_blocked():
    result = subprocess.run(
        [sys.executable, "-c", GUARDED_PROCESS],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    caught = json.loads(result.stdout.strip().splitlines()[-1])
    assert caught == {
        "error": "EgressBlockedError",
        "message": caught["message"],
        "permission_error": True,
    }
    assert caught["message"].startswith("connect to 192.0.2.10 refused")
    assert "the egress guard" in caught["message"]
