"""The choice rule of ``auto``, as properties over any measurements hypothesis can draw."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from insitu.optimize import Candidate, Constraints, select

NAMES = ["fp32", "int8-dynamic", "int8-static", "pruned", "distilled", "distilled+int8-static"]


@st.composite
def measured(draw):
    candidates = []
    for name in NAMES:
        candidates.append(
            Candidate(
                name,
                "test",
                size_bytes=draw(st.integers(1_000, 200_000)),
                latency_p50_ms=draw(st.floats(0.001, 1.0)),
                latency_p99_ms=1.0,
                accuracy=0.8,
                accuracy_drop=0.0 if name == "fp32" else draw(st.floats(-2.0, 5.0)),
                error=None if name == "fp32" or draw(st.booleans()) else "quantizer failed",
            )
        )
    constraints = Constraints(
        max_accuracy_drop=draw(st.floats(0.0, 3.0)),
        max_size_mb=draw(st.none() | st.floats(0.001, 0.25)),
        max_latency_ms=draw(st.none() | st.floats(0.001, 1.0)),
    )
    return candidates, constraints


@settings(max_examples=300, deadline=None)
@given(measured())
def test_auto_never_picks_a_candidate_past_a_constraint(case):
    candidates, constraints = case
    chosen, reason = select(candidates, constraints)
    if chosen is None:
        assert reason.startswith("no candidate meets the constraints")
        assert not [c for c in candidates if c.feasible]
        return
    assert chosen.error is None
    assert chosen.accuracy_drop <= constraints.max_accuracy_drop + 1e-9
    if constraints.max_size_mb is not None:
        assert chosen.size_bytes / 1e6 <= constraints.max_size_mb
    if constraints.max_latency_ms is not None:
        assert chosen.latency_p50_ms <= constraints.max_latency_ms


@settings(max_examples=300, deadline=None)
@given(measured())
def test_auto_never_picks_a_slower_candidate_than_fp32_unless_size_forces_it(case):
    candidates, constraints = case
    chosen, reason = select(candidates, constraints)
    fp32 = candidates[0]
    if chosen is None or chosen.latency_p50_ms <= fp32.latency_p50_ms:
        return
    # Slower than fp32 at batch 1: only when fp32 itself is over the size limit, and said.
    assert constraints.max_size_mb is not None
    assert fp32.size_bytes / 1e6 > constraints.max_size_mb
    assert "over --max-size" in reason


@settings(max_examples=200, deadline=None)
@given(measured())
def test_auto_picks_the_smallest_of_the_admissible(case):
    candidates, constraints = case
    chosen, _ = select(candidates, constraints)
    if chosen is None:
        return
    fp32 = candidates[0]
    admissible = [c for c in candidates if c.feasible and c.latency_p50_ms <= fp32.latency_p50_ms]
    if admissible:
        assert chosen.size_bytes == min(c.size_bytes for c in admissible)


def test_a_more_accurate_but_larger_model_loses_to_a_smaller_one_within_the_bar():
    fp32 = Candidate("fp32", "", size_bytes=100, latency_p50_ms=1.0, accuracy_drop=0.0)
    small = Candidate("int8-static", "", size_bytes=30, latency_p50_ms=0.5, accuracy_drop=0.4)
    tiny = Candidate("distilled", "", size_bytes=10, latency_p50_ms=0.4, accuracy_drop=0.6)
    chosen, _ = select([fp32, small, tiny], Constraints(max_accuracy_drop=0.5))
    assert chosen is small
    assert tiny.failures == ["accuracy drop 0.60 pts > 0.5"]
