"""Small seeded models and data of the optimization tests (one thread: 2 shared cores)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from insitu.data import DataSchema, FeatureEncoder, Pseudonymizer, prepare, read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.training import build_model, export_onnx, train


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass(frozen=True)
class Adult:
    schema: DataSchema
    names: list[str]
    cal_rows: pd.DataFrame
    eval_rows: pd.DataFrame
    x_cal: np.ndarray
    y_cal: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray
    model: nn.Module


@pytest.fixture(scope="session")
def adult() -> Adult:
    schema = DataSchema.load(builtin_schema("adult"))
    frame = read_table(builtin_data("adult"))
    order = np.random.default_rng(3).permutation(len(frame))
    parts = [
        frame.iloc[order[a:b]].reset_index(drop=True)
        for a, b in ((0, 3000), (3000, 4000), (4000, 5000))
    ]
    encoder = FeatureEncoder.for_schema(schema)

    def encode(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        prepared = prepare(rows, schema, Pseudonymizer(b"k" * 32), source="test", k=1).frame
        return encoder.encode(prepared), encoder.labels(prepared)

    (x_tr, y_tr), (x_cal, y_cal), (x_ev, y_ev) = (encode(p) for p in parts)
    torch.manual_seed(0)
    model = build_model("mlp", x_tr.shape[1], hidden=64)
    train(
        model,
        x_tr,
        y_tr,
        epochs=4,
        batch_size=32,
        learning_rate=0.1,
        event=None,
        max_grad_norm=1.0,
        seed=0,
    )
    return Adult(schema, encoder.names, parts[1], parts[2], x_cal, y_cal, x_ev, y_ev, model.eval())


def write_model_dir(path: Path, adult: Adult, *, hidden: int = 64) -> Path:
    """A model directory laid out as 'insitu federate' writes it."""
    path.mkdir(parents=True)
    buffer = io.BytesIO()
    torch.save(adult.model.state_dict(), buffer)
    (path / "model.pt").write_bytes(buffer.getvalue())
    (path / "model.onnx").write_bytes(export_onnx(adult.model, len(adult.names)))
    (path / "features.json").write_text(
        json.dumps({"features": adult.names, "schema": adult.schema.source})
    )
    record = {"run_id": path.name, "config": {"model": "mlp", "hidden": hidden}}
    (path / "record.json").write_text(json.dumps(record))
    return path


@dataclass(frozen=True)
class Digits:
    x_cal: np.ndarray
    y_cal: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray
    model: nn.Module


@pytest.fixture(scope="session")
def digits() -> Digits:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    tr, cal, ev = order[:1000], order[1000:1400], order[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 16, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        for start in range(0, len(tr), 64):
            index = tr[start : start + 64]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(
                model(torch.from_numpy(x[index])), torch.from_numpy(y[index])
            )
            loss.backward()
            optimizer.step()
    return Digits(x[cal], y[cal], x[ev], y[ev], model.eval())
