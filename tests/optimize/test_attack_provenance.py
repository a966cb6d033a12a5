"""Attacks on the evidence chain through ``insitu optimize`` (ADR 0405).

1. Bundle the optimized model with a smaller epsilon than its run spent: the chosen model
   is not the run's ONNX file, so a digest match alone would find no run.
2. Claim an epsilon for a model no run of this ledger produced.
3. Ship a candidate fine-tuned, distilled or calibrated on records nobody declared
   public: its run's guarantee does not cover them.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from insitu.bundle import bundle_model
from insitu.cli import run
from insitu.errors import OptimizationError, UnderstatedPrivacyError, UsageError
from insitu.optimize import Constraints, optimize, optimize_workspace_model
from insitu.optimize._optimize import LEARNS_FROM_CALIBRATION, NOT_PUBLIC
from insitu.training import get_weights, weights_digest
from insitu.workspace import Workspace

from .conftest import write_model_dir

ANY_ACCURACY = Constraints(max_accuracy_drop=100.0)


def _federated_run(ws: Workspace, adult, *, run_id: str = "run-3", epsilon: float | None = 3.0):
    """A run directory and the ledger entries 'insitu federate' records for it."""
    model_dir = write_model_dir(ws.home / "models" / run_id, adult)
    onnx_sha256 = hashlib.sha256((model_dir / "model.onnx").read_bytes()).hexdigest()
    with ws.ledger() as ledger:
        rounds = [
            ledger.record("federation.round", run=run_id, round=n, epsilon_run_max=eps).seq
            for n, eps in ((1, 1.5), (2, epsilon or 0.0))
        ]
        completed = ledger.record(
            "federation.completed",
            run=run_id,
            rounds=2,
            model_sha256=weights_digest(get_weights(adult.model)),
            onnx_sha256=onnx_sha256,
            epsilon_run=epsilon,
            delta=None if epsilon is None else 1e-5,
            round_entries=rounds,
        )
    return model_dir, completed


def _bundle_cli(capsys, ws: Workspace, model_path, out, *extra: str):
    code = run(
        [
            "bundle", "create", str(model_path), "--name", "adult", "--version", "1.0.0",
            "--out", str(out), "--recipient", str(ws.home / "keys" / "encryption.pub.pem"),
            "--home", str(ws.home), "--json", *extra,
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bundle_create_refuses_an_epsilon_below_the_source_run_for_an_optimized_model(
    workspace, adult, capsys, tmp_path
):
    model_dir, completed = _federated_run(workspace, adult)
    report = optimize_workspace_model(
        workspace,
        adult.cal_rows,
        adult.eval_rows,
        target="int8-dynamic",
        constraints=ANY_ACCURACY,
        out_dir=tmp_path / "opt",
    )
    assert report.chosen == "int8-dynamic"
    chosen = (tmp_path / "opt" / "model.onnx").read_bytes()
    # The optimized model is not the run's file: only the optimization entry links them.
    assert chosen != (model_dir / "model.onnx").read_bytes()
    document = json.loads((tmp_path / "opt" / "report.json").read_text())
    link = document["provenance"]
    assert link["source_entry"] == {
        "seq": completed.seq,
        "type": "federation.completed",
        "hash": completed.hash.hex(),
    }
    assert link["chosen_sha256"] == hashlib.sha256(chosen).hexdigest()
    assert link["source_onnx_sha256"] == completed.payload["onnx_sha256"]

    out = tmp_path / "adult.insb"
    code, _, err = _bundle_cli(
        capsys, workspace, tmp_path / "opt" / "model.onnx", out, "--epsilon", "0.1",
        "--delta", "1e-5",
    )  # fmt: skip
    assert code == 1  # UnderstatedPrivacyError: a refusal, not a usage error
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "run-3" in lines[0]
    assert "epsilon 3" in lines[0]
    assert "may not understate" in lines[0]
    assert not out.exists()
    # Leaving the claim out is no way round it: a private run's card states its epsilon.
    with pytest.raises(UnderstatedPrivacyError, match="may not understate"):
        bundle_model(workspace, chosen, name="adult", version="1.0.0", encrypt=False)

    code, stdout, err = _bundle_cli(
        capsys, workspace, tmp_path / "opt" / "model.onnx", out, "--epsilon", "3",
        "--delta", "1e-5",
    )  # fmt: skip
    assert code == 0, err
    provenance = json.loads(stdout)["card"]["provenance"]
    assert provenance["run"] == "run-3"
    assert provenance["run_entry"]["seq"] == completed.seq
    assert provenance["epsilon_recorded"] == 3.0
    assert len(provenance["training_rounds"]) == 2
    step = provenance["optimized_from"]
    assert step["method"] == "int8-dynamic"
    assert step["optimization_entry"]["seq"] == report.ledger_seq
    assert step["optimization_entry"]["type"] == "model.optimized"
    assert step["source_sha256"] == completed.payload["onnx_sha256"]
    assert step["learnt_from"] == "nothing (no fine-tuning or calibration)"


def test_a_model_without_provenance_cannot_claim_an_epsilon(workspace, adult, capsys, tmp_path):
    # A model from elsewhere, and the same model optimized: no run of this ledger made it.
    from insitu.training import export_onnx

    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(export_onnx(adult.model, len(adult.names)))
    report = optimize(
        foreign,
        (adult.x_cal, adult.y_cal),
        (adult.x_eval, adult.y_eval),
        target="int8-dynamic",
        constraints=ANY_ACCURACY,
        quick=True,
        out_dir=tmp_path / "opt",
        workspace=workspace,
    )
    assert report.provenance["source_entry"] is None
    for path in (foreign, tmp_path / "opt" / "model.onnx"):
        out = tmp_path / f"{path.stem}.insb"
        code, _, err = _bundle_cli(
            capsys, workspace, path, out, "--epsilon", "3", "--delta", "1e-5"
        )
        assert code == 2
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        assert "can make no privacy claim: drop --epsilon and --delta" in lines[0]
        assert not out.exists()
        code, stdout, err = _bundle_cli(capsys, workspace, path, out)
        assert code == 0, err
        card = json.loads(stdout)["card"]
        assert card["privacy"] is None
        assert card["provenance"]["run"] is None


def test_optimize_builds_no_candidate_that_learns_from_undeclared_calibration_records(
    workspace, adult, tmp_path, monkeypatch
):
    import insitu.optimize._optimize as pipeline

    def never(*_args, **_kwargs):
        raise AssertionError("learnt from calibration records not declared public")

    for name in ("prune", "distill", "quantize_static_int8"):
        monkeypatch.setattr(pipeline, name, never)
    _federated_run(workspace, adult)
    report = optimize_workspace_model(
        workspace, adult.cal_rows, adult.eval_rows, out_dir=tmp_path / "opt"
    )
    built = {c.name for c in report.candidates if c.error is None}
    assert built == {"fp32", "int8-dynamic"}
    for candidate in report.candidates:
        if candidate.name in LEARNS_FROM_CALIBRATION:
            assert candidate.skipped
            assert candidate.error == NOT_PUBLIC
            assert not (tmp_path / "opt" / "candidates" / f"{candidate.name}.onnx").exists()
    assert report.chosen in {"fp32", "int8-dynamic"}
    document = json.loads((tmp_path / "opt" / "report.json").read_text())
    reasons = {c["name"]: c["not_built_reason"] for c in document["candidates"]}
    assert reasons["pruned"] == (
        "learns from the calibration records, which are not declared public "
        "(--public-calibration); private records need DP-SGD charged to their subjects' "
        "budgets, not supported here"
    )
    assert reasons["fp32"] is None
    assert document["provenance"]["calibration"]["public"] is False
    assert document["provenance"]["chosen_learnt_from"] == "nothing (no fine-tuning or calibration)"
    with workspace.ledger() as ledger:
        entry = ledger.entries(event_type="model.optimized")[-1]
    assert entry.payload["calibration_public"] is False
    assert entry.payload["calibration_sha256"] is None
    assert entry.payload["candidates"]["distilled"]["built"] is False
    # Asking for such a candidate by name is refused before anything is written.
    with pytest.raises(UsageError, match=r"--target pruned learns from the calibration records"):
        optimize_workspace_model(
            workspace, adult.cal_rows, adult.eval_rows, target="pruned", out_dir=tmp_path / "p"
        )
    assert not (tmp_path / "p").exists()


def test_with_public_calibration_they_are_built_and_the_card_says_what_they_learnt_from(
    workspace, adult, tmp_path
):
    _federated_run(workspace, adult)
    census = tmp_path / "census.csv"
    adult.cal_rows.to_csv(census, index=False)
    digest = hashlib.sha256(census.read_bytes()).hexdigest()
    report = optimize_workspace_model(
        workspace,
        census,
        adult.eval_rows,
        target="distilled",
        constraints=ANY_ACCURACY,
        out_dir=tmp_path / "opt",
        public_calibration=True,
    )
    assert report.chosen == "distilled"
    assert report.candidate["distilled"].error is None
    assert report.provenance["calibration"] == {
        "public": True,
        "records": len(adult.cal_rows),
        "sha256": digest,
        "digest_of": "file",
    }
    with workspace.ledger() as ledger:
        entry = ledger.entries(event_type="model.optimized")[-1]
    assert entry.payload["calibration_public"] is True
    assert entry.payload["calibration_sha256"] == digest
    assert entry.payload["chosen_learnt_from"] == f"public calibration data {digest}"
    _, bundle = bundle_model(
        workspace,
        report.onnx or b"",
        name="adult",
        version="1.0.0",
        encrypt=False,
        epsilon=3.0,
        delta=1e-5,
    )
    step = bundle.card.provenance["optimized_from"]
    assert step["method"] == "distilled"
    assert step["learnt_from"] == f"public calibration data {digest}"
    assert bundle.card.provenance["run"] == "run-3"


def test_a_run_directory_whose_weights_are_not_the_runs_is_refused(workspace, adult):
    model_dir, _ = _federated_run(workspace, adult)
    import io

    import torch

    state = {k: v + 1.0 for k, v in adult.model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (model_dir / "model.pt").write_bytes(buffer.getvalue())
    with pytest.raises(OptimizationError, match=r"model\.pt is not the model run run-3 recorded"):
        optimize_workspace_model(
            workspace, adult.cal_rows, adult.eval_rows, target="int8-dynamic", out_dir=None
        )
