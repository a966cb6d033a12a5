"""Training where the data is: the DP-SGD loop, the model family, ONNX export.

Owns what every trainer of insitu shares: federated sites (``insitu.federated``), a
device's own fine-tuning (``insitu.finetune``), the compressed students of
``insitu.optimize`` and the attacks' shadow models (``insitu.attacks``).

Layer 6 (beside ``insitu.bundle``, which it never imports): imports ``insitu.privacy``
(events, secret randomness), the ONNX session leaf ``insitu._ort`` and nothing above.
"""

from __future__ import annotations

from insitu.training._cnn import (
    ArrayModelFn,
    ScaledInput,
    build_cnn,
    check_dp_compatible,
    export_array_onnx,
)
from insitu.training._defaults import DEFAULT_BATCH_RULE, default_batch, default_learning_rate
from insitu.training._dpsgd import (
    LocalResult,
    correct_per_row,
    evaluate,
    planned_event,
    train,
)
from insitu.training._models import (
    PARITY_TOLERANCE,
    ModelFn,
    Parity,
    build_model,
    check_parity,
    export_onnx,
    get_weights,
    onnx_parity,
    set_weights,
    weights_digest,
)

__all__ = [
    "DEFAULT_BATCH_RULE",
    "PARITY_TOLERANCE",
    "ArrayModelFn",
    "LocalResult",
    "ModelFn",
    "Parity",
    "ScaledInput",
    "build_cnn",
    "build_model",
    "check_dp_compatible",
    "check_parity",
    "correct_per_row",
    "default_batch",
    "default_learning_rate",
    "evaluate",
    "export_array_onnx",
    "export_onnx",
    "get_weights",
    "onnx_parity",
    "planned_event",
    "set_weights",
    "train",
    "weights_digest",
]
