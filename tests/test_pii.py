"""The personal-data detectors the ledger (and later the data layer) rely on."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from insitu._pii import find_personal_data, luhn_valid


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("contact: ann.smith+ward7@hospital.example.ch", "email address"),
        ("4111-1111-1111-1111", "card number"),
        ("paid with 5500 0000 0000 0004 yesterday", "card number"),
        ("GB82 WEST 1234 5698 7654 32", "IBAN"),
        ("DE89370400440532013000", "IBAN"),
        ("call +1 (415) 555-0132", "phone number"),
    ],
)
def test_detects(text, kind):
    assert find_personal_data(text) == kind


@pytest.mark.parametrize(
    "text",
    [
        "model.published",
        "adult-income 1.2.0",
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "4111 1111 1111 1112",  # fails Luhn
        "GB00 WEST 1234 5698 7654 32",  # fails mod 97
        "2026-11-22T08:03:33.460712Z",
        "epsilon=3.0 delta=1e-05",
    ],
)
def test_does_not_flag(text):
    assert find_personal_data(text) is None


@given(st.text(alphabet="0123456789", min_size=2, max_size=19))
def test_luhn_check_digit_property(digits):
    # Appending the right check digit always makes a valid number; any other never does.
    valid = [d for d in "0123456789" if luhn_valid(digits + d)]
    assert len(valid) == 1


@given(st.binary(min_size=32, max_size=32))
def test_hex_digests_are_never_flagged(digest):
    assert find_personal_data(digest.hex()) is None


@given(st.binary(min_size=16, max_size=16))
def test_pseudonym_tokens_are_never_flagged(digest):
    assert find_personal_data("p_" + digest.hex()) is None


def test_a_card_number_made_only_of_digits_at_the_end_of_a_token_is_not_flagged():
    assert find_personal_data("p_4111111111111111") is None
