"""``optimize``: build every candidate, check its parity, measure it here, choose.

Candidates, each built from the fp32 ONNX export of the source (or from the pruned or
distilled PyTorch model) and each checked against the source's own outputs on the
evaluation data (max abs difference of scores, label agreement):

======================  =============================================================
``fp32``                the export itself (PyTorch: must match within 1e-4 of the outputs' scale)
``int8-dynamic``        ONNX Runtime dynamic quantization
``int8-static``         ONNX Runtime static QDQ, per-channel, calibrated on the user's data
``pruned``              structured (or magnitude) pruning, fine-tuned against the source
``distilled``           a smaller student trained on the source's outputs
``pruned+int8-*``       the pruned model, quantized
``distilled+int8-*``    the student, quantized
======================  =============================================================

``target="auto"`` builds them all and lets :func:`~insitu.optimize._select.select`
choose; any other target builds fp32 (the baseline) and that candidate only.

Privacy and provenance (ADR 0405). Invariants:

* **No candidate learns from records not declared public.** ``int8-static`` (its
  activation ranges), ``pruned`` (its fine-tune), ``distilled`` (its training) and their
  combinations learn from the calibration records. They are built only when the caller
  declares those records public data (``public_calibration=True``,
  ``--public-calibration``), e.g. the census rows insitu carries; otherwise each is
  listed as not built, with the reason, and only ``fp32`` and ``int8-dynamic`` (which
  learn from no data) remain. Fine-tuning on private records would have to be DP-SGD
  charged to their subjects' budgets; that is not supported here.
* **The choice carries its source's provenance.** The ``model.optimized`` ledger entry
  and ``report.json`` record the source's ONNX digest (for a federated run's directory,
  the digest of its ``model.onnx``, which the run's ``federation.completed`` entry
  names), the ledger reference (``seq``, ``hash``) of the entry that produced the
  source when the workspace ledger holds one, the chosen model's digest, the
  calibration data's declaration and digest, and what the chosen model learnt from.
  ``insitu bundle create`` follows that link (``insitu.bundle._provenance``), so a card
  for the optimized model may not state less privacy cost than its source's run.
* A run directory whose ``model.pt`` is not the model its run recorded (weights digest)
  is refused: the candidates would be built from other weights than the ledger names.
* The evaluation records select among the candidates (at most nine) and measure them;
  nothing is trained on them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from insitu._atomic import atomic_write_bytes, atomic_write_text
from insitu.audit import events
from insitu.errors import InsituError, OptimizationError, UsageError
from insitu.optimize._compress import CompressionPlan, distill, prune
from insitu.optimize._data import DataLike, DataSet, data_sha256, load_data
from insitu.optimize._export import export_torch
from insitu.optimize._measure import Timing, measure_outputs, time_session, timing_plan
from insitu.optimize._onnx import run, session_for
from insitu.optimize._quantize import quantize_dynamic_int8, quantize_static_int8
from insitu.optimize._report import OptimizationReport, plot_candidates
from insitu.optimize._select import Candidate, Constraints, select
from insitu.optimize._source import (
    SourceModel,
    load_model,
    scores_and_labels,
    sklearn_source,
    torch_source,
)

__all__ = [
    "CANDIDATES",
    "LEARNS_FROM_CALIBRATION",
    "NOT_PUBLIC",
    "TARGETS",
    "optimize",
    "optimize_workspace_model",
]

logger = logging.getLogger(__name__)

#: Every candidate ``auto`` builds, in build order.
CANDIDATES = (
    "fp32",
    "int8-dynamic",
    "int8-static",
    "pruned",
    "pruned+int8-dynamic",
    "pruned+int8-static",
    "distilled",
    "distilled+int8-dynamic",
    "distilled+int8-static",
)
#: What ``target`` accepts.
TARGETS = ("auto", *CANDIDATES)

#: fp32 ONNX must reproduce the PyTorch model within this: the largest absolute difference
#: of outputs over their scale (the largest absolute output, at least 1), because float32
#: kernels reorder sums and the absolute error grows with the size of the logits.
PARITY_TOLERANCE = 1e-4

#: Candidates that learn from the calibration records (quantization ranges, fine-tuning,
#: distillation): built only when those records are declared public.
LEARNS_FROM_CALIBRATION = frozenset(n for n in CANDIDATES if n not in {"fp32", "int8-dynamic"})
#: Why such a candidate is not built without the declaration.
NOT_PUBLIC = (
    "learns from the calibration records, which are not declared public "
    "(--public-calibration); private records need DP-SGD charged to their subjects' "
    "budgets, not supported here"
)
#: What a candidate that learns from no data learnt from (the card says so).
LEARNT_NOTHING = "nothing (no fine-tuning or calibration)"

OPTIMIZED = "model.optimized"
_COMPLETED = "federation.completed"

ModelLike = SourceModel | Path | str | Any


def _resolve(model: ModelLike, example: np.ndarray | None, allow_pickle: bool) -> SourceModel:
    if isinstance(model, SourceModel):
        return model
    if isinstance(model, (str, Path)):
        return load_model(Path(model), allow_pickle=allow_pickle)
    try:
        import torch

        if isinstance(model, torch.nn.Module):
            if example is None:
                raise UsageError("a PyTorch module needs an example input batch (example=...)")
            return torch_source(model, example, name=type(model).__name__)
    except ImportError:  # pragma: no cover - torch is in the optimize extra
        pass
    if hasattr(model, "n_features_in_"):
        return sklearn_source(model, int(model.n_features_in_), name=type(model).__name__)
    raise UsageError(
        f"cannot optimize a {type(model).__name__}: give a model path, a SourceModel, a "
        "torch.nn.Module with an example, or a fitted scikit-learn estimator"
    )


@dataclass
class _Builder:
    """Builds candidates by name; bases (fp32, pruned, distilled) once, memoized."""

    source: SourceModel
    calibration: DataSet
    teacher: np.ndarray
    plan: CompressionPlan
    student: Any
    built: dict[str, tuple[bytes, str]] = field(default_factory=dict)

    def build(self, name: str) -> tuple[bytes, str]:
        """ONNX bytes and a description of candidate ``name``."""
        if name not in self.built:
            self.built[name] = self._make(name)
        return self.built[name]

    def _make(self, name: str) -> tuple[bytes, str]:
        source, cal, plan = self.source, self.calibration, self.plan
        if name == "fp32":
            return source.onnx, f"{source.kind} export, float32"
        if "+" in name or name.startswith("int8-"):
            base, _, method = name.rpartition("+") if "+" in name else ("fp32", "", name)
            base_onnx, base_technique = self.build(base)
            if method == "int8-dynamic":
                return quantize_dynamic_int8(base_onnx), f"{base_technique}; dynamic int8"
            input_name = source.input_name if base == "fp32" else "input"
            return (
                quantize_static_int8(base_onnx, input_name, cal.x),
                f"{base_technique}; static int8 QDQ per-channel "
                f"({min(len(cal), 1024)} calibration records)",
            )
        if name == "pruned":
            if source.module is None:
                raise OptimizationError(
                    f"pruning needs the trainable PyTorch model; a {source.kind} source has none"
                )
            model, how = prune(source.module, cal.x, self.teacher, cal.y, plan=plan)
            return (
                export_torch(model, cal.x[:2], name="pruned"),
                f"{how} magnitude pruning {plan.prune_fraction:.0%}, fine-tuned "
                f"{plan.finetune_epochs} epochs"
                + ("" if how == "structured" else " (zeros stay in dense tensors)"),
            )
        if name == "distilled":
            named = self.student if isinstance(self.student, str) else None
            teacher_parameters = _parameters(source)
            model, description = distill(
                cal.x,
                self.teacher,
                cal.y,
                input_shape=tuple(int(d) for d in cal.x.shape[1:]),
                teacher_parameters=teacher_parameters,
                probabilities=source.kind == "sklearn",
                plan=plan,
                student=None if named else self.student,
                spec=named,
            )
            student_parameters = int(sum(p.numel() for p in model.parameters()))
            if self.student is None and student_parameters >= teacher_parameters:
                raise OptimizationError(
                    f"the source has {teacher_parameters} parameters, no more than the "
                    f"smallest student insitu proposes ({student_parameters}); nothing to distil"
                )
            return (
                export_torch(model, cal.x[:2], name="distilled"),
                f"student {description} distilled {plan.distill_epochs} epochs",
            )
        raise UsageError(f"unknown candidate {name!r}: use one of {', '.join(TARGETS)}")


def _parameters(source: SourceModel) -> int:
    if source.module is not None:
        return int(sum(p.numel() for p in source.module.parameters()))
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(source.onnx)
    return int(sum(numpy_helper.to_array(t).size for t in proto.graph.initializer))


def optimize(
    model: ModelLike,
    calibration: DataLike,
    evaluation: DataLike,
    *,
    target: str = "auto",
    constraints: Constraints | None = None,
    out_dir: Path | None = None,
    quick: bool = False,
    example: np.ndarray | None = None,
    student: Any = None,
    label: str | None = None,
    workspace: Any = None,
    allow_pickle: bool = False,
    threads: int = 1,
    on_step: Callable[[str], None] | None = None,
    public_calibration: bool = False,
) -> OptimizationReport:
    """Build, check, measure and choose the smallest model that meets ``constraints``.

    Args:
        model: a model path (workspace model directory, ``.pt2``, ``.onnx``, pickle), a
            :class:`SourceModel`, a ``torch.nn.Module`` (with ``example``) or a fitted
            scikit-learn estimator.
        calibration: records for static quantization, pruning fine-tune and distillation
            (a file, a frame, an array, or ``(x, y)``); learnt from only when
            ``public_calibration`` declares them public, otherwise only shape-checked.
        evaluation: labelled records on which accuracy and parity are measured
            (without labels, accuracy is agreement with the source model).
        target: ``auto`` or one candidate name (:data:`TARGETS`).
        constraints: accuracy drop (points), size (MB), p50 latency (ms) limits.
        out_dir: where ``model.onnx`` (the choice), ``candidates/*.onnx``,
            ``report.json`` and ``candidates.png`` are written.
        quick: fewer timing repetitions and shorter training (a quickstart's setting).
        example: an input batch for a ``torch.nn.Module``.
        student: a ``torch.nn.Module`` to distil into, or ``mlp:H`` / ``cnn:C``.
        label: the label column of CSV data for models without a schema.
        workspace: a :class:`~insitu.workspace.Workspace` whose ledger records the result.
        allow_pickle: allow opening a scikit-learn pickle (runs code from the file).
        threads: ONNX Runtime intra-op threads for every measurement.
        on_step: called with a description before each step (progress display).
        public_calibration: a declaration that the calibration records are public data
            (no site's subjects): only then are candidates that learn from them built
            (:data:`LEARNS_FROM_CALIBRATION`). Recorded, with their digest.

    Returns:
        The report; ``report.chosen`` is None when nothing met the constraints.

    Raises:
        UsageError, NotAModelError, InputShapeMismatchError, UnsupportedOperatorError:
            bad input, one line each, before anything is written; among them an explicit
            ``target`` that learns from calibration records not declared public.
        OptimizationError: the fp32 export does not reproduce the PyTorch model, or a run
            directory's ``model.pt`` is not the model its run recorded.

    """
    started = time.perf_counter()
    _check_target(target, public_calibration=public_calibration)
    constraints = constraints or Constraints()
    step = on_step or (lambda _text: None)
    step("loading the model")
    source = _resolve(model, example, allow_pickle)
    cal = load_data(calibration, source, role="calibration", label=label)
    ev = load_data(evaluation, source, role="evaluation", label=label)
    origin = _source_entry(workspace, source)
    pipeline = _Pipeline(
        source=source,
        cal=cal,
        ev=ev,
        reference=_reference(
            source, cal, ev, public_calibration=public_calibration, threads=threads
        ),
        target=target,
        public_calibration=public_calibration,
        threads=threads,
        timing=timing_plan(quick=quick),
        step=step,
    )
    plan = CompressionPlan(finetune_epochs=4, distill_epochs=15) if quick else CompressionPlan()
    builder = _Builder(source, cal, pipeline.reference.teacher, plan, student)
    names, notes = _candidate_names(target, source)
    candidates = [_candidate(pipeline, builder, name) for name in names]
    chosen, reason = _choose(candidates, constraints, target)
    report = OptimizationReport(
        source=_source_json(pipeline, origin),
        constraints=constraints,
        candidates=candidates,
        chosen=None if chosen is None else chosen.name,
        reason=reason,
        seconds=0.0,
        threads=threads,
        quick=quick,
        out_dir=Path(out_dir) if out_dir is not None else None,
        notes=notes,
    )
    report.provenance = _provenance(
        report, origin=origin, calibration=_calibration_json(calibration, pipeline)
    )
    report.seconds = time.perf_counter() - started
    _record(report, workspace, step)
    return report


def _check_target(target: str, *, public_calibration: bool) -> None:
    if target not in TARGETS:
        raise UsageError(f"--target {target!r}: use one of {', '.join(TARGETS)}")
    if target in LEARNS_FROM_CALIBRATION and not public_calibration:
        raise UsageError(
            f"--target {target} {NOT_PUBLIC}; pass --public-calibration only if the "
            "calibration records are public data, or use --target int8-dynamic"
        )


@dataclass(frozen=True)
class _Reference:
    """The source's own outputs: the reference for parity, and the teacher's targets."""

    scores: np.ndarray
    labels: np.ndarray
    accuracy: float | None
    #: On the calibration records, only when declared public (nothing else learns from
    #: them); empty otherwise.
    teacher: np.ndarray


@dataclass(frozen=True)
class _Pipeline:
    """What the steps of one :func:`optimize` share."""

    source: SourceModel
    cal: DataSet
    ev: DataSet
    reference: _Reference
    target: str
    public_calibration: bool
    threads: int
    timing: Timing
    step: Callable[[str], None]


def _reference(
    source: SourceModel, cal: DataSet, ev: DataSet, *, public_calibration: bool, threads: int
) -> _Reference:
    fp32_session = session_for(source.onnx, threads=threads, name=source.name)
    teacher = np.zeros((0, 1), dtype=np.float32)
    if source.reference is not None:
        scores = np.asarray(source.reference(ev.x), dtype=np.float32).reshape(len(ev.x), -1)
        if public_calibration:
            teacher = np.asarray(source.reference(cal.x), dtype=np.float32).reshape(len(cal.x), -1)
        labels = scores_and_labels(run(fp32_session, ev.x))[1]
        if source.kind != "sklearn":
            labels = scores_and_labels([scores])[1]
    else:
        scores, labels = scores_and_labels(run(fp32_session, ev.x))
        if public_calibration:
            teacher = scores_and_labels(run(fp32_session, cal.x))[0]
    accuracy = None if ev.y is None else float(np.mean(labels == ev.y))
    return _Reference(scores=scores, labels=labels, accuracy=accuracy, teacher=teacher)


def _candidate_names(target: str, source: SourceModel) -> tuple[list[str], list[str]]:
    """(the candidates to build, in order; notes for the report)."""
    if target != "auto":
        return (["fp32"] if target == "fp32" else ["fp32", target]), []
    if source.module is None or source.kind == "sklearn":
        return (
            [n for n in CANDIDATES if not n.startswith("pruned")],
            [f"pruning skipped: a {source.kind} source has no trainable PyTorch model"],
        )
    return list(CANDIDATES), []


def _candidate(pipeline: _Pipeline, builder: _Builder, name: str) -> Candidate:
    """Candidate ``name`` built, checked and measured, or why it was not built.

    With ``target="auto"`` a candidate that fails to build is listed with the error
    (except fp32, the baseline); an explicit target raises it.
    """
    if name in LEARNS_FROM_CALIBRATION and not pipeline.public_calibration:
        return Candidate(name, "", error=NOT_PUBLIC, skipped=True)
    pipeline.step(f"building {name}")
    try:
        onnx_bytes, technique = builder.build(name)
    except InsituError as exc:
        if pipeline.target != "auto" or name == "fp32":
            raise
        return Candidate(name, "", error=str(exc))
    except Exception as exc:  # a quantizer or exporter failing on one candidate
        if pipeline.target != "auto":
            raise OptimizationError(f"{name} could not be built: {exc}") from exc
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Candidate(name, "", error=text[:200])
    pipeline.step(f"measuring {name}")
    candidate = _measure(pipeline, name, onnx_bytes, technique)
    if name == "fp32":
        _check_parity(pipeline, candidate)
    return candidate


def _measure(pipeline: _Pipeline, name: str, onnx_bytes: bytes, technique: str) -> Candidate:
    ev, reference = pipeline.ev, pipeline.reference
    session, figures = measure_outputs(
        onnx_bytes, ev.x, ev.y, reference.scores, reference.labels, name=name
    )
    if pipeline.threads != 1:
        session = session_for(onnx_bytes, threads=pipeline.threads, name=name)
    timed = time_session(session, ev.x, pipeline.timing)
    accuracy = figures["accuracy"]
    if reference.accuracy is not None and accuracy is not None:
        drop = 100 * (reference.accuracy - accuracy)
    else:
        drop = 100 * (1 - float(figures["label_agreement"] or 0.0))
    return Candidate(
        name,
        technique,
        onnx=onnx_bytes,
        size_bytes=len(onnx_bytes),
        latency_p50_ms=timed["latency_p50_ms"],
        latency_p99_ms=timed["latency_p99_ms"],
        throughput_per_s=timed["throughput_per_s"],
        accuracy=accuracy,
        accuracy_drop=drop,
        max_abs_diff=figures["max_abs_diff"],
        label_agreement=figures["label_agreement"],
    )


def _check_parity(pipeline: _Pipeline, fp32: Candidate) -> None:
    """Refuse an fp32 export that does not reproduce its PyTorch model."""
    source = pipeline.source
    if source.kind not in {"pytorch", "workspace"} or source.module is None:
        return
    diff = fp32.max_abs_diff
    scale = (
        max(1.0, float(np.max(np.abs(pipeline.reference.scores)))) if len(pipeline.ev.x) else 1.0
    )
    if diff is None or diff > PARITY_TOLERANCE * scale:
        raise OptimizationError(
            f"the ONNX export of {source.name} differs from the PyTorch model by "
            f"{diff} (> {PARITY_TOLERANCE:g} of the outputs' scale {scale:.3g}) on the "
            "evaluation data; report this with the model"
        )


def _choose(
    candidates: list[Candidate], constraints: Constraints, target: str
) -> tuple[Candidate | None, str]:
    """(the choice or None, why): :func:`select`'s, or an explicit target or nothing."""
    chosen, reason = select(candidates, constraints)
    if target == "auto" or chosen is None:
        return chosen, reason
    if chosen.name != target:
        # An explicit target is that model or nothing.
        mine = next(c for c in candidates if c.name == target)
        if not mine.feasible:
            return None, f"{target} does not meet the constraints ({', '.join(mine.failures)})"
        chosen = mine
    return chosen, f"{target}: asked for, and it meets the constraints"


def _source_json(pipeline: _Pipeline, origin: dict[str, Any] | None) -> dict[str, Any]:
    source = pipeline.source
    return {
        "name": source.name,
        "kind": source.kind,
        "sha256": source.sha256,
        "size_bytes": len(source.onnx),
        "input_shape": ["batch", *(d if d is not None else "?" for d in source.input_shape)],
        "reference_accuracy": pipeline.reference.accuracy,
        "calibration_records": len(pipeline.cal),
        "evaluation_records": len(pipeline.ev),
        "run_id": source.run_id if origin is None else origin["run"],
        "onnx_sha256": source.ledger_sha256,
    }


def _calibration_json(calibration: DataLike, pipeline: _Pipeline) -> dict[str, Any]:
    """The calibration records' declaration, and their digest when declared public."""
    described: dict[str, Any] = {
        "public": pipeline.public_calibration,
        "records": len(pipeline.cal),
        "sha256": None,
        "digest_of": None,
    }
    if pipeline.public_calibration:
        described["sha256"], described["digest_of"] = data_sha256(calibration, pipeline.cal)
    return described


def _record(report: OptimizationReport, workspace: Any, step: Callable[[str], None]) -> None:
    """Write the report (when it has a directory) and record it in the ledger."""
    if report.out_dir is not None:
        step("writing the report")
        _write(report)
    if workspace is not None:
        with workspace.ledger() as ledger:
            entry = events.MODEL_OPTIMIZED.record(ledger, **_ledger_payload(report))
        report.ledger_seq = entry.seq
        if report.out_dir is not None:
            _write_json(report)


def _source_entry(workspace: Any, source: SourceModel) -> dict[str, Any] | None:
    """The ledger entry that produced ``source``, as ``{seq, type, hash, run}``, or None.

    A federated run's ``federation.completed`` naming the source's ONNX digest, else the
    ``model.optimized`` entry that chose it (an optimized model optimized again).

    Raises:
        OptimizationError: the run's entry names other weights than the directory's
            ``model.pt`` holds (the candidates would not derive from the run's model).

    """
    if workspace is None:
        return None
    digest = source.ledger_sha256
    with workspace.ledger() as ledger:
        for entry in ledger.entries(event_type=_COMPLETED, newest_first=True):
            if entry.type != _COMPLETED or entry.payload.get("onnx_sha256") != digest:
                continue
            run_id = entry.payload.get("run")
            recorded = entry.payload.get("model_sha256")
            if source.weights_sha256 is not None and recorded not in {None, source.weights_sha256}:
                raise OptimizationError(
                    f"{source.name}: model.pt is not the model run {run_id} recorded (its "
                    "weights digest differs from the ledger's); restore the run's directory, "
                    "or optimize its model.onnx"
                )
            return {"seq": entry.seq, "type": entry.type, "hash": entry.hash.hex(), "run": run_id}
        for entry in ledger.entries(event_type=OPTIMIZED, newest_first=True):
            if entry.type == OPTIMIZED and entry.payload.get("chosen_sha256") == digest:
                return {
                    "seq": entry.seq,
                    "type": entry.type,
                    "hash": entry.hash.hex(),
                    "run": entry.payload.get("run"),
                }
    return None


def _provenance(
    report: OptimizationReport, *, origin: dict[str, Any] | None, calibration: dict[str, Any]
) -> dict[str, Any]:
    """What the choice came from and learnt from (report.json and the ledger entry)."""
    chosen = report.chosen_candidate
    learnt_from = None
    if chosen is not None:
        learnt_from = (
            f"public calibration data {calibration['sha256']}"
            if chosen.name in LEARNS_FROM_CALIBRATION
            else LEARNT_NOTHING
        )
    return {
        "source_onnx_sha256": report.source["onnx_sha256"],
        "source_entry": None if origin is None else {k: origin[k] for k in ("seq", "type", "hash")},
        "run": report.source["run_id"],
        "chosen": report.chosen,
        "chosen_sha256": None
        if chosen is None or chosen.onnx is None
        else hashlib.sha256(chosen.onnx).hexdigest(),
        "chosen_learnt_from": learnt_from,
        "calibration": calibration,
    }


def _ledger_payload(report: OptimizationReport) -> dict[str, Any]:
    provenance = report.provenance
    calibration = provenance["calibration"]
    return {
        "source_sha256": report.source["sha256"],
        "source_onnx_sha256": provenance["source_onnx_sha256"],
        "source_entry": provenance["source_entry"],
        "source_kind": report.source["kind"],
        "run": provenance["run"],
        "chosen": report.chosen,
        "chosen_sha256": provenance["chosen_sha256"],
        "chosen_learnt_from": provenance["chosen_learnt_from"],
        "calibration_public": calibration["public"],
        "calibration_sha256": calibration["sha256"],
        "constraints": report.constraints.to_json(),
        "candidates": {
            c.name: {
                "built": c.error is None,
                "learns_from_calibration": c.name in LEARNS_FROM_CALIBRATION,
                "size_bytes": c.size_bytes,
                "latency_p50_ms": None if c.error else round(c.latency_p50_ms, 5),
                "accuracy": c.accuracy,
                "feasible": c.feasible,
            }
            for c in report.candidates
        },
    }


def _write_json(report: OptimizationReport) -> None:
    assert report.out_dir is not None
    atomic_write_text(
        report.out_dir / "report.json",
        json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n",
    )


def _write(report: OptimizationReport) -> None:
    assert report.out_dir is not None
    directory = report.out_dir
    (directory / "candidates").mkdir(parents=True, exist_ok=True)
    for candidate in report.candidates:
        if candidate.onnx is not None:
            atomic_write_bytes(directory / "candidates" / f"{candidate.name}.onnx", candidate.onnx)
    chosen = report.chosen_candidate
    if chosen is not None and chosen.onnx is not None:
        atomic_write_bytes(directory / "model.onnx", chosen.onnx)
    else:
        (directory / "model.onnx").unlink(missing_ok=True)
    atomic_write_bytes(directory / "candidates.png", plot_candidates(report))
    _write_json(report)


def optimize_workspace_model(
    workspace: Any,
    calibration: DataLike,
    evaluation: DataLike,
    *,
    run_id: str | None = None,
    out_dir: Path | None = None,
    quick: bool = True,
    public_calibration: bool = False,
    **options: Any,
) -> OptimizationReport:
    """Optimize the model a federated run wrote into ``workspace`` (quick by default).

    ``run_id`` defaults to the newest run under ``<home>/models/``; ``out_dir`` to
    ``<home>/models/<run>/optimized/``. The result is recorded in the workspace's ledger
    (``model.optimized``, linked to the run's ``federation.completed``). Pass
    ``public_calibration=True`` only when ``calibration`` is public data (the census rows
    insitu carries, say): only then are int8-static, pruned and distilled candidates
    built. Other options are those of :func:`optimize`.

    Raises:
        UsageError: the workspace holds no model (or none with that run id).

    """
    models = workspace.models_dir
    if run_id is None:
        runs = sorted(
            (p for p in models.glob("*") if (p / "features.json").is_file()),
            key=lambda p: p.stat().st_mtime,
        )
        if not runs:
            raise UsageError(
                f"{workspace.home} holds no trained model; run 'insitu federate simulate' first"
            )
        model_dir = runs[-1]
    else:
        model_dir = models / run_id
        if not (model_dir / "features.json").is_file():
            raise UsageError(f"{workspace.home} has no model of run {run_id!r}")
    return optimize(
        model_dir,
        calibration,
        evaluation,
        out_dir=out_dir or model_dir / "optimized",
        quick=quick,
        workspace=workspace,
        public_calibration=public_calibration,
        **options,
    )
