"""``insitu.optimize.optimize`` on real models: parity, the constraints, the files written."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from insitu.errors import InputShapeMismatchError, NotAModelError
from insitu.optimize import Constraints, load_model, optimize, optimize_workspace_model
from insitu.optimize._compress import CompressionPlan, prune
from insitu.optimize._measure import measure_outputs
from insitu.optimize._source import scores_and_labels, torch_source

from .conftest import write_model_dir


def _parity(module, x):
    source = torch_source(module, x[:2])
    reference = source.reference(x)
    _, figures = measure_outputs(
        source.onnx, x, None, reference, scores_and_labels([reference])[1], name="fp32"
    )
    return source, figures


def test_fp32_onnx_matches_pytorch_within_1e_4_on_the_evaluation_data(adult, digits):
    for module, x in ((adult.model, adult.x_eval), (digits.model, digits.x_eval)):
        source, figures = _parity(module, x)
        assert figures["max_abs_diff"] <= 1e-4
        assert figures["label_agreement"] == 1.0
        # The IR version is one ONNX Runtime 1.31 reads.
        assert onnx.load_from_string(source.onnx).ir_version <= 10


def test_structured_pruning_really_shrinks_the_graph(digits):
    teacher = digits.model(torch.from_numpy(digits.x_cal)).detach().numpy()
    pruned, how = prune(
        digits.model,
        digits.x_cal,
        teacher,
        digits.y_cal,
        plan=CompressionPlan(finetune_epochs=1),
    )
    assert how == "structured"
    shapes = [tuple(m.weight.shape) for m in pruned if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert shapes == [(4, 1, 3, 3), (16, 4 * 16), (10, 16)]
    assert sum(p.numel() for p in pruned.parameters()) < 0.6 * sum(
        p.numel() for p in digits.model.parameters()
    )


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory, adult):
    """One quick ``auto`` run of a workspace model, recorded in its workspace."""
    from insitu.workspace import Workspace

    root = tmp_path_factory.mktemp("auto")
    ws, _ = Workspace.init(root / "ws", name="opt")
    write_model_dir(ws.home / "models" / "run-1", adult)
    # What the quickstart calls: the newest run of the workspace, quick, recorded, on
    # calibration records declared public (the quickstart's are the census rows).
    report = optimize_workspace_model(
        ws,
        adult.cal_rows,
        adult.eval_rows,
        constraints=Constraints(max_accuracy_drop=0.5),
        public_calibration=True,
    )
    return ws, report


def test_auto_reports_every_candidate_with_parity_and_enforces_the_accuracy_bar(auto_run):
    _, report = auto_run
    names = [c.name for c in report.candidates]
    assert names[:3] == ["fp32", "int8-dynamic", "int8-static"]
    assert "pruned+int8-static" in names
    assert "distilled+int8-dynamic" in names
    for candidate in report.candidates:
        assert candidate.error is None, candidate.name
        assert 0.0 <= candidate.label_agreement <= 1.0
        assert candidate.max_abs_diff is not None
        if candidate.accuracy_drop > 0.5:
            assert not candidate.feasible
    fp32 = report.candidate["fp32"]
    assert fp32.max_abs_diff <= 1e-4
    chosen = report.chosen_candidate
    assert chosen is not None
    assert chosen.accuracy_drop <= 0.5
    assert chosen.latency_p50_ms <= fp32.latency_p50_ms
    assert chosen.size_bytes == min(
        c.size_bytes
        for c in report.candidates
        if c.feasible and c.latency_p50_ms <= fp32.latency_p50_ms
    )


def test_auto_writes_the_chosen_model_the_report_the_plot_and_a_ledger_entry(auto_run):
    ws, report = auto_run
    out = report.out_dir
    assert out == ws.home / "models" / "run-1" / "optimized"
    assert report.quick
    assert (out / "model.onnx").read_bytes() == report.onnx
    assert (out / "candidates.png").read_bytes()[:4] == b"\x89PNG"
    document = json.loads((out / "report.json").read_text())
    assert document["chosen"] == report.chosen
    assert document["ledger_seq"] == report.ledger_seq
    assert {c["name"] for c in document["candidates"]} == {c.name for c in report.candidates}
    with ws.ledger() as ledger:
        entry = ledger.entries(event_type="model.optimized")[-1]
    assert entry.seq == report.ledger_seq
    assert entry.payload["chosen"] == report.chosen
    assert entry.payload["run"] == "run-1"
    # No federated run in this ledger made run-1's model: nothing to link to.
    assert entry.payload["source_entry"] is None
    assert (
        entry.payload["source_onnx_sha256"]
        == hashlib.sha256((ws.home / "models" / "run-1" / "model.onnx").read_bytes()).hexdigest()
    )
    assert entry.payload["chosen_sha256"] == hashlib.sha256(report.onnx).hexdigest()
    assert entry.payload["calibration_public"] is True
    assert entry.payload["calibration_sha256"] == report.provenance["calibration"]["sha256"]
    assert document["provenance"]["chosen_sha256"] == entry.payload["chosen_sha256"]


def test_an_accuracy_bar_nothing_meets_chooses_nothing(adult, tmp_path):
    # A one-unit student cannot keep the accuracy, and fp32 is over the size limit.
    report = optimize(
        adult.model,
        (adult.x_cal, adult.y_cal),
        (adult.x_eval, adult.y_eval),
        example=adult.x_cal[:2],
        target="distilled",
        student="mlp:1",
        quick=True,
        public_calibration=True,
        constraints=Constraints(max_accuracy_drop=0.0, max_size_mb=0.001),
    )
    assert report.chosen is None
    assert report.reason.startswith("no candidate meets the constraints")
    assert "distilled: " in report.reason
    assert "fp32: size" in report.reason
    # With the schema's binned features even a one-unit student can tie fp32 here, so
    # the accuracy bar must fail it exactly when it lost accuracy.
    student = report.candidate["distilled"]
    assert student.accuracy_drop is not None
    lost = student.accuracy_drop > 0
    assert any("accuracy drop" in f for f in student.failures) == lost


def test_data_whose_shape_differs_from_the_model_input_is_refused_before_anything_runs(
    adult, tmp_path
):
    with pytest.raises(InputShapeMismatchError, match=r"rows of shape 12, the model .* takes 1"):
        optimize(
            adult.model,
            np.zeros((8, 12), np.float32),
            (adult.x_eval, adult.y_eval),
            example=adult.x_cal[:2],
            out_dir=tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_a_torch_export_program_is_loaded_with_its_example_input(digits, tmp_path):
    example = (torch.from_numpy(digits.x_cal[:2]),)
    fixed = torch.export.export(digits.model, example)
    torch.export.save(fixed, tmp_path / "fixed.pt2")
    with pytest.raises(NotAModelError, match="fixed batch of 2; export it with dynamic_shapes"):
        load_model(tmp_path / "fixed.pt2")
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(digits.model, example, dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "cnn.pt2")
    source = load_model(tmp_path / "cnn.pt2")
    assert source.input_shape == (1, 8, 8)
    report = optimize(
        source,
        (digits.x_cal, digits.y_cal),
        (digits.x_eval, digits.y_eval),
        target="int8-static",
        quick=True,
        constraints=Constraints(max_accuracy_drop=2.0),
        public_calibration=True,
    )
    assert report.candidate["fp32"].max_abs_diff <= 1e-4
    assert report.chosen == "int8-static"
    assert report.candidate["int8-static"].size_bytes < report.candidate["fp32"].size_bytes
