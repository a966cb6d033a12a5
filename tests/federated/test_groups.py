"""Performance per group of persons: counted where the data is, released under DP, charged.

The site's release (``insitu.federated._groups.release_groups``) is exercised directly on a
small held-out set with a model whose predictions are known; one run of Flower's
simulation engine on Adult shows the whole path: sites release, the coordinator sums and
records ``evaluation.groups``, the report shows accuracy by sex and by race with intervals.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from insitu.data import DataSchema, FeatureEncoder, TrainingData
from insitu.datasets import builtin_schema
from insitu.federated import FederationConfig, simulate
from insitu.federated import _groups as groups_module
from insitu.federated._groups import (
    CELLS,
    OTHER,
    group_counts,
    group_keys,
    group_noise_std,
    release_groups,
)
from insitu.privacy import SecureRandom
from insitu.report import build_report, render_html
from insitu.workspace import Workspace

SCHEMA = DataSchema.from_dict(
    {
        "dataset": {"name": "toy", "label": "y", "positive": "1"},
        "features": {
            "numeric": ["a"],
            "categorical": ["sex"],
            "ranges": {"a": [0, 1]},
            "categories": {"sex": ["Female", "Male"]},
        },
        "consent": {"required": False, "legal_basis": "GDPR art. 6(1)(e), test"},
        "groups": {"sensitive": ["sex"], "min_size": 2},
    }
)
CONFIG = FederationConfig(sites=1, rounds=1, privacy="record", secure_aggregation=False)
#: Every seed a participant can read: the config's, the old per-round seed, a guess.
PUBLISHED_SEEDS = (CONFIG.seed, CONFIG.seed * 1000 + 1, 42)


def held_out(rows: int = 40) -> TrainingData:
    """Held-out rows: ``a`` decides the prediction, sex alternates, one sex is unknown."""
    a = (np.arange(rows) % 4 >= 2).astype(float)  # predicted positive where a == 1
    sex = np.where(np.arange(rows) % 2 == 0, "Female", "Male").astype(object)
    sex[-1] = "Other"  # outside the declared categories
    y = (np.arange(rows) % 3 == 0).astype(int)
    frame = pd.DataFrame({"a": a, "sex": sex, "y": y.astype(str)})
    encoder = FeatureEncoder.for_schema(SCHEMA)
    keys = np.arange(rows, dtype=np.uint64)
    keys[1] = keys[0]  # one subject with two records
    return TrainingData(
        features=encoder.encode(frame),
        labels=y.astype(np.int64),
        feature_names=encoder.names,
        rows=rows,
        excluded_without_consent=0,
        purpose="training",
        at="2026-12-07T00:00:00Z",
        subject_keys=keys,
    )


def threshold_model(data: TrainingData) -> torch.nn.Module:
    """Predicts positive exactly where ``a`` is 1."""
    model = torch.nn.Linear(len(data.feature_names), 1)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, data.feature_names.index("a")] = 10.0
        model.bias.fill_(-5.0)
    return model


def exact(data: TrainingData) -> np.ndarray:
    predicted = data.features[:, data.feature_names.index("a")] > 0.5
    return group_counts(SCHEMA, data, predicted)


def test_each_subject_counts_once_per_attribute_in_its_confusion_cell():
    data = held_out()
    counts = exact(data)
    keys = [k for k, *_ in group_keys(SCHEMA)]
    assert keys[:4] == [f"group:sex=Female:{c}" for c in CELLS]
    assert keys[-4:] == [f"group:sex={OTHER}:{c}" for c in CELLS]
    assert counts.sum() == pytest.approx(data.subjects)  # 39 subjects, 40 records
    by_key = dict(zip(keys, counts, strict=True))
    # Row 0 (Female, label 1, predicted 0: a false negative) and row 1 (Male, label 0,
    # predicted 0: a true negative) are one subject: half a count in each cell.
    assert by_key["group:sex=Female:fn"] % 1 == pytest.approx(0.5)
    assert by_key["group:sex=Male:tn"] % 1 == pytest.approx(0.5)
    assert sum(by_key[f"group:sex={OTHER}:{c}"] for c in CELLS) == pytest.approx(1.0)


def test_the_release_is_noisy_and_charged_to_the_held_out_subjects(workspace):
    data = held_out()
    sent = release_groups(
        workspace, data, threshold_model(data), SCHEMA, CONFIG, run="r1", round_number=1,
        dataset="toy",
    )  # fmt: skip
    assert list(sent) == [k for k, *_ in group_keys(SCHEMA)]
    assert not any(float(v).is_integer() for v in sent.values())
    with workspace.ledger() as ledger:
        (spent,) = ledger.entries(event_type="privacy.spent")
    assert spent.payload["mechanism"] == "evaluation-groups"
    assert spent.payload["subjects"] == data.subjects
    assert spent.payload["run"] == "r1"
    assert spent.payload["epsilon_run"] == pytest.approx(CONFIG.evaluation_epsilon, rel=0.05)
    # One attribute: the noise per cell is the Gaussian mechanism's for one release.
    assert group_noise_std(CONFIG, SCHEMA) == pytest.approx(spent.payload["noise_multiplier"])


def test_a_site_at_its_budget_refuses_the_group_release(workspace):
    ws = workspace.with_config("privacy", epsilon_budget=0.6)
    data = held_out()
    model = threshold_model(data)
    first = release_groups(ws, data, model, SCHEMA, CONFIG, run="r1", round_number=1, dataset="toy")
    assert first  # 0.5 of 0.6: released
    second = release_groups(
        ws, data, model, SCHEMA, CONFIG, run="r2", round_number=1, dataset="toy"
    )
    assert second == {}  # a second release would take every subject past 0.6
    with ws.ledger() as ledger:
        spent = ledger.entries(event_type="privacy.spent")
        refused = ledger.entries(event_type="privacy.budget_refused")
    assert [e.payload["mechanism"] for e in spent] == ["evaluation-groups"]
    assert [e.payload["mechanism"] for e in refused] == ["evaluation-groups"]
    assert refused[0].payload["excluded_over_budget"] == data.subjects


class SeededRandom(SecureRandom):
    """The bug, kept as a control: noise from NumPy's generator seeded by the public seed."""

    def normal(self, shape: tuple[int, ...], *, std: float) -> np.ndarray:
        return np.random.default_rng(CONFIG.seed).normal(0.0, std, shape)


def _replays(shape: tuple[int, ...], std: float) -> list[np.ndarray]:
    """Every draw an attacker who knows the published seeds can reproduce."""
    draws = []
    for seed in PUBLISHED_SEEDS:
        draws.append(np.random.default_rng(seed).normal(0.0, std, shape))
        draws.append(np.random.RandomState(seed).normal(0.0, std, shape))
        generator = torch.Generator().manual_seed(seed)
        draws.append(torch.normal(0.0, std, size=shape, generator=generator).double().numpy())
    return draws


def _noise(ws: Workspace, data: TrainingData, run: str) -> np.ndarray:
    sent = release_groups(
        ws, data, threshold_model(data), SCHEMA, CONFIG, run=run, round_number=1, dataset="toy"
    )
    return np.asarray(list(sent.values())) - exact(data)


def test_attack_group_counts_noise_cannot_be_replayed_from_any_published_seed(
    workspace, monkeypatch
):
    data = held_out()
    std = group_noise_std(CONFIG, SCHEMA)
    first, second = _noise(workspace, data, "r1"), _noise(workspace, data, "r2")
    # The same data, the same published settings and seed: two different noise draws.
    assert not np.allclose(first, second)
    assert np.abs(first).mean() > std / 10
    for replay in _replays(first.shape, std):
        assert not np.allclose(first - replay, 0.0, atol=1e-6)
    # Control: with noise from a seeded generator the same attack strips it exactly.
    monkeypatch.setattr(groups_module, "SecureRandom", SeededRandom)
    broken = _noise(workspace, data, "r3")
    assert any(
        np.allclose(broken - replay, 0.0, atol=1e-6) for replay in _replays(broken.shape, std)
    )


def test_no_group_is_released_under_site_level_privacy_or_without_sensitive_attributes(
    workspace,
):
    data = held_out()
    model = threshold_model(data)
    site = FederationConfig(sites=3, rounds=1, privacy="site", secure_aggregation=False)
    plain = DataSchema.from_dict(SCHEMA.source | {"groups": {}})
    assert (
        release_groups(workspace, data, model, SCHEMA, site, run="r", round_number=1, dataset="t")
        == {}
    )
    assert (
        release_groups(workspace, data, model, plain, CONFIG, run="r", round_number=1, dataset="t")
        == {}
    )
    with workspace.ledger() as ledger:
        assert not ledger.entries(event_type="privacy.spent")


# -- the whole path, on Flower's simulation engine --------------------------------------


def adult_schema() -> DataSchema:
    """The carried Adult schema (its [groups] included), for a frame without record ids."""
    doc = DataSchema.load(builtin_schema("adult")).source
    doc["dataset"].pop("subject")
    doc["identifiers"]["direct"] = []
    doc["treatment"]["drop"] = []
    doc["consent"] = {"required": False, "legal_basis": "GDPR art. 6(1)(e), test"}
    return DataSchema.from_dict(doc)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_adult_accuracy_by_sex_and_by_race_with_intervals_reaches_the_report(workspace, adult):
    schema = adult_schema()
    config = FederationConfig(sites=3, rounds=1, privacy="record", secure_aggregation=False)
    result = simulate(workspace, adult, config, schema=schema)

    for home in result.site_homes:  # each site charged the release to its subjects
        with Workspace.open(home).ledger() as ledger:
            spent = [e.payload["mechanism"] for e in ledger.entries(event_type="privacy.spent")]
            (reply,) = [
                e.payload
                for e in ledger.entries(event_type="federation.egress")
                if e.payload["message"] == "evaluate"
            ]
        assert spent == ["dp-sgd", "evaluation", "evaluation-groups"]
        # What the aggregator reads off the site's reply: noisy numbers, nothing else.
        sent = {k: v for k, v in reply["metrics_sent"].items() if ".group:" in k}
        assert len(sent) == len(group_keys(schema))
        assert not any(float(v).is_integer() for v in sent.values())
        assert reply["unclassified_bytes"] == 0
    with workspace.ledger() as ledger:
        (entry,) = ledger.entries(event_type="evaluation.groups")
    payload = entry.payload
    assert payload["sites"] == ["site-01", "site-02", "site-03"]
    assert payload["attributes"] == ["sex", "race"]
    assert (payload["min_size"], payload["max_gap"]) == (100, 0.05)
    assert payload["noise_std"] > 0
    assert payload["noise_std"] == pytest.approx(group_noise_std(config, schema))
    cells = [
        v for values in payload["groups"].values() for c in values.values() for v in c.values()
    ]
    assert not any(float(v).is_integer() for v in cells)  # noisy sums, never exact counts

    report = build_report([workspace.home])
    section = report.sections["groups"]
    assert section["measured"]
    assert [a["name"] for a in section["attributes"]] == ["sex", "race"]
    for attribute in section["attributes"]:
        for row in attribute["rows"]:
            if row["suppressed"]:
                assert row["count"] < 100
                assert row["accuracy"] is None
                continue
            assert row["count"] >= 100
            accuracy = row["accuracy"]
            assert 0 <= accuracy["low"] < accuracy["value"] < accuracy["high"] <= 1
    sex = {r["value"]: r for r in section["attributes"][0]["rows"]}
    race = {r["value"]: r for r in section["attributes"][1]["rows"]}
    assert not sex["Female"]["suppressed"]
    assert not sex["Male"]["suppressed"]
    assert not race["White"]["suppressed"]
    assert not race["Black"]["suppressed"]
    # Adult's well-known gap: the model is right more often for women (fewer positives).
    gap = section["attributes"][0]["gap"]
    assert gap["flagged"]
    assert gap["between"] == ["Female", "Male"]
    assert math.isclose(
        gap["value"], sex["Female"]["accuracy"]["value"] - sex["Male"]["accuracy"]["value"]
    )
    html = render_html(report)
    assert "Performance per group of persons" in html
    assert "accuracy per group of persons is not measured" not in html
    assert "Largest gap in accuracy by sex" in html
    assert "FLAGGED" in html
