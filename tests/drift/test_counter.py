"""The vectorised bin counter gives exactly the counts of the per-row definition.

``BinCounter`` counts a batch without a bin per value (sorted columns against
precomputed edges, indicator columns summed by a matrix product). These tests hold it to
a slow reference written here as the definition reads: a loop over rows, a bin per value
computed in the input's own dtype, an indicator set when above 0.5, the score
``sigmoid(clip(logit, -50, 50))`` in float64. Values are drawn around every bin edge, in
float16, float32, float64 and integers, so that rounding at an edge cannot differ unseen.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from insitu.drift import OUTPUT, DriftMonitor, ProfileLayout, _profile, bin_counts
from insitu.errors import SchemaError

from .conftest import AdultSetup

BINS = 10

#: Numeric columns 0 and 3 (not contiguous: the general path), a 3-category feature on
#: 1-2 (its unknown is "neither"), a 2-category one on 4-5, column 6 ignored (an
#: interval indicator of a declared bin).
SMALL = ProfileLayout(
    [
        {"name": "a", "kind": "numeric", "start": 0, "stop": 1, "range": [0, 1]},
        {"name": "b", "kind": "numeric", "start": 3, "stop": 4, "range": [0, 1]},
        {"name": "c", "kind": "categorical", "start": 1, "stop": 3, "categories": ["x", "y", "?"]},
        {"name": "d", "kind": "categorical", "start": 4, "stop": 6, "categories": ["u", "v", "?"]},
    ],
    7,
    BINS,
    1,
)


def _bin(value: np.generic, dtype: np.dtype, bins: int) -> int:
    """The bin of one value, as the definition computes it (in ``dtype``)."""
    scaled = np.clip(np.array([value], dtype=dtype), 0.0, 1.0) * bins
    return min(int(np.floor(scaled)[0]), bins - 1)


def slow_histograms(
    layout: ProfileLayout, inputs: np.ndarray, outputs: np.ndarray | None
) -> dict[str, np.ndarray]:
    """The reference: one row at a time, one value at a time."""
    bins, rows = layout.bins, len(inputs)
    counts: dict[str, np.ndarray] = {}
    for feature in layout.features:
        if feature["kind"] == "numeric":
            hist = np.zeros(bins)
            for row in inputs:
                hist[_bin(row[feature["start"]], inputs.dtype, bins)] += 1
        else:
            known = np.zeros(feature["stop"] - feature["start"])
            for row in inputs:
                for index, value in enumerate(row[feature["start"] : feature["stop"]]):
                    known[index] += bool(value > 0.5)
            hist = np.append(known, max(0.0, rows - known.sum()))
        counts[feature["name"]] = hist
    if outputs is not None:
        outputs = np.asarray(outputs, dtype=np.float64)
        outputs = outputs[:, None] if outputs.ndim == 1 else outputs
        hist = np.zeros(layout.output_classes if layout.output_classes > 1 else bins)
        for out in outputs:
            if layout.output_classes > 1:
                hist[int(np.argmax(out))] += 1
            else:
                score = 1.0 / (1.0 + math.exp(-min(max(float(out[0]), -50.0), 50.0)))
                hist[_bin(np.float64(score), np.dtype(np.float64), bins)] += 1
        counts[OUTPUT] = hist
    return counts


def _around_edges(dtype: np.dtype) -> list[float]:
    """Every bin edge k/10 and 0.5 in ``dtype``, with their neighbours, and the extremes."""
    kind = dtype.type
    values = []
    for centre in [kind(k) / kind(BINS) for k in range(BINS + 1)] + [kind(0.5)]:
        below, above = np.nextafter(centre, kind(-1)), np.nextafter(centre, kind(2))
        values += [centre, below, above, np.nextafter(below, kind(-1))]
    values += [-0.0, -1.0, 2.0, 1e30 if dtype.itemsize > 2 else 6e4, -np.inf, np.inf]
    return [float(kind(v)) for v in values]


def _values(dtype: np.dtype) -> st.SearchStrategy[float]:
    if dtype.kind == "i":
        return st.integers(-3, 3)
    width: Literal[16, 32, 64] = 16 if dtype.itemsize == 2 else 32 if dtype.itemsize == 4 else 64
    return st.one_of(
        st.sampled_from(_around_edges(dtype)),
        st.floats(-0.25, 1.25, width=width),
        st.floats(allow_nan=False, width=width),
    )


@st.composite
def batches(draw: st.DrawFn, layout: ProfileLayout, dtype: np.dtype) -> np.ndarray:
    rows = draw(st.integers(0, 40))
    return draw(hnp.arrays(dtype, (rows, layout.n_inputs), elements=_values(dtype)))


DTYPES = [np.dtype(d) for d in (np.float16, np.float32, np.float64, np.int64)]
logits = st.one_of(
    st.floats(-60, 60),
    st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 1e-17, -1e-17, 2.197224577, -2.197224577]),
)


def _assert_same(fast: dict[str, np.ndarray], slow: dict[str, np.ndarray]) -> None:
    assert list(fast) == list(slow)
    for name, expected in slow.items():
        np.testing.assert_array_equal(fast[name], expected, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_counts_are_exactly_those_of_the_per_row_definition(
    dtype: np.dtype, data: st.DataObject
) -> None:
    inputs = data.draw(batches(SMALL, dtype))
    outputs = np.array(
        data.draw(st.lists(logits, min_size=len(inputs), max_size=len(inputs))), dtype=np.float32
    )
    slow = slow_histograms(SMALL, inputs, outputs)
    _assert_same(bin_counts(SMALL, inputs, outputs[:, None]), slow)
    _assert_same(bin_counts(SMALL, inputs, None), slow_histograms(SMALL, inputs, None))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_batches_added_one_by_one_count_as_their_concatenation(data: st.DataObject) -> None:
    parts = data.draw(st.lists(batches(SMALL, np.dtype(np.float32)), min_size=1, max_size=5))
    counter = _profile.BinCounter(SMALL, with_output=True)
    for part in parts:
        counter.add(part, np.linspace(-3, 3, len(part), dtype=np.float32))
    inputs = np.concatenate(parts)
    scores = np.concatenate([np.linspace(-3, 3, len(p), dtype=np.float32) for p in parts])
    _assert_same(counter.histograms(), slow_histograms(SMALL, inputs, scores))
    assert counter.rows == len(inputs)


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float64, (17, 3), elements=st.floats(-5, 5)))
def test_classes_of_a_multiclass_output_are_counted_by_argmax(outputs: np.ndarray) -> None:
    layout = ProfileLayout(SMALL.features, SMALL.n_inputs, BINS, 3)
    inputs = np.random.default_rng(0).random((17, SMALL.n_inputs))
    _assert_same(bin_counts(layout, inputs, outputs), slow_histograms(layout, inputs, outputs))


def test_a_batch_larger_than_a_chunk_counts_the_same(
    adult: AdultSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = adult.encoder.encode(adult.live.iloc[:700]).astype(np.float32)
    outputs = adult.outputs(inputs)
    whole = bin_counts(adult.layout, inputs, outputs)
    monkeypatch.setattr(_profile, "_CHUNK", 64)
    _assert_same(bin_counts(adult.layout, inputs, outputs), whole)
    _assert_same(whole, slow_histograms(adult.layout, inputs, outputs))


def test_a_binary_model_whose_output_is_not_given_counts_only_inputs() -> None:
    counter = _profile.BinCounter(SMALL, with_output=True)
    counter.add(np.zeros((3, SMALL.n_inputs), dtype=np.float32), None)
    counter.add(np.zeros((0, SMALL.n_inputs), dtype=np.float32), np.zeros((0, 1)))
    histograms = counter.histograms()
    assert histograms[OUTPUT].tolist() == [0.0] * BINS
    assert histograms["a"].tolist() == [3.0] + [0.0] * (BINS - 1)


@pytest.mark.parametrize("where", ["input", "output"])
def test_nan_has_no_bin_and_is_refused_in_one_line(where: str) -> None:
    inputs = np.zeros((4, SMALL.n_inputs), dtype=np.float32)
    outputs = np.zeros((4, 1), dtype=np.float32)
    (inputs if where == "input" else outputs)[2, 0] = np.nan
    counter = _profile.BinCounter(SMALL, with_output=True)
    with pytest.raises(SchemaError, match="NaN, which has no bin; replace missing values"):
        counter.add(inputs, outputs)
    assert counter.rows == 0
    assert not counter.counts.any()


def test_outputs_with_more_classes_than_the_profile_are_refused() -> None:
    layout = ProfileLayout(SMALL.features, SMALL.n_inputs, BINS, 3)
    outputs = np.eye(4)[[3, 0]]
    with pytest.raises(SchemaError, match="outputs have 4 columns, the profile 3 classes"):
        bin_counts(layout, np.zeros((2, SMALL.n_inputs)), outputs)


def test_monitor_figures_are_the_statistics_of_the_reference_counts(adult: AdultSetup) -> None:
    from insitu.drift import population_stability_index, two_sample_p_value

    inputs = adult.encoder.encode(adult.live.iloc[:3000])
    monitor = DriftMonitor()
    monitor.register("adult-income", "1.0.0", adult.profile)
    for start in range(0, len(inputs), 256):
        batch = inputs[start : start + 256]
        monitor.on_batch("adult-income", "1.0.0", batch, adult.outputs(batch))
    figures = {f.feature: f for f in monitor.check()}
    slow = slow_histograms(adult.layout, inputs, adult.outputs(inputs))
    assert set(figures) == set(slow)
    for name, live in slow.items():
        reference = np.asarray(adult.profile.counts[name])
        assert figures[name].psi == population_stability_index(reference, live)
        assert figures[name].p_value == two_sample_p_value(reference, live)
        assert figures[name].rows == len(inputs)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.longdouble], ids=str)
def test_edges_separate_the_bins_of_the_definition(dtype: type[np.floating]) -> None:
    kind = np.dtype(dtype)
    for bins in range(2, 101):
        edges = _profile._edges_below(kind, bins)
        assert edges[-1] == np.inf
        for k, edge in enumerate(edges[:-1], start=1):
            assert _bin(edge, kind, bins) == k - 1
            assert _bin(np.nextafter(edge, dtype(2)), kind, bins) == k
