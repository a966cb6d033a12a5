"""Drift monitoring on Adult data shifted on purpose, with no input value stored."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from insitu.cli import run
from insitu.drift import (
    OUTPUT,
    DriftMonitor,
    ReferenceProfile,
    drift_status,
    population_stability_index,
    release_profile,
    two_sample_p_value,
)
from insitu.errors import BudgetExceededError
from insitu.workspace import Workspace
from insitu.workspace._config import load_config, save_config

from .conftest import AdultSetup, all_bytes, shift_age


def _feed(monitor: DriftMonitor, adult: AdultSetup, frame, version: str = "1.0.0") -> None:
    inputs = adult.encoder.encode(frame)
    for start in range(0, len(inputs), 512):
        batch = inputs[start : start + 512]
        monitor.on_batch("adult-income", version, batch, adult.outputs(batch))
    monitor.check()


def test_shifted_feature_is_flagged_and_the_other_is_not(
    adult: AdultSetup, workspace: Workspace
) -> None:
    monitor = DriftMonitor(workspace)
    monitor.register("adult-income", "1.0.0", adult.profile)
    _feed(monitor, adult, shift_age(adult.live))
    figures = {f.feature: f for f in monitor.figures()[("adult-income", "1.0.0")]}
    assert figures["age"].flagged
    assert figures["age"].psi > 0.2
    assert figures["age"].p_value < 1e-6
    assert not figures["hr_per_week"].flagged
    assert figures["hr_per_week"].psi < 0.05
    flagged = {f for f, d in figures.items() if d.flagged and f != OUTPUT}
    assert flagged == {"age"}
    with workspace.ledger() as ledger:
        events = ledger.entries(event_type="drift.detected")
    assert [e.payload["feature"] for e in events if e.payload["feature"] != OUTPUT] == ["age"]
    text = monitor.prometheus_text()
    assert 'insitu_drift_flagged{feature="age",model="adult-income",version="1.0.0"} 1.0' in text
    assert (
        'insitu_drift_flagged{feature="hr_per_week",model="adult-income",version="1.0.0"} 0.0'
        in text
    )


def test_unshifted_data_flags_nothing(adult: AdultSetup, workspace: Workspace) -> None:
    monitor = DriftMonitor(workspace)
    monitor.register("adult-income", "1.0.0", adult.profile)
    _feed(monitor, adult, adult.live)
    figures = monitor.figures()[("adult-income", "1.0.0")]
    assert not [f.feature for f in figures if f.flagged]
    with workspace.ledger() as ledger:
        assert not ledger.entries(event_type="drift.detected")


def test_no_raw_value_is_stored_in_the_workspace(adult: AdultSetup, workspace: Workspace) -> None:
    monitor = DriftMonitor(workspace)
    monitor.register("adult-income", "1.0.0", adult.profile)
    live = shift_age(adult.live)
    _feed(monitor, adult, live)
    stored = all_bytes(workspace.home) + b"".join(all_bytes(s.home) for s in adult.sites)
    inputs = adult.encoder.encode(live)
    # Distinctive encoded values (capital gain / loss, scaled by the schema's ranges):
    # neither their text nor their binary forms may appear anywhere.
    columns = [adult.encoder.names.index("capital_gain"), adult.encoder.names.index("capital_loss")]
    values = {
        float(v)
        for c in columns
        for v in np.unique(inputs[:, c])
        if 0 < v < 1 and len(repr(float(v))) > 8
    }
    assert len(values) > 50
    for value in values:
        for needle in (
            repr(value).encode(),
            f"{value:.6f}".encode(),
            np.float32(value).tobytes(),
            np.float64(value).tobytes(),
        ):
            assert needle not in stored, value
    # Record ids of the live data never reach the monitor; raw ages of single rows neither.
    state = json.loads((workspace.home / "drift" / "adult-income@1.0.0.json").read_text())
    assert set(state) == {"model", "version", "rows", "updated", "counts", "reference", "figures"}
    assert all(isinstance(x, int) for xs in state["counts"].values() for x in xs)


def test_status_command_reads_the_state_and_current_thresholds(
    adult: AdultSetup, workspace: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    monitor = DriftMonitor(workspace)
    monitor.register("adult-income", "1.0.0", adult.profile)
    _feed(monitor, adult, shift_age(adult.live))
    capsys.readouterr()
    assert run(["drift", "status", "--home", str(workspace.home), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["models"][0]["flagged"][:1] == ["age"]
    assert run(["drift", "status", "--home", str(workspace.home)]) == 0
    assert "age" in capsys.readouterr().out
    # A looser threshold, read at the next status: nothing flagged any more.
    config = load_config(workspace.config_path)
    config.sections["drift"] = {"psi_threshold": 9.5}
    save_config(workspace.config_path, config)
    assert drift_status(Workspace.open(workspace.home))[0]["flagged"] == []


@pytest.mark.parametrize(
    "setting", ["psi_threshold = 0.0", "psi_threshold = 11.0", "p_value = 1.5", "min_samples = 0"]
)
def test_drift_threshold_out_of_range_is_one_line_exit_1(
    workspace: Workspace, setting: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = workspace.config_path
    path.write_text(path.read_text() + f"\n[drift]\n{setting}\n")
    capsys.readouterr()
    assert run(["drift", "status", "--home", str(workspace.home)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "drift." in err


def test_profile_release_is_charged_to_the_site_budget(adult: AdultSetup, tmp_path) -> None:
    ws, _ = Workspace.init(tmp_path / "small", name="small-site")
    config = load_config(ws.config_path)
    config.sections["privacy"] = {"epsilon_budget": 0.5}
    save_config(ws.config_path, config)
    ws = Workspace.open(ws.home)
    inputs = adult.encoder.encode(adult.reference.iloc[:500])
    with pytest.raises(BudgetExceededError):
        release_profile(
            ws,
            adult.layout,
            inputs,
            None,
            subject_keys=np.arange(500, dtype=np.uint64),
            dataset="adult-income",
            epsilon=1.0,
        )
    with ws.ledger() as ledger:
        assert ledger.entries(event_type="privacy.budget_refused")
        assert not ledger.entries(event_type="drift.profile_released")
    # The three sites of the fixture each paid for theirs.
    for site in adult.sites:
        with site.ledger() as ledger:
            spent = ledger.entries(event_type="privacy.spent")
        assert [e.payload["mechanism"] for e in spent] == ["drift-reference-histograms"]
        assert 0.99 < spent[0].payload["epsilon_max_after"] <= 1.0


def test_profile_roundtrips_through_the_card(adult: AdultSetup) -> None:
    from insitu.bundle import ModelCard

    card = ModelCard("adult-income", "1.0.0", [], [], drift_reference=adult.profile.to_json())
    again = ModelCard.from_json(json.loads(card.to_bytes()))
    assert ReferenceProfile.from_json(again.drift_reference or {}) == adult.profile
    plain = ModelCard("adult-income", "1.0.0", [], [])
    assert "drift_reference" not in plain.to_json()  # older cards keep their bytes
    monitor = DriftMonitor()
    assert monitor.register_card(again)
    assert not monitor.register_card(plain)


counts = st.lists(st.integers(0, 10_000), min_size=2, max_size=12)


@settings(max_examples=60, deadline=None)
@given(counts, st.data())
def test_psi_and_p_value_are_well_formed(reference: list[int], data: st.DataObject) -> None:
    live = data.draw(
        st.lists(st.integers(0, 10_000), min_size=len(reference), max_size=len(reference))
    )
    psi = population_stability_index(np.array(reference), np.array(live))
    assert psi >= 0
    assert population_stability_index(np.array(reference), np.array(reference)) == 0
    assert 0.0 <= two_sample_p_value(np.array(reference), np.array(live)) <= 1.0


@settings(max_examples=40, deadline=None)
@given(counts, st.data())
def test_p_value_is_scipys_chi2_contingency(reference: list[int], data: st.DataObject) -> None:
    from scipy.stats import chi2_contingency

    live = data.draw(
        st.lists(st.integers(0, 10_000), min_size=len(reference), max_size=len(reference))
    )
    ref, cur = np.array(reference, float), np.array(live, float)
    keep = (ref + cur) > 0
    if keep.sum() < 2 or ref.sum() == 0 or cur.sum() == 0:
        assert two_sample_p_value(ref, cur) == 1.0
        return
    expected = chi2_contingency(np.vstack([ref[keep], cur[keep]]), correction=False).pvalue
    assert two_sample_p_value(ref, cur) == pytest.approx(expected, rel=1e-6, abs=1e-12)
