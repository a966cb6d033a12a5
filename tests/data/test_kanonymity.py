"""k-anonymity against hand-computed figures and a brute-force property."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from insitu.data import DataSchema, Pseudonymizer, prepare
from insitu.data._kanon import measure, suppress_below
from insitu.errors import KAnonymityError


def test_hand_computed_example():
    # Classes over (age band, zip prefix):
    #   (20, 80) x3, (20, 81) x1, (40, 80) x2, (60, 82) x1  -> 4 classes, smallest 1
    frame = pd.DataFrame(
        {
            "age": [20, 20, 20, 20, 40, 40, 60],
            "zip": ["80", "80", "80", "81", "80", "80", "82"],
        }
    )
    figures = measure(frame, ["age", "zip"], k=2)
    assert figures.classes == 4
    assert figures.smallest_class == 1
    assert figures.classes_below_k == 2
    assert figures.rows_below_k == 2
    assert not figures.satisfied
    assert measure(frame, ["age", "zip"], k=1).satisfied
    k3 = measure(frame, ["age", "zip"], k=3)
    assert (k3.classes_below_k, k3.rows_below_k) == (3, 4)
    kept = suppress_below(frame, ["age", "zip"], k=2)
    assert len(kept) == 5
    assert measure(kept, ["age", "zip"], k=2).smallest_class == 2


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(0, 3), st.sampled_from("abc")), min_size=1, max_size=60),
    k=st.integers(1, 6),
)
def test_measure_matches_brute_force(rows, k):
    frame = pd.DataFrame(rows, columns=["q1", "q2"])
    counts = Counter(rows)
    figures = measure(frame, ["q1", "q2"], k)
    assert figures.smallest_class == min(counts.values())
    assert figures.classes == len(counts)
    assert figures.rows_below_k == sum(n for n in counts.values() if n < k)
    suppressed = suppress_below(frame, ["q1", "q2"], k)
    assert len(suppressed) == sum(n for n in counts.values() if n >= k)
    assert measure(suppressed, ["q1", "q2"], k).satisfied


def test_a_release_below_k_is_refused_unless_suppressed_or_forced(schema_file, patients_csv):
    from insitu.data import read_table

    schema = DataSchema.load(schema_file)
    frame = read_table(patients_csv)
    pseudonymizer = Pseudonymizer(b"s" * 32)
    # 4 classes of 60 rows over (age band, sex, zip prefix): 60-anonymous.
    assert prepare(frame, schema, pseudonymizer, source="p", k=60).report.rows_out == 240
    with pytest.raises(KAnonymityError, match=r"60-anonymous .* below the requested k=61"):
        prepare(frame, schema, pseudonymizer, source="patients.csv", k=61)
    suppressed = prepare(frame, schema, pseudonymizer, source="p", k=61, suppress=True)
    assert suppressed.report.rows_suppressed == 240
    assert suppressed.report.rows_out == 0
    forced = prepare(frame, schema, pseudonymizer, source="p", k=61, force=True)
    assert forced.report.forced_below_k
    assert forced.report.rows_out == len(frame)
