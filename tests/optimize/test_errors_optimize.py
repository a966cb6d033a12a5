"""The optimizer's refusals named by class: an operator nothing can run, and constraints no
candidate meets (raised by ``insitu optimize`` after it printed the table)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from onnx import TensorProto, helper

from insitu.cli import app
from insitu.errors import ConstraintsNotMetError, UnsupportedOperatorError
from insitu.optimize import load_model
from insitu.optimize._export import export_torch


def _insitu(*args: object) -> None:
    """``insitu ARGS`` as the console script runs it, but with the error let through."""
    command = typer.main.get_command(app)
    command.main(args=[str(a) for a in args], prog_name="insitu", standalone_mode=False)


def test_a_custom_operator_is_named_with_its_domain(tmp_path):
    # A model exported with a vendor's fused attention kernel: no CPU runtime has it.
    graph = helper.make_graph(
        [helper.make_node("FancyAttention", ["input"], ["output"], domain="com.example")],
        "custom",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 2])],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)]
    )
    proto.ir_version = 10
    path = tmp_path / "attention.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(
        UnsupportedOperatorError,
        match=r"attention\.onnx uses the operator com\.example::FancyAttention",
    ):
        load_model(path)


def test_constraints_no_candidate_meets_are_an_error_after_the_report(tmp_path, digits, capsys):
    model = tmp_path / "cnn.onnx"
    model.write_bytes(export_torch(digits.model, digits.x_cal[:2]))
    cal, ev = tmp_path / "cal.npz", tmp_path / "eval.npz"
    np.savez(cal, x=digits.x_cal, y=digits.y_cal)
    np.savez(ev, x=digits.x_eval, y=digits.y_eval)
    out = tmp_path / "out"
    with pytest.raises(
        ConstraintsNotMetError, match=r"no candidate meets the constraints.*relax a constraint"
    ) as caught:
        _insitu(
            *("optimize", model, "--calibration", cal, "--eval", ev, "--out", out),
            *("--target", "int8-dynamic", "--max-size", "0.001", "--quick"),
        )
    assert caught.value.exit_code == 1
    assert str(out / "report.json") in str(caught.value)
    assert "candidates for cnn.onnx" in capsys.readouterr().out  # the table came first
    assert json.loads((out / "report.json").read_text())["chosen"] is None
