"""Models for the edge: ONNX export, int8 quantization, pruning, distillation, measured.

:func:`optimize` turns a trained model (a federated run's model directory, a
``torch.export`` program, a scikit-learn pipeline, or an ONNX file) into candidates,
checks each against the source model's outputs, measures each on this machine (size,
p50/p99 latency at batch 1, throughput at batch 64, accuracy) and picks the smallest one
that meets the user's constraints and is no slower than fp32. Only calibration records
declared public are learnt from, and the choice is recorded linked to its source's run
(ADR 0405). See ``docs/optimize.md``.

Layer 8: imports ``insitu.training`` (export, students), ``insitu.data`` and below.
"""

from __future__ import annotations

from insitu.optimize._optimize import (
    CANDIDATES,
    LEARNS_FROM_CALIBRATION,
    NOT_PUBLIC,
    TARGETS,
    optimize,
    optimize_workspace_model,
)
from insitu.optimize._report import OptimizationReport
from insitu.optimize._select import Candidate, Constraints, select
from insitu.optimize._source import SourceModel, load_model

__all__ = [
    "CANDIDATES",
    "LEARNS_FROM_CALIBRATION",
    "NOT_PUBLIC",
    "TARGETS",
    "Candidate",
    "Constraints",
    "OptimizationReport",
    "SourceModel",
    "load_model",
    "optimize",
    "optimize_workspace_model",
    "select",
]
