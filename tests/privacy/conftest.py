"""Shared data and models of the privacy-audit tests: small, seeded, single-threaded."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from insitu.data import DataSchema, FeatureEncoder, Pseudonymizer, prepare, read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.privacy import SecureRandom, calibrate_noise
from insitu.training import build_model, planned_event, train

#: 300 members (small: the non-private model memorizes them), 1000 non-members (enough to
#: read a TPR at 1% FPR from 10 false positives).
MEMBERS = 300
NON_MEMBERS = 1000
HIDDEN = 128
LEARNING_RATE = 0.5


@dataclass(frozen=True)
class AdultSplit:
    schema: DataSchema
    member_rows: pd.DataFrame
    non_member_rows: pd.DataFrame
    x_m: np.ndarray
    y_m: np.ndarray
    x_n: np.ndarray
    y_n: np.ndarray
    names: list[str]


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models on 2 shared cores: threads only contend.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def adult() -> AdultSplit:
    schema = DataSchema.load(builtin_schema("adult"))
    frame = read_table(builtin_data("adult"))
    order = np.random.default_rng(7).permutation(len(frame))
    member_rows = frame.iloc[order[:MEMBERS]].reset_index(drop=True)
    non_member_rows = frame.iloc[order[MEMBERS : MEMBERS + NON_MEMBERS]].reset_index(drop=True)
    encoder = FeatureEncoder.for_schema(schema)

    def encode(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        prepared = prepare(rows, schema, Pseudonymizer(b"k" * 32), source="test", k=1).frame
        return encoder.encode(prepared), encoder.labels(prepared)

    x_m, y_m = encode(member_rows)
    x_n, y_n = encode(non_member_rows)
    return AdultSplit(schema, member_rows, non_member_rows, x_m, y_m, x_n, y_n, encoder.names)


def train_target(split: AdultSplit, *, epsilon: float | None, seed: int = 0) -> torch.nn.Module:
    """The audit's target: an MLP on the members, plain SGD (overfit) or DP-SGD."""
    torch.manual_seed(seed)
    model = build_model("mlp", split.x_m.shape[1], hidden=HIDDEN)
    event = None
    epochs, batch = 150, 32
    if epsilon is not None:
        epochs, batch = 20, 64
        planned = planned_event(rows=MEMBERS, batch_size=batch, epochs=epochs, noise_multiplier=1)
        sigma = calibrate_noise(
            target_epsilon=epsilon,
            delta=1e-5,
            sample_rate=planned.sample_rate,
            steps=planned.steps,
        )
        event = planned_event(rows=MEMBERS, batch_size=batch, epochs=epochs, noise_multiplier=sigma)
    train(
        model,
        split.x_m,
        split.y_m,
        epochs=epochs,
        batch_size=batch,
        learning_rate=LEARNING_RATE,
        event=event,
        max_grad_norm=1.0,
        seed=seed,
    )
    return model.eval()


def predict_of(model: torch.nn.Module):
    def predict(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(features)).numpy()

    return predict


@pytest.fixture(scope="session")
def overfit_model(adult: AdultSplit) -> torch.nn.Module:
    return train_target(adult, epsilon=None)


@pytest.fixture(scope="session")
def dp_model(adult: AdultSplit) -> torch.nn.Module:
    return train_target(adult, epsilon=1.0)


class SeededRandom(SecureRandom):
    """The predictable-noise bug, for audits: sampling and noise replayed from a seed.

    An earlier insitu drew DP noise from ``torch.manual_seed(cfg.seed)``; whoever reads
    the published seed replays the draws. Here the uniform (hence Bernoulli) draws and
    the Gaussian draws come from two NumPy generators seeded with ``seed`` and
    ``seed + 1``: nothing is keyed from the OS.
    """

    def __init__(self, seed: int) -> None:
        # Deliberately no SecureRandom.__init__: no OS key, only the published seed.
        self._uniforms = np.random.default_rng(seed)
        self._normals = np.random.default_rng(seed + 1)

    def __repr__(self) -> str:
        return "SeededRandom(published seed: broken on purpose)"

    def uniform(self, count: int) -> np.ndarray:
        return self._uniforms.random(count)

    def normal(self, shape: tuple[int, ...], *, std: float) -> np.ndarray:
        return self._normals.normal(0.0, std, size=shape)
