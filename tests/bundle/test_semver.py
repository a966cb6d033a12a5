from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from insitu.bundle import SemVer

ORDERED = [
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.beta",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-rc.1",
    "1.0.0",
    "1.0.1",
    "1.1.0",
    "1.10.0",
    "2.0.0",
]


def test_semver_precedence_follows_the_spec():
    parsed = [SemVer.parse(v) for v in ORDERED]
    assert parsed == sorted(parsed)
    assert [str(v) for v in parsed] == ORDERED


@given(st.tuples(*[st.integers(0, 10**6)] * 3), st.tuples(*[st.integers(0, 10**6)] * 3))
def test_release_order_is_numeric(a, b):
    va, vb = SemVer.parse(".".join(map(str, a))), SemVer.parse(".".join(map(str, b)))
    assert (va < vb) == (a < b)
    assert SemVer.parse(str(va)) == va
