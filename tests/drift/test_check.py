"""A check compares all histograms at once, and its figures are the one-histogram ones.

``ReferenceHistograms.compare`` runs the arithmetic of PSI and of the chi-square test once
over every histogram laid end to end. Its figures must be those of the statistics as
first written, to the last bit (a flag is a comparison with a threshold; a reported
figure is rounded): the two functions are kept here verbatim as they were before the
check was vectorised, and the property tests compare with ``==``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from insitu.drift import DriftMonitor, population_stability_index, two_sample_p_value
from insitu.drift._stats import PSI_FLOOR, ReferenceHistograms, chi_square_tail
from insitu.errors import UsageError
from insitu.workspace import Workspace

from .conftest import AdultSetup


def psi_as_first_written(reference: np.ndarray, live: np.ndarray) -> float:
    ref = np.clip(np.asarray(reference, dtype=np.float64), 0.0, None)
    cur = np.clip(np.asarray(live, dtype=np.float64), 0.0, None)
    if ref.sum() <= 0 or cur.sum() <= 0:
        return 0.0
    p = np.maximum(ref / ref.sum(), PSI_FLOOR)
    q = np.maximum(cur / cur.sum(), PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def p_value_as_first_written(reference: np.ndarray, live: np.ndarray) -> float:
    # The tail was SciPy's chdtrc; chi_square_tail is held to it below.
    ref = np.clip(np.asarray(reference, dtype=np.float64), 0.0, None)
    cur = np.clip(np.asarray(live, dtype=np.float64), 0.0, None)
    keep = (ref + cur) > 0
    if keep.sum() < 2 or ref.sum() <= 0 or cur.sum() <= 0:
        return 1.0
    table = np.vstack([ref[keep], cur[keep]])
    total = table.sum()
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / total
    statistic = float(np.sum((table - expected) ** 2 / expected))
    p = chi_square_tail(table.shape[1] - 1, statistic)
    return 1.0 if math.isnan(p) else p


#: Noisy references (two decimals, some negative, some all zero) as a card carries them.
references = st.lists(
    st.one_of(
        st.just(0.0),
        st.floats(-30, 30).map(lambda v: round(v, 2)),
        st.floats(-50, 90_000).map(lambda v: round(v, 2)),
    ),
    min_size=1,
    max_size=45,
)


def lives(size: int) -> st.SearchStrategy[list[float]]:
    whole = st.one_of(st.just(0.0), st.integers(0, 5).map(float), st.integers(0, 10**7).map(float))
    # Restored or hand-made counts need not be whole numbers, nor positive.
    any_count = st.one_of(whole, st.floats(-5, 1e6))
    return st.one_of(
        st.lists(whole, min_size=size, max_size=size),
        st.lists(any_count, min_size=size, max_size=size),
    )


@settings(max_examples=150, deadline=None)
@given(st.lists(references, min_size=1, max_size=8), st.data())
def test_a_check_gives_the_figures_of_the_statistics_as_first_written(
    reference: list[list[float]], data: st.DataObject
) -> None:
    live = [np.array(data.draw(lives(len(r)))) for r in reference]
    psi, p_value, rows = ReferenceHistograms(reference).compare(np.concatenate(live))
    for index, (ref, cur) in enumerate(zip(reference, live, strict=True)):
        ref_array = np.array(ref)
        with np.errstate(all="ignore"):  # tiny counts: the expected cells underflow
            expected_psi = psi_as_first_written(ref_array, cur)
            expected_p = p_value_as_first_written(ref_array, cur)
            assert population_stability_index(ref_array, cur) == expected_psi
            assert two_sample_p_value(ref_array, cur) == expected_p
        assert psi[index] == expected_psi
        assert p_value[index] == expected_p
        assert rows[index] == float(np.sum(cur))


def test_a_bin_empty_on_both_sides_leaves_the_test_as_first_written() -> None:
    # Dropping the empty bin changes how the reference row sums (the order of a float
    # sum): the compared table must be summed as the one-histogram code sums it.
    reference = [404.55, 198.51, 0.0, 580.33, 298.7, 671.99, 199.52, 942.11, 365.11, 105.5]
    reference += [629.11, 927.15]
    live = np.array([3.0, 9, 0, 5, 1, 7, 2, 8, 4, 1, 6, 9])
    kept = np.array(reference)[live > 0]
    assert kept.sum() != np.sum(reference)  # the order of the sum matters here
    _, p_value, _ = ReferenceHistograms([reference]).compare(live)
    assert p_value[0] == p_value_as_first_written(np.array(reference), live)


def test_live_counts_of_another_layout_are_refused_in_one_line() -> None:
    with pytest.raises(UsageError, match="3 live counts for 5 reference bins; lay the"):
        ReferenceHistograms([[1.0, 2.0], [3.0, 4.0, 5.0]]).compare(np.zeros(3))
    with pytest.raises(UsageError, match="each of at least one bin"):
        ReferenceHistograms([[1.0, 2.0], []])


def _feed(monitor: DriftMonitor, adult: AdultSetup, rows: int) -> None:
    inputs = adult.encoder.encode(adult.live.iloc[:rows])
    for start in range(0, rows, 300):
        batch = inputs[start : start + 300]
        monitor.on_batch("adult-income", "1.0.0", batch, adult.outputs(batch))


def test_a_restarted_monitor_resumes_its_counts_and_figures(
    adult: AdultSetup, workspace: Workspace
) -> None:
    monitor = DriftMonitor(workspace)
    monitor.register("adult-income", "1.0.0", adult.profile)
    _feed(monitor, adult, 2400)
    before = {f.feature: f for f in monitor.check()}
    again = DriftMonitor(workspace)
    again.register("adult-income", "1.0.0", adult.profile)
    assert {f.feature: f for f in again.check()} == before
    assert next(iter(before.values())).rows == 2400
    # A state file of other histograms is not resumed.
    path = workspace.drift_dir / "adult-income@1.0.0.json"
    state = json.loads(path.read_text())
    state["counts"]["age"] = state["counts"]["age"][:-1]
    path.write_text(json.dumps(state))
    other = DriftMonitor(workspace)
    other.register("adult-income", "1.0.0", adult.profile)
    assert {f.rows for f in other.check()} == {0}


def test_drift_gauges_render_from_a_registry_like_the_servers(adult: AdultSetup) -> None:
    """``/metrics`` renders its own registry: registering the monitor there exposes them."""
    from prometheus_client import CollectorRegistry, generate_latest

    monitor = DriftMonitor()
    monitor.register("adult-income", "1.0.0", adult.profile)
    registry = CollectorRegistry(auto_describe=True)  # as ServeMetrics builds its own
    registry.register(monitor)
    _feed(monitor, adult, 1200)
    text = generate_latest(registry).decode()
    assert 'insitu_drift_rows{model="adult-income",version="1.0.0"} 1200.0' in text
    assert 'insitu_drift_psi{feature="age",model="adult-income",version="1.0.0"}' in text


@settings(max_examples=400, deadline=None)
@given(
    st.integers(1, 300),
    st.one_of(
        st.floats(0, 50),
        st.floats(0, 5_000),
        st.floats(0, 1e7),
        st.just(0.0),
    ),
)
def test_the_chi_square_tail_is_scipys(dof: int, statistic: float) -> None:
    from scipy.special import chdtrc

    expected = float(chdtrc(dof, statistic))
    got = chi_square_tail(dof, statistic)
    # Relative where SciPy's own figure is a normal number; far tails underflow alike.
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_the_chi_square_tail_at_its_edges() -> None:
    assert chi_square_tail(3, 0.0) == 1.0
    assert chi_square_tail(3, float("inf")) == 0.0
    assert math.isnan(chi_square_tail(3, float("nan")))
    assert chi_square_tail(1, 3.841458820694124) == pytest.approx(0.05, rel=1e-12)
    assert chi_square_tail(2, 5.991464547107979) == pytest.approx(0.05, rel=1e-12)


def test_drift_is_checked_without_scipy(tmp_path: Path) -> None:
    # A device install has no SciPy: the monitor's check must not import it.
    code = (
        "import sys, numpy as np\n"
        "sys.modules['scipy'] = None\n"
        "from insitu.drift import two_sample_p_value\n"
        "from insitu.drift._stats import ReferenceHistograms\n"
        "p = two_sample_p_value(np.array([50.0, 30, 20]), np.array([10.0, 30, 60]))\n"
        "_, q, _ = ReferenceHistograms([[50.0, 30, 20]]).compare(np.array([10.0, 30, 60]))\n"
        "assert 0 < p < 1e-6 and q[0] == p, (p, q)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
