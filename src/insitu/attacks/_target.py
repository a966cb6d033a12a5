"""What an audit attacks, and the records it attacks with, read from insitu's own artefacts.

A *target* is a workspace model directory written by federated training
(``<home>/models/<run>/``: ``model.onnx``, ``model.pt``, ``features.json`` with the
feature names and the data schema, ``record.json`` with the run's settings) or a bare
ONNX file (with a schema given separately). The model is queried through ONNX Runtime:
the audit attacks the artefact that ships, not a Python object that resembles it.

Shadow models (LiRA) need the architecture and the training recipe. The architecture is
rebuilt from ``model.pt`` (a ``Sequential`` of ``Linear`` layers with ReLU between, the
families of ``insitu.federated``); the recipe from ``record.json``: the same epochs
(rounds x local epochs), batch size and learning rate, and, for a record-level DP run,
DP-SGD calibrated to the same epsilon. A federated run is approximated by centralized
training on the shadow's set; a bare ONNX file has no recipe, so LiRA is refused there.

Records are prepared exactly as training prepared them: the schema's minimization and
generalization (``insitu.data.prepare``; the pseudonymization key is a throwaway, as
identifiers never reach a model), then the schema-driven encoder. The overlap check uses
the schema's subject id when there is one, otherwise a digest of the whole raw row.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from insitu.attacks._membership import Predict, ShadowTrainer
from insitu.data import DataSchema, FeatureEncoder, Pseudonymizer, prepare, read_table
from insitu.errors import SchemaError, UsageError

__all__ = ["AuditTarget", "ShadowRecipe", "load_records", "load_target"]

_LAYER_KEY = re.compile(r"^(\d+)\.(weight|bias)$")


@dataclass(frozen=True)
class ShadowRecipe:
    """How shadow models are trained: like the target, as far as its record says."""

    epochs: int
    batch_size: int
    learning_rate: float
    epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0

    def to_json(self) -> dict[str, Any]:
        """Figures only."""
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "dp_epsilon": self.epsilon,
        }


@dataclass
class AuditTarget:
    """A model under audit: its outputs, its schema, its privacy on paper."""

    name: str
    onnx_sha256: str
    predict: Predict = field(repr=False)
    schema: DataSchema | None
    feature_names: list[str] | None
    privacy: str
    epsilon: float | None
    delta: float
    state_dict: dict[str, Any] | None = field(default=None, repr=False)
    recipe: ShadowRecipe | None = None
    #: The federated run that trained it (from the model directory's record), if known.
    run: str | None = None

    def shadow_trainer(self) -> ShadowTrainer | None:
        """A trainer of shadow models like this one, or None when it cannot be rebuilt."""
        if self.state_dict is None or self.recipe is None:
            return None
        layers = _linear_layers(self.state_dict)
        if layers is None:
            return None
        return _make_trainer(layers, self.recipe)


def _linear_layers(state: dict[str, Any]) -> list[tuple[int, int, int]] | None:
    """(index, in, out) of each Linear of a Sequential, or None for another architecture."""
    found: dict[int, tuple[int, int]] = {}
    for key, tensor in state.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            return None
        if match.group(2) == "weight":
            out_features, in_features = tuple(tensor.shape)
            found[int(match.group(1))] = (int(in_features), int(out_features))
    if not found:
        return None
    return [(i, *found[i]) for i in sorted(found)]


def _make_trainer(layers: list[tuple[int, int, int]], recipe: ShadowRecipe) -> ShadowTrainer:
    import torch
    from torch import nn

    from insitu.privacy import calibrate_noise
    from insitu.training import default_batch, planned_event, train

    def build() -> nn.Module:
        modules: list[nn.Module] = []
        for index, n_in, n_out in layers:
            while len(modules) < index:
                modules.append(nn.ReLU())
            modules.append(nn.Linear(n_in, n_out))
        return nn.Sequential(*modules)

    def trainer(features: np.ndarray, labels: np.ndarray, seed: int) -> Predict:
        torch.manual_seed(seed)
        model = build()
        batch_size = recipe.batch_size or default_batch(len(labels))
        event = None
        if recipe.epsilon is not None:
            planned = planned_event(
                rows=len(labels),
                batch_size=batch_size,
                epochs=recipe.epochs,
                noise_multiplier=1.0,
            )
            sigma = calibrate_noise(
                target_epsilon=recipe.epsilon,
                delta=recipe.delta,
                sample_rate=planned.sample_rate,
                steps=planned.steps,
            )
            event = planned_event(
                rows=len(labels),
                batch_size=batch_size,
                epochs=recipe.epochs,
                noise_multiplier=sigma,
            )
        train(
            model,
            features.astype(np.float32),
            labels.astype(np.int64),
            epochs=recipe.epochs,
            batch_size=batch_size,
            learning_rate=recipe.learning_rate,
            event=event,
            max_grad_norm=recipe.max_grad_norm,
            seed=seed,
        )
        model.eval()

        def predict(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                result: np.ndarray = model(torch.from_numpy(x.astype(np.float32))).numpy()
            return result

        return predict

    return trainer


def _onnx_predict(onnx_bytes: bytes) -> Predict:
    from insitu._ort import create_session

    session = create_session(onnx_bytes, intra_op_threads=1)
    input_name = session.get_inputs()[0].name

    def predict(features: np.ndarray) -> np.ndarray:
        outputs: list[np.ndarray] = []
        for start in range(0, len(features), 4096):
            chunk = np.ascontiguousarray(features[start : start + 4096], dtype=np.float32)
            outputs.append(np.asarray(session.run(None, {input_name: chunk})[0]))
        return np.concatenate(outputs) if outputs else np.zeros((0, 1), dtype=np.float32)

    return predict


def load_target(
    path: Path,
    *,
    schema: DataSchema | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
    shadow_epochs: int | None = None,
) -> AuditTarget:
    """Open a workspace model directory or an ONNX file for auditing.

    ``epsilon`` and ``delta`` override what the run's record says (needed for a bare
    ONNX file of a private model).

    Raises:
        UsageError: a path that is neither, or a file that is not ONNX.

    """
    if path.is_dir():
        onnx_path = path / "model.onnx"
        if not onnx_path.is_file():
            raise UsageError(
                f"{path} has no model.onnx: give a model directory written by "
                "'insitu federate' (<home>/models/<run>/) or an .onnx file"
            )
        features = json.loads((path / "features.json").read_text(encoding="utf-8"))
        record_path = path / "record.json"
        record = (
            json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
        )
        config = record.get("config", {})
        privacy = str(config.get("privacy", "unknown"))
        # The run's own epsilon (what it spent), else the target it was given.
        spent = record.get("epsilon_run") or config.get("epsilon")
        paper_eps = float(spent) if privacy in {"record", "site"} and spent else None
        paper_delta = float(config.get("delta", 0.0)) if paper_eps is not None else 0.0
        state = None
        if (path / "model.pt").is_file():
            import torch

            state = torch.load(path / "model.pt", weights_only=True)
        recipe = None
        if config:
            from insitu.training import default_learning_rate

            recipe = ShadowRecipe(
                epochs=shadow_epochs or int(config["rounds"]) * int(config["local_epochs"]),
                # 0: the run chose them (from each site's size, by its server optimizer);
                # the shadow models choose them by the same rules.
                batch_size=int(config["batch_size"]),
                learning_rate=float(config["learning_rate"])
                or default_learning_rate(str(config.get("server_optimizer", "fedavg"))),
                epsilon=paper_eps if privacy == "record" else None,
                delta=paper_delta or 1e-5,
                max_grad_norm=float(config.get("max_grad_norm", 1.0)),
            )
        onnx_bytes = onnx_path.read_bytes()
        return AuditTarget(
            name=path.name,
            onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest(),
            predict=_onnx_predict(onnx_bytes),
            schema=schema or DataSchema.from_dict(features["schema"]),
            feature_names=list(features["features"]),
            privacy=privacy,
            epsilon=paper_eps if epsilon is None else epsilon,
            delta=paper_delta if delta is None else delta,
            state_dict=state,
            recipe=recipe,
            run=record.get("run_id"),
        )
    if not path.is_file():
        raise UsageError(f"{path} does not exist: give a model directory or an .onnx file")
    onnx_bytes = path.read_bytes()
    try:
        predict = _onnx_predict(onnx_bytes)
    except Exception as exc:  # ONNX Runtime raises its own untyped errors
        raise UsageError(f"{path} is not an ONNX model ({exc})") from exc
    return AuditTarget(
        name=path.name,
        onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        predict=predict,
        schema=schema,
        feature_names=None,
        privacy="unknown" if epsilon is None else "given",
        epsilon=epsilon,
        delta=delta or 0.0,
    )


def load_records(
    path: Path, schema: DataSchema, feature_names: list[str] | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features, labels, record ids) of a raw CSV/Parquet file, prepared as for training.

    Raises:
        SchemaError: the file lacks a schema column, or encodes to other features than
            the model's.
        DataFormatError: unreadable file or values (from ``read_table`` / ``prepare``).

    """
    frame = read_table(path)
    schema.check_columns(frame.columns, source=path.name)
    if schema.subject and schema.subject in frame.columns:
        ids = frame[schema.subject].astype(str).tolist()
    else:
        # A 64-bit digest of every raw column: identical raw rows are the same record.
        ids = pd.util.hash_pandas_object(frame, index=False).astype(str).tolist()
    prepared = prepare(frame, schema, Pseudonymizer(os.urandom(32)), source=path.name, k=1).frame
    encoder = FeatureEncoder.for_schema(schema, prepared)
    if feature_names is not None and encoder.names != feature_names:
        raise SchemaError(
            f"{path.name} encodes to {len(encoder.names)} features under the schema, the model "
            f"takes {len(feature_names)}: prepare the audit data with the model's own schema"
        )
    return encoder.encode(prepared), encoder.labels(prepared), ids
