"""Nothing phones home: dependencies' telemetry is off whenever insitu is in the process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def test_no_telemetry_variables_are_forced_on_import(monkeypatch):
    import insitu._privacy_env as privacy_env

    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")  # a user's profile turned it on
    privacy_env.apply()
    assert os.environ["FLWR_TELEMETRY_ENABLED"] == "0"
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"
    assert os.environ["FLWR_DISABLE_UPDATE_CHECK"] == "1"


def test_onnxruntime_session_through_insitu_writes_no_telemetry_files(tmp_path):
    pytest.importorskip("onnxruntime")
    home = tmp_path / "home"
    home.mkdir()
    # Without insitu, this machine's onnxruntime wheel writes a device id and an event
    # database under ~/.cache/Microsoft/DeveloperTools/.onnxruntime at the first session.
    script = textwrap.dedent(
        """
        import numpy as np
        from onnx import TensorProto, helper
        from insitu.runtime import create_session

        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 10
        session = create_session(model.SerializeToString())
        out = session.run(None, {"x": np.array([[-1.0, 2.0]], dtype=np.float32)})[0]
        assert out.tolist() == [[0.0, 2.0]], out
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env["HOME"] = str(home)
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    assert not (home / ".cache" / "Microsoft").exists()
    assert list(home.rglob("*")) == []


def test_a_session_refuses_to_start_if_telemetry_was_turned_back_on(monkeypatch):
    pytest.importorskip("onnxruntime")
    from insitu.errors import InsituError
    from insitu.runtime import create_session

    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "0")
    with pytest.raises(InsituError, match="telemetry"):
        create_session(b"")
