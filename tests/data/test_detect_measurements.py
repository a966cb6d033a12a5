"""Continuous measurements are not identifiers; card numbers hidden among them are.

Breast-cancer-like measurement columns (floats with many digits) once read as card
numbers: the digits of a float pass the Luhn check one time in ten. The attacker's side:
real-format card numbers planted in a column of floats (which a CSV reader parses as one
float column) must still be found.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from insitu.data import scan_column, scan_frame

#: Luhn-valid test card numbers of the major networks (Visa, Mastercard, Amex).
CARDS = ["4539148803436467", "5555555555554444", "378282246310005", "4111111111111111"]


def _measurements(rows: int = 600, columns: int = 17) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    scales = rng.uniform(0.001, 3000.0, size=columns)
    data = rng.gamma(2.0, 1.0, size=(rows, columns)) * scales
    return pd.DataFrame(data, columns=[f"measure_{i}" for i in range(columns)])


def test_continuous_measurement_columns_are_not_flagged_as_card_numbers():
    frame = _measurements()
    # As a CSV round trip gives them: 17 significant digits, many Luhn-valid by chance.
    text = frame.to_csv(index=False, float_format="%.17g")
    findings = scan_frame(pd.read_csv(io.StringIO(text)))
    assert {c: f.kinds for c, f in findings.items() if f.suspicious} == {}


def test_attack_card_numbers_hidden_among_floats_are_found():
    frame = _measurements(columns=1)
    text = frame.to_csv(index=False, float_format="%.17g").splitlines()
    for offset, card in enumerate(CARDS):  # whole rows replaced by card numbers
        text[1 + 100 * offset + 7] = card
    read = pd.read_csv(io.StringIO("\n".join(text)))
    assert read["measure_0"].dtype == np.float64  # the reader made one float column
    finding = scan_column("measure_0", read["measure_0"])
    assert finding.kinds == {"card number": len(CARDS)}


def test_large_whole_measurements_that_fail_the_luhn_check_are_not_flagged():
    values = pd.Series([1234567890123.0, 2.5, 7.25, 4539148803436468.0])  # last: Luhn fails
    assert not scan_column("amount", values).suspicious
