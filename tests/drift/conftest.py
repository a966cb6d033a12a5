"""Adult data, its schema, and a reference profile released by three sites under DP."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from insitu.data import DataSchema, FeatureEncoder, read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.drift import ProfileLayout, ReferenceProfile, combine_releases, release_profile
from insitu.workspace import Workspace


@dataclass
class AdultSetup:
    schema: DataSchema
    encoder: FeatureEncoder
    layout: ProfileLayout
    reference: pd.DataFrame
    live: pd.DataFrame
    weights: np.ndarray
    profile: ReferenceProfile
    sites: list[Workspace]

    def outputs(self, inputs: np.ndarray) -> np.ndarray:
        """A fixed linear scorer standing in for the model (one logit per row)."""
        return (inputs @ self.weights - 1.0)[:, None].astype(np.float32)


@pytest.fixture(scope="module")
def adult(tmp_path_factory: pytest.TempPathFactory) -> AdultSetup:
    schema = DataSchema.load(builtin_schema("adult"))
    frame = read_table(builtin_data("adult")).sample(frac=1.0, random_state=7)
    frame = frame.reset_index(drop=True)
    half = len(frame) // 2
    reference, live = frame.iloc[:half], frame.iloc[half:].reset_index(drop=True)
    encoder = FeatureEncoder.for_schema(schema)
    layout = ProfileLayout.from_schema(schema, bins=10)
    weights = np.random.default_rng(0).normal(0, 1, layout.n_inputs)
    base = tmp_path_factory.mktemp("sites")
    sites, releases = [], []
    for index, part in enumerate(np.array_split(np.arange(half), 3)):
        ws, _ = Workspace.init(base / f"site-{index}", name=f"site-{index}")
        inputs = encoder.encode(reference.iloc[part])
        releases.append(
            release_profile(
                ws,
                layout,
                inputs,
                (inputs @ weights - 1.0)[:, None],
                subject_keys=np.arange(len(part), dtype=np.uint64) + np.uint64(1),
                dataset=schema.name,
                epsilon=1.0,
            )
        )
        sites.append(ws)
    profile = combine_releases(layout, releases)
    return AdultSetup(schema, encoder, layout, reference, live, weights, profile, sites)


def shift_age(frame: pd.DataFrame, years: int = 15) -> pd.DataFrame:
    """The live data with one feature moved on purpose: everyone ``years`` older."""
    moved = frame.copy()
    moved["age"] = np.clip(moved["age"].astype(float) + years, 17, 90)
    return moved


def all_bytes(home: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file())
