"""Local inference with ONNX Runtime: verified in-memory sessions, explanations, egress guard.

Sessions are created only through :func:`create_session`. :class:`ModelRuntime` serves a
node's installed models (``insitu serve``, ``insitu predict``, ``insitu explain``);
:class:`RecordSchema` encodes records by the data schema of a model's card and reads
its outputs as labels and probabilities. ``docs/serving.md`` describes the guarantees
and their limits.

Layer 8: imports ``insitu.update``, ``insitu.bundle``, ``insitu.data`` and below;
``create_session`` is re-exported from the leaf ``insitu._ort``.
"""

from __future__ import annotations

from insitu._ort import create_session
from insitu.runtime._explain import (
    MAX_EXPLAIN_ROWS,
    Explainer,
    Explanation,
    global_importance,
    plot_global_importance,
)
from insitu.runtime._files import predict_file
from insitu.runtime._guard import EgressGuard, egress_guard
from insitu.runtime._images import (
    MAX_IMAGE_PIXELS,
    ImageExplanation,
    ImageInput,
    explain_image,
    heat_map_png,
)
from insitu.runtime._inputs import InputSpec
from insitu.runtime._occlusion import occlusion_map
from insitu.runtime._records import Answers, RecordSchema
from insitu.runtime._runtime import BatchObserver, LoadedModel, ModelRuntime
from insitu.runtime._sources import BundleFile, InstalledModel, ModelSource

__all__ = [
    "MAX_EXPLAIN_ROWS",
    "MAX_IMAGE_PIXELS",
    "Answers",
    "BatchObserver",
    "BundleFile",
    "EgressGuard",
    "Explainer",
    "Explanation",
    "ImageExplanation",
    "ImageInput",
    "InputSpec",
    "InstalledModel",
    "LoadedModel",
    "ModelRuntime",
    "ModelSource",
    "RecordSchema",
    "create_session",
    "egress_guard",
    "explain_image",
    "global_importance",
    "heat_map_png",
    "occlusion_map",
    "plot_global_importance",
    "predict_file",
]
