"""What ``insitu optimize`` starts from: four kinds of model, one :class:`SourceModel`.

* a **workspace model**: a directory written by ``insitu federate``
  (``<home>/models/<run>/`` with ``model.pt``, ``model.onnx``, ``features.json``,
  ``record.json``). The PyTorch model is rebuilt from ``record.json`` (family and
  width) and ``model.pt`` (loaded with ``weights_only=True``: no code runs); data
  files are prepared and encoded under the schema in ``features.json``, with the
  categories the model was trained on.
* a **PyTorch program**: a ``torch.export`` ``ExportedProgram`` saved with
  ``torch.export.save(program, "model.pt2")``. It carries its example input (the shape of
  one row) and its graph, and loading it runs no pickled code, unlike ``torch.save`` of
  a module. It must be exported with a dynamic batch axis
  (``dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)``): a fixed batch is baked
  into the program's reshapes, and is refused. In Python, a ``torch.nn.Module`` and an
  example batch can be passed directly.
* a **scikit-learn pipeline** in a pickle or joblib file, converted by skl2onnx.
  Loading a pickle executes whatever code it holds: only open files you made or trust.
  insitu logs a warning each time and never loads one implicitly.
* an **ONNX file**: quantized only (pruning and distillation need the trainable model,
  except that any source can teach a distilled student).

A source is named in the ledger by :attr:`SourceModel.ledger_sha256`: for a workspace
model the SHA-256 of its ``model.onnx`` (what the run's ``federation.completed`` entry
names; the fp32 export is rebuilt from ``model.pt`` and may differ in bytes), with the
digest of its weights to check ``model.pt`` against the run's record; otherwise the
digest of the ONNX bytes themselves.

Outputs: a single float output is read as logits (one column: a binary logit, positive
when > 0; K columns: argmax). A graph with an integer output and a float one (skl2onnx
classifiers) gives labels from the first and scores (probabilities) from the second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from insitu.errors import NotAModelError, UsageError
from insitu.optimize._export import export_sklearn, export_torch, set_mode
from insitu.optimize._onnx import check_model, input_spec

__all__ = ["SourceModel", "load_model", "scores_and_labels", "sklearn_source", "torch_source"]

logger = logging.getLogger(__name__)

Reference = Callable[[np.ndarray], np.ndarray]


@dataclass
class SourceModel:
    """A model to optimize, with its fp32 ONNX export and what its source can still do.

    ``reference`` computes the source's own scores (PyTorch eager, scikit-learn), against
    which every candidate's outputs are checked; ``module`` is the trainable PyTorch
    model that pruning fine-tunes (None for ONNX and scikit-learn sources).
    """

    name: str
    kind: str
    onnx: bytes = field(repr=False)
    input_name: str
    input_shape: tuple[int | None, ...]
    reference: Reference | None = field(default=None, repr=False)
    module: Any = field(default=None, repr=False)
    schema: Any = field(default=None, repr=False)
    encoder: Any = field(default=None, repr=False)
    model_dir: Path | None = None
    run_id: str | None = None
    #: SHA-256 of the ONNX file the source was read from when that is not :attr:`onnx`
    #: (a workspace model's ``model.onnx``, which its run's ledger entry names).
    file_onnx_sha256: str | None = None
    #: SHA-256 of the weights, as the federated trainer names them (workspace models).
    weights_sha256: str | None = None

    @property
    def sha256(self) -> str:
        """SHA-256 of the fp32 ONNX model (names the source in reports and the ledger)."""
        return hashlib.sha256(self.onnx).hexdigest()

    @property
    def ledger_sha256(self) -> str:
        """The digest by which a ledger names this model: its ONNX file's, else the export's.

        A federated run records the SHA-256 of the ``model.onnx`` it wrote
        (``federation.completed``); ``insitu optimize`` records the chosen model's. The
        fp32 export of a workspace model is rebuilt from ``model.pt`` and need not have
        the same bytes, so the file's digest is what links the source to its run.
        """
        return self.file_onnx_sha256 or self.sha256


def scores_and_labels(outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(float scores, integer labels) of a model's outputs; see the module docstring."""
    floats = [o for o in outputs if np.issubdtype(o.dtype, np.floating)]
    ints = [o for o in outputs if np.issubdtype(o.dtype, np.integer)]
    if not floats:
        return ints[0].astype(np.float32).reshape(len(ints[0]), -1), ints[0].reshape(-1)
    scores = floats[0].reshape(len(floats[0]), -1)
    if ints:
        return scores, ints[0].reshape(-1).astype(np.int64)
    if scores.shape[1] == 1:
        return scores, (scores[:, 0] > 0).astype(np.int64)
    return scores, scores.argmax(axis=1).astype(np.int64)


def _from_onnx(data: bytes, *, name: str, kind: str, **extra: Any) -> SourceModel:
    proto = check_model(data, name=name)
    input_name, shape, element = input_spec(proto, name=name)
    if element != "float32":
        raise NotAModelError(
            f"{name} takes {element} input; insitu optimizes models over float32 tensors"
        )
    return SourceModel(name, kind, data, input_name, shape, **extra)


def torch_source(module: Any, example: np.ndarray, *, name: str = "module") -> SourceModel:
    """A source from a PyTorch module and an example batch (float32, batch axis first)."""
    import torch

    example = np.ascontiguousarray(example, dtype=np.float32)
    module = set_mode(module, training=False)
    onnx_bytes = export_torch(module, example, name=name)

    def reference(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            result: np.ndarray = module(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        return result

    return _from_onnx(onnx_bytes, name=name, kind="pytorch", reference=reference, module=module)


def sklearn_source(estimator: Any, n_features: int, *, name: str = "pipeline") -> SourceModel:
    """A source from a fitted scikit-learn estimator or pipeline over ``n_features``."""
    onnx_bytes = export_sklearn(estimator, n_features, name=name)

    def reference(x: np.ndarray) -> np.ndarray:
        if hasattr(estimator, "predict_proba"):
            return np.asarray(estimator.predict_proba(x), dtype=np.float32)
        return np.asarray(estimator.predict(x), dtype=np.float32).reshape(len(x), -1)

    return _from_onnx(onnx_bytes, name=name, kind="sklearn", reference=reference)


def _workspace_source(path: Path) -> SourceModel:
    import torch

    from insitu.data import DataSchema, FeatureEncoder
    from insitu.training import build_model

    features = json.loads((path / "features.json").read_text(encoding="utf-8"))
    record_path = path / "record.json"
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    config = record.get("config", record)
    if "input" in features:  # images or signals: the model takes raw records
        return _array_source(path, features["input"], config, record)
    names: list[str] = list(features["features"])
    schema = DataSchema.from_dict(features["schema"])
    # The categories the model was trained on are in its feature names ("col=value").
    categories = {
        column: tuple(n.split("=", 1)[1] for n in names if n.startswith(f"{column}="))
        for column in schema.categorical
    }
    encoder = FeatureEncoder(schema, categories)
    if encoder.names != names:
        raise NotAModelError(
            f"{path}: features.json does not match its schema's encoding; the model directory "
            "was edited or written by another insitu version"
        )
    module = None
    if (path / "model.pt").is_file() and "model" in config:
        state = torch.load(path / "model.pt", weights_only=True)
        outputs = int(next(reversed(state.values())).shape[0])
        module = build_model(
            str(config["model"]),
            len(names),
            hidden=int(config.get("hidden", 32)),
            n_classes=2 if outputs == 1 else outputs,
        )
        module.load_state_dict(state)
        module.eval()
    if module is not None:
        example = np.zeros((2, len(names)), dtype=np.float32)
        source = torch_source(module, example, name=path.name)
        source.kind = "workspace"
    else:
        source = _from_onnx((path / "model.onnx").read_bytes(), name=path.name, kind="workspace")
    source.schema = schema
    source.encoder = encoder
    source.model_dir = path
    source.run_id = str(record.get("run_id", path.name))
    if (path / "model.onnx").is_file():
        source.file_onnx_sha256 = hashlib.sha256((path / "model.onnx").read_bytes()).hexdigest()
    if module is not None:
        from insitu.training import get_weights, weights_digest

        source.weights_sha256 = weights_digest(get_weights(module))
    return source


def _array_source(
    path: Path, spec: dict[str, Any], config: dict[str, Any], record: dict[str, Any]
) -> SourceModel:
    """A workspace model of array records (``features.json`` has ``input``).

    Its data is given as ``.npz`` of raw records (``x`` of the input's shape, ``y``).
    A model insitu cannot rebuild (a user's own module) is optimized from its ONNX file.
    """
    import math

    import torch

    from insitu.training import ArrayModelFn, ScaledInput, build_model, get_weights, weights_digest

    shape = tuple(int(n) for n in spec["shape"])
    classes = len(spec["label_names"])
    family = str(config.get("model", ""))
    onnx_bytes = (path / "model.onnx").read_bytes()
    if family not in ("cnn", "logistic", "mlp") or not (path / "model.pt").is_file():
        source = _from_onnx(onnx_bytes, name=path.name, kind="workspace")
    else:
        module = (
            ArrayModelFn(shape, classes)(math.prod(shape))
            if family == "cnn"
            else build_model(
                family, math.prod(shape), hidden=int(config.get("hidden", 32)), n_classes=classes
            )
        )
        module.load_state_dict(torch.load(path / "model.pt", weights_only=True))
        low, high = (float(v) for v in spec["value_range"])
        served = ScaledInput(module.eval(), low, high).eval()
        source = torch_source(served, np.zeros((2, *shape), np.float32), name=path.name)
        source.kind = "workspace"
        source.weights_sha256 = weights_digest(get_weights(module))
    source.model_dir = path
    source.run_id = str(record.get("run_id", path.name))
    source.file_onnx_sha256 = hashlib.sha256(onnx_bytes).hexdigest()
    return source


def load_model(path: Path, *, allow_pickle: bool = False) -> SourceModel:
    """Open ``path``: a workspace model directory, ``.pt2``, ``.onnx``, or a pickle.

    ``allow_pickle`` must be True to open a scikit-learn pickle (``.pkl``, ``.pickle``,
    ``.joblib``): unpickling runs code from the file.

    Raises:
        UsageError: a path that does not exist, or a pickle without ``allow_pickle``.
        NotAModelError: a file that is not a model of its kind.

    """
    path = Path(path)
    if path.is_dir():
        if not (path / "features.json").is_file():
            raise UsageError(
                f"{path} is not a model directory written by 'insitu federate' (no "
                "features.json); give <home>/models/<run>/, a .pt2, .onnx or pickle file"
            )
        return _workspace_source(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist; give a model directory or a model file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _from_onnx(path.read_bytes(), name=path.name, kind="onnx")
    if suffix == ".pt2":
        return _exported_program_source(path)
    if suffix in {".pkl", ".pickle", ".joblib"}:
        return _pickle_source(path, allow_pickle=allow_pickle)
    raise UsageError(
        f"{path.name}: unknown model format {suffix or '(no suffix)'}; give a model directory, "
        ".onnx, .pt2 (torch.export.save) or a scikit-learn .pkl/.joblib"
    )


def _exported_program_source(path: Path) -> SourceModel:
    import torch

    try:
        program = torch.export.load(path)
    except Exception as exc:  # torch raises RuntimeError, zipfile errors, KeyError...
        raise NotAModelError(
            f"{path.name} is not a torch.export program ({type(exc).__name__}); save one with "
            "torch.export.save(torch.export.export(model, (example,)), 'model.pt2')"
        ) from exc
    args: tuple[Any, ...] = program.example_inputs[0] if program.example_inputs else ()
    if len(args) != 1 or not isinstance(args[0], torch.Tensor):
        raise NotAModelError(
            f"{path.name} was exported with {len(args)} example inputs; insitu optimizes "
            "programs with one tensor input"
        )
    placeholder = next(
        n
        for n in program.graph.nodes
        if n.op == "placeholder" and n.name in program.graph_signature.user_inputs
    )
    if isinstance(placeholder.meta["val"].shape[0], int):
        raise NotAModelError(
            f"{path.name} was exported with a fixed batch of {args[0].shape[0]}; export it with "
            "dynamic_shapes=({0: torch.export.Dim('batch', min=1)},) so it runs on any batch"
        )
    example = args[0].detach().to(torch.float32).numpy()
    if len(example) < 2:
        example = np.repeat(example, 2, axis=0)
    return torch_source(program.module(), example, name=path.name)


def _pickle_source(path: Path, *, allow_pickle: bool) -> SourceModel:
    if not allow_pickle:
        raise UsageError(
            f"{path.name} is a pickle: loading it runs any code it holds; pass "
            "--allow-pickle if you made this file or trust whoever did"
        )
    logger.warning(
        "loading %s with pickle: this runs code from the file; open only files you trust",
        path.name,
    )
    try:
        if path.suffix.lower() == ".joblib":
            import joblib  # type: ignore[import-untyped]

            estimator = joblib.load(path)
        else:
            with path.open("rb") as handle:
                estimator = pickle.load(handle)  # noqa: S301 -- asked for, warned above
    except Exception as exc:  # unpickling raises anything the pickled code raises
        raise NotAModelError(f"{path.name} does not unpickle: {exc}") from exc
    n_features = getattr(estimator, "n_features_in_", None)
    if n_features is None:
        raise NotAModelError(
            f"{path.name} does not hold a fitted scikit-learn estimator (no n_features_in_)"
        )
    return sklearn_source(estimator, int(n_features), name=path.name)
