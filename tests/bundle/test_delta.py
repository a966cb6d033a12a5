"""Per-tensor deltas (and the generic fallback) rebuild the new model byte for byte."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from insitu.bundle import (
    Bundle,
    BundleVerifier,
    apply_bundle_delta,
    create_bundle,
    make_bundle_delta,
)
from insitu.bundle import _tensor_delta as td
from insitu.errors import DeltaError, DeltaMismatchError, WrongDeviceKeyError
from tests.bundle._models import build, fine_tune, mlp
from tests.bundle.conftest import card_for

WIDTHS = [32, 64, 64, 8]


@pytest.fixture(scope="module")
def base():
    return mlp(WIDTHS)


def test_last_layer_fine_tune_sends_only_the_last_layer(base):
    old, weights = base
    new = fine_tune(WIDTHS, weights, last_layer_only=True)
    delta = td.diff(old, new)
    assert td.describe(delta)["tensors"] == {"keep": 4, "xor": 2}
    assert td.apply(old, delta) == new
    assert len(delta) < 0.2 * len(new)


def test_full_fine_tune_xor_planes_beat_the_raw_size(base):
    old, weights = base
    new = fine_tune(WIDTHS, weights, last_layer_only=False)
    delta = td.diff(old, new)
    assert td.describe(delta)["tensors"] == {"xor": 6}
    assert td.apply(old, delta) == new
    assert len(delta) < 0.8 * len(new)


def test_a_changed_shape_is_sent_raw(base):
    old, _ = base
    wider = mlp([32, 64, 64, 9], seed=3)[0]
    delta = td.diff(old, wider)
    assert td.describe(delta)["tensors"].get("raw", 0) >= 2
    assert td.apply(old, delta) == wider


def test_non_onnx_payloads_use_the_generic_fallback():
    old = os.urandom(50_000)
    new = old[:20_000] + b"inserted" + old[20_000:]
    delta = td.diff(old, new)
    assert td.describe(delta)["kind"] == "zstd-patch"
    assert len(delta) < 2_000
    assert td.apply(old, delta) == new


def test_same_length_payloads_use_xor():
    old = os.urandom(200_000)
    new = bytearray(old)
    new[1000:1010] = b"0123456789"
    delta = td.diff(old, bytes(new))
    assert td.describe(delta)["kind"] == "xor-zstd"
    assert len(delta) < 2_000
    assert td.apply(old, delta) == bytes(new)


def test_onnx_that_does_not_reserialize_falls_back(base):
    old, weights = base
    new = fine_tune(WIDTHS, weights, last_layer_only=True)
    # ir_version written a second time (another protobuf writer may): it parses, but our
    # serialization writes the field once, so it would not reproduce these bytes.
    odd = new + b"\x08\x0a"
    delta = td.diff(old, odd)
    assert td.describe(delta)["kind"] in {"zstd-patch", "xor-zstd"}
    assert td.apply(old, delta) == odd


def test_a_delta_for_another_base_is_refused(base):
    old, weights = base
    new = fine_tune(WIDTHS, weights, last_layer_only=True)
    delta = td.diff(old, new)
    with pytest.raises(DeltaError, match="another version"):
        td.apply(new, delta)


def test_a_delta_that_rebuilds_something_else_is_refused(base):
    old, weights = base
    new = fine_tune(WIDTHS, weights, last_layer_only=True)
    delta = bytearray(td.diff(old, new))
    header_len = int.from_bytes(delta[8:12], "big")
    delta[12 + header_len + 40] ^= 0xFF  # inside a compressed tensor
    with pytest.raises((DeltaError, DeltaMismatchError)):
        td.apply(old, bytes(delta))


def test_bundle_delta_rebuilds_the_encrypted_bundle_byte_for_byte(base):
    old_model, weights = base
    new_model = fine_tune(WIDTHS, weights, last_layer_only=True)
    signer, device, publisher = (
        Ed25519PrivateKey.generate(),
        X25519PrivateKey.generate(),
        X25519PrivateKey.generate(),
    )
    recipients = [device.public_key(), publisher.public_key()]
    old = create_bundle(old_model, card_for(old_model), signer, recipients=recipients)
    new = create_bundle(new_model, card_for(new_model, "1.1.0"), signer, recipients=recipients)
    delta = make_bundle_delta(old, new, publisher_key=publisher)
    assert len(delta) < 0.2 * len(new)
    assert old_model not in delta  # sealed
    assert new_model not in delta
    rebuilt = apply_bundle_delta(old, old_model, delta, device)
    assert rebuilt == new
    opened = BundleVerifier([signer.public_key()]).open(Bundle.parse(rebuilt), device)
    assert bytes(opened.model) == new_model
    with pytest.raises(WrongDeviceKeyError):
        apply_bundle_delta(old, old_model, delta, X25519PrivateKey.generate())


def test_bundle_delta_between_plain_bundles(base, caplog):
    old_model, weights = base
    new_model = fine_tune(WIDTHS, weights, last_layer_only=False)
    signer = Ed25519PrivateKey.generate()
    old = create_bundle(old_model, card_for(old_model), signer)
    new = create_bundle(new_model, card_for(new_model, "2.0.0"), signer)
    delta = make_bundle_delta(old, new, publisher_key=None)
    assert apply_bundle_delta(old, old_model, delta, None) == new


def test_build_is_deterministic(base):
    _, weights = base
    assert build(WIDTHS, weights) == base[0]


def test_any_corruption_of_a_delta_is_a_delta_error(base):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    old, weights = base
    new = fine_tune(WIDTHS, weights, last_layer_only=True)
    delta = td.diff(old, new)

    @settings(max_examples=150, deadline=None)
    @given(st.integers(0, len(delta) - 1), st.integers(1, 255))
    def check(at, xor):
        changed = bytearray(delta)
        changed[at] ^= xor
        try:
            result = td.apply(old, bytes(changed))
        except DeltaError:  # DeltaMismatchError included
            return
        assert result == new  # a change that does not matter (e.g. header white space)

    check()
