"""Property: any single changed byte of an encrypted, signed bundle file is refused."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from insitu.bundle import Bundle, BundleVerifier, create_bundle
from insitu.errors import BundleError
from tests.bundle._models import mlp
from tests.bundle.conftest import card_for

SIGNER = Ed25519PrivateKey.generate()
DEVICE = X25519PrivateKey.generate()
MODEL = mlp([4, 8, 2])[0]
BLOB = create_bundle(
    MODEL, card_for(MODEL), SIGNER, recipients=[DEVICE.public_key()], segment_size=128
)
VERIFIER = BundleVerifier([SIGNER.public_key()])


def test_the_untouched_bundle_opens():
    assert bytes(VERIFIER.open(Bundle.parse(BLOB), DEVICE).model) == MODEL


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(BLOB) - 1), st.integers(1, 255))
def test_any_single_byte_change_is_refused(at, xor):
    changed = bytearray(BLOB)
    changed[at] ^= xor
    with pytest.raises(BundleError):
        VERIFIER.open(Bundle.parse(bytes(changed)), DEVICE)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, len(BLOB) - 1), st.integers(1, 255))
def test_any_single_byte_change_is_refused_even_without_the_ciphertext_digest(at, xor):
    changed = bytearray(BLOB)
    changed[at] ^= xor
    with pytest.raises(BundleError):
        VERIFIER.open(Bundle.parse(bytes(changed)), DEVICE, check_payload=False)


@settings(deadline=None)  # timing is not the property; CI machines are shared
@given(st.integers(0, len(BLOB) - 1))
def test_truncation_is_refused(cut):
    with pytest.raises(BundleError):
        VERIFIER.open(Bundle.parse(BLOB[:cut]), DEVICE)


HEADER_END = 12 + int.from_bytes(BLOB[8:12], "big")


@pytest.mark.parametrize("xor", [0x01, 0x20, 0x80])
def test_every_header_byte_changed_is_refused(xor):
    # Exhaustive over the header: every position, three kinds of change (a low bit, the
    # ASCII case bit, a non-ASCII byte). Each must raise a BundleError, nothing else.
    for at in range(HEADER_END):
        changed = bytearray(BLOB)
        changed[at] ^= xor
        with pytest.raises(BundleError):
            VERIFIER.open(Bundle.parse(bytes(changed)), DEVICE)


@settings(deadline=None)  # timing is not the property; CI machines are shared
@given(st.binary(max_size=300))
def test_random_bytes_are_malformed_bundles(data):
    from insitu.errors import MalformedBundleError

    with pytest.raises(MalformedBundleError):
        Bundle.parse(data)


@settings(deadline=None)  # timing is not the property; CI machines are shared
@given(st.binary(max_size=200))
def test_random_headers_are_malformed_bundles(header):
    from insitu.errors import MalformedBundleError

    with pytest.raises(MalformedBundleError):
        Bundle.parse(b"INSITUB\x01" + len(header).to_bytes(4, "big") + header)
