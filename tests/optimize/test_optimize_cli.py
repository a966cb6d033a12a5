"""``insitu optimize`` end to end: exit codes, one-line errors, the table when nothing fits."""

from __future__ import annotations

import json
import pickle

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from insitu.cli import run
from insitu.optimize._export import export_torch


def optimize_cli(capsys, *args):
    code = run(["optimize", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def digits_files(tmp_path, digits):
    cal, ev = tmp_path / "cal.npz", tmp_path / "eval.npz"
    np.savez(cal, x=digits.x_cal, y=digits.y_cal)
    np.savez(ev, x=digits.x_eval, y=digits.y_eval)
    return cal, ev


@pytest.fixture
def digits_onnx(tmp_path, digits):
    path = tmp_path / "cnn.onnx"
    path.write_bytes(export_torch(digits.model, digits.x_cal[:2]))
    return path


def test_an_onnx_file_that_is_not_a_model_is_one_clear_line(capsys, tmp_path, digits_files):
    cal, ev = digits_files
    bogus = tmp_path / "notes.onnx"
    bogus.write_text("these are meeting notes, not a model\n")
    code, _, err = optimize_cli(
        capsys, bogus, "--calibration", cal, "--eval", ev, "--out", tmp_path / "out"
    )
    assert code == 1
    assert "notes.onnx is not an ONNX model" in one_line(err)
    assert not (tmp_path / "out").exists()


def test_data_of_another_shape_than_the_model_input_is_one_clear_line(
    capsys, tmp_path, digits_onnx, digits_files
):
    _, ev = digits_files
    flat = tmp_path / "flat.npz"
    np.savez(flat, x=np.zeros((10, 64), np.float32))
    code, _, err = optimize_cli(
        capsys, digits_onnx, "--calibration", flat, "--eval", ev, "--out", tmp_path / "out"
    )
    assert code == 1
    line = one_line(err)
    assert "calibration data flat.npz has rows of shape 64" in line
    assert "takes 1x8x8" in line
    assert not (tmp_path / "out").exists()


def test_an_unsupported_operator_is_one_clear_line(capsys, tmp_path, digits_files):
    graph = helper.make_graph(
        [helper.make_node("FancyAttention", ["input"], ["output"], domain="com.example")],
        "custom",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 1, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 10])],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)]
    )
    proto.ir_version = 10
    path = tmp_path / "custom.onnx"
    path.write_bytes(proto.SerializeToString())
    cal, ev = digits_files
    code, _, err = optimize_cli(
        capsys, path, "--calibration", cal, "--eval", ev, "--out", tmp_path / "out"
    )
    assert code == 1
    assert "uses the operator com.example::FancyAttention" in one_line(err)


def test_nothing_meeting_the_constraints_exits_1_with_the_table_printed_and_the_report_kept(
    capsys, tmp_path, digits_onnx, digits_files
):
    cal, ev = digits_files
    out = tmp_path / "out"
    code, stdout, err = optimize_cli(
        capsys,
        digits_onnx,
        "--calibration",
        cal,
        "--eval",
        ev,
        "--out",
        out,
        "--target",
        "int8-dynamic",
        "--max-size",
        "0.001",
        "--quick",
    )
    assert code == 1
    assert "candidates for cnn.onnx" in stdout
    assert "int8-dynamic" in stdout
    line = one_line(err)
    assert "no candidate meets the constraints" in line
    assert "fp32: size" in line
    report = json.loads((out / "report.json").read_text())
    assert report["chosen"] is None
    assert not (out / "model.onnx").exists()
    assert (out / "candidates.png").is_file()


def test_a_scikit_learn_pickle_is_refused_unless_allowed_and_then_quantized(
    capsys, tmp_path, adult
):
    import warnings

    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning of a short fit
        pipeline = make_pipeline(
            StandardScaler(), MLPClassifier((32,), max_iter=30, random_state=0)
        )
        pipeline.fit(adult.x_cal, adult.y_cal)
    path = tmp_path / "pipeline.pkl"
    path.write_bytes(pickle.dumps(pipeline))
    cal, ev = tmp_path / "cal.npz", tmp_path / "eval.npz"
    np.savez(cal, x=adult.x_cal, y=adult.y_cal)
    np.savez(ev, x=adult.x_eval, y=adult.y_eval)
    code, _, err = optimize_cli(
        capsys, path, "--calibration", cal, "--eval", ev, "--out", tmp_path / "out"
    )
    assert code == 2
    assert "loading it runs any code it holds; pass --allow-pickle" in one_line(err)
    code, stdout, err = optimize_cli(
        capsys,
        path,
        "--calibration",
        cal,
        "--eval",
        ev,
        "--out",
        tmp_path / "out",
        "--allow-pickle",
        "--target",
        "int8-dynamic",
        "--max-accuracy-drop",
        "2",
        "--quick",
        "--json",
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["source"]["kind"] == "sklearn"
    fp32 = report["candidates"][0]
    assert fp32["max_abs_diff"] < 1e-4  # skl2onnx matches scikit-learn's probabilities
    assert report["chosen"] == "int8-dynamic"
    assert onnx.load(tmp_path / "out" / "model.onnx").ir_version <= 10


def test_calibration_records_are_learnt_from_only_when_declared_public(
    capsys, tmp_path, digits_onnx, digits_files
):
    cal, ev = digits_files
    base = [digits_onnx, "--calibration", cal, "--eval", ev, "--quick", "--max-accuracy-drop", "5"]
    code, _, err = optimize_cli(capsys, *base, "--out", tmp_path / "a", "--target", "int8-static")
    assert code == 2
    line = one_line(err)
    assert "--target int8-static learns from the calibration records" in line
    assert "--public-calibration" in line
    assert not (tmp_path / "a").exists()
    code, stdout, err = optimize_cli(capsys, *base, "--out", tmp_path / "auto")
    assert code == 0, err
    assert "not built: int8-static, distilled, distilled+int8-dynamic" in " ".join(stdout.split())
    report = json.loads((tmp_path / "auto" / "report.json").read_text())
    assert {c["name"] for c in report["candidates"] if c["built"]} == {"fp32", "int8-dynamic"}
    code, stdout, err = optimize_cli(
        capsys, *base, "--out", tmp_path / "b", "--target", "int8-static", "--public-calibration",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    assert report["chosen"] == "int8-static"
    assert report["provenance"]["calibration"]["public"] is True
    assert report["provenance"]["calibration"]["digest_of"] == "file"
    assert report["provenance"]["chosen_learnt_from"].startswith("public calibration data ")
