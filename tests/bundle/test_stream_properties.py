"""Property tests of the segmented AEAD: every change to an encrypted payload is refused."""

from __future__ import annotations

import os

import pytest
from cryptography.exceptions import InvalidTag
from hypothesis import given, settings
from hypothesis import strategies as st

from insitu.bundle import _stream

KEY = bytes(range(32))
PREFIX = b"\x07" * 7
AAD = b'{"bundle_id":"b","name":"m","version":"1.0.0"}'

payloads = st.binary(min_size=0, max_size=700)
segment_sizes = st.integers(min_value=1, max_value=96)


def seal(data: bytes, segment: int) -> bytearray:
    return _stream.encrypt(KEY, PREFIX, data, AAD, segment_size=segment)


def opens(sealed: bytes | bytearray, segment: int, aad: bytes = AAD) -> bytes:
    return bytes(_stream.decrypt(KEY, PREFIX, sealed, aad, segment_size=segment))


@settings(deadline=None)  # timing is not the property; CI machines are shared
@given(payloads, segment_sizes)
def test_roundtrip_and_length_math(data, segment):
    sealed = seal(data, segment)
    assert len(sealed) == _stream.ciphertext_length(len(data), segment)
    assert _stream.plaintext_length(len(sealed), segment) == len(data)
    assert opens(sealed, segment) == data


@settings(deadline=None)  # timing is not the property; CI machines are shared
@given(payloads, segment_sizes, st.data())
def test_any_single_byte_change_is_refused(data, segment, draw):
    sealed = seal(data, segment)
    at = draw.draw(st.integers(0, len(sealed) - 1))
    bit = draw.draw(st.integers(0, 7))
    sealed[at] ^= 1 << bit
    with pytest.raises(InvalidTag):
        opens(sealed, segment)


@settings(deadline=None)  # timing is not the property; CI machines are shared
@given(st.binary(min_size=2, max_size=400), segment_sizes, st.data())
def test_reordered_segments_are_refused(data, segment, draw):
    sealed = seal(data, segment)
    size = segment + _stream.TAG_SIZE
    chunks = [bytes(sealed[i : i + size]) for i in range(0, len(sealed), size)]
    if len(chunks) < 2:
        return
    i = draw.draw(st.integers(0, len(chunks) - 2))
    j = draw.draw(st.integers(i + 1, len(chunks) - 1))
    chunks[i], chunks[j] = chunks[j], chunks[i]
    if chunks[i] == chunks[j]:
        return
    with pytest.raises(InvalidTag):
        opens(b"".join(chunks), segment)


@settings(deadline=None)  # timing is not the property; CI machines are shared
@given(st.binary(min_size=1, max_size=400), segment_sizes, st.data())
def test_truncation_anywhere_is_refused(data, segment, draw):
    sealed = seal(data, segment)
    cut = draw.draw(st.integers(0, len(sealed) - 1))
    with pytest.raises(InvalidTag):
        opens(sealed[:cut], segment)


@settings(deadline=None)  # timing is not the property; CI machines are shared
@given(payloads, segment_sizes, st.binary(min_size=1, max_size=64))
def test_appended_bytes_are_refused(data, segment, extra):
    sealed = seal(data, segment)
    with pytest.raises(InvalidTag):
        opens(bytes(sealed) + extra, segment)


@settings(max_examples=25, deadline=None)
@given(payloads, segment_sizes)
def test_another_bundles_associated_data_is_refused(data, segment):
    with pytest.raises(InvalidTag):
        opens(seal(data, segment), segment, aad=AAD.replace(b"1.0.0", b"1.0.1"))


def test_truncation_at_a_segment_boundary_is_refused():
    data = os.urandom(4 * 64)
    sealed = seal(data, 64)
    whole_segments = 3 * (64 + _stream.TAG_SIZE)
    with pytest.raises(InvalidTag):
        opens(sealed[:whole_segments], 64)  # the last flag of segment 2 was 0


def test_encryption_is_deterministic_for_the_delta_path():
    data = os.urandom(1000)
    assert seal(data, 100) == seal(data, 100)


@settings(deadline=None)  # timing is not the property; CI machines are shared
@given(st.integers(0, 5000), segment_sizes)
def test_only_sealed_lengths_are_valid(cipher_length, segment):
    # Exactly the lengths encrypt() produces are accepted, so nothing can be appended.
    valid = {_stream.ciphertext_length(n, segment) for n in range(cipher_length + 1)}
    try:
        plain = _stream.plaintext_length(cipher_length, segment)
    except ValueError:
        assert cipher_length not in valid
    else:
        assert _stream.ciphertext_length(plain, segment) == cipher_length


@settings(deadline=None)  # timing is not the property; CI machines are shared
@given(payloads, segment_sizes, st.data())
def test_the_sink_path_yields_the_same_plaintext_and_digest_and_refuses_changes(
    data, segment, draw
):
    import hashlib

    sealed = seal(data, segment)
    received: list[bytes] = []
    hasher = hashlib.sha256()
    _stream.decrypt(
        KEY, PREFIX, sealed, AAD, segment_size=segment,
        sink=lambda view: received.append(bytes(view)), hasher=hasher,
    )  # fmt: skip
    assert b"".join(received) == data
    assert hasher.digest() == hashlib.sha256(data).digest()
    at = draw.draw(st.integers(0, len(sealed) - 1))
    sealed[at] ^= 0x10
    with pytest.raises(InvalidTag):
        _stream.decrypt(KEY, PREFIX, sealed, AAD, segment_size=segment, sink=lambda view: None)
