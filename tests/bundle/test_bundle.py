"""The bundle format: create, parse, verify, open; each failure named after itself."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from insitu.bundle import Bundle, BundleVerifier, create_bundle
from insitu.bundle._format import assemble
from insitu.errors import (
    MalformedBundleError,
    TamperedBundleError,
    UnsignedBundleError,
    UntrustedPublisherError,
    UsageError,
    WrongDeviceKeyError,
)
from insitu.runtime import create_session
from tests.bundle.conftest import card_for


def _split(blob: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(blob[8:12], "big")
    return json.loads(blob[12 : 12 + length]), blob[12 + length :]


def test_roundtrip_encrypted_bundle_runs_in_onnx_runtime(model, signer, device):
    card = card_for(
        model,
        metrics={"accuracy": 0.93},
        privacy={"epsilon": 2.5, "delta": 1e-5, "accountant": "rdp"},
        provenance={"node": "n1", "training_rounds": [{"seq": 4, "type": "training.round"}]},
    )
    blob = create_bundle(model, card, signer, recipients=[device.public_key()], segment_size=1024)
    bundle = Bundle.parse(blob)
    assert bundle.encrypted
    assert len(bundle.recipients) == 1
    assert model not in blob  # encrypted at rest
    opened = BundleVerifier([signer.public_key()]).open(bundle, device)
    assert bytes(opened.model) == model
    assert opened.card == card
    assert opened.card.inputs == [{"name": "x", "type": "float", "shape": ["batch", 8]}]
    manifest = bundle.signed["files"]
    assert manifest["model.onnx"]["sha256"] == hashlib.sha256(model).hexdigest()
    assert manifest["card.json"]["sha256"] == hashlib.sha256(card.to_bytes()).hexdigest()
    out = create_session(bytes(opened.model)).run(None, {"x": np.ones((1, 8), np.float32)})
    assert out[0].shape == (1, 3)


def test_unencrypted_bundle_warns_loudly(model, signer, caplog):
    with caplog.at_level(logging.WARNING, logger="insitu"):
        blob = create_bundle(model, card_for(model), signer)
    assert "NOT encrypted" in caplog.text
    opened = BundleVerifier([signer.public_key()]).open(Bundle.parse(blob), None)
    assert bytes(opened.model) == model


def test_untrusted_publisher(model, signer, device):
    blob = create_bundle(model, card_for(model), signer, recipients=[device.public_key()])
    other = Ed25519PrivateKey.generate()
    with pytest.raises(UntrustedPublisherError, match="not a trusted publisher key"):
        BundleVerifier([other.public_key()]).verify(Bundle.parse(blob))


def test_header_changed_after_signing(model, signer, device):
    blob = create_bundle(model, card_for(model), signer, recipients=[device.public_key()])
    doc, payload = _split(blob)
    doc["signed"]["card"]["metrics"] = {"accuracy": 0.99}
    forged = assemble(doc["signed"], doc["signatures"]) + payload
    with pytest.raises(UnsignedBundleError, match="does not verify"):
        BundleVerifier([signer.public_key()]).verify(Bundle.parse(forged))


def test_no_signature(model, signer):
    blob = create_bundle(model, card_for(model), signer)
    doc, payload = _split(blob)
    stripped = assemble(doc["signed"], []) + payload
    with pytest.raises(UnsignedBundleError, match="carries no signature"):
        BundleVerifier([signer.public_key()]).verify(Bundle.parse(stripped))


def test_payload_byte_flip_is_found_with_and_without_the_device_key(model, signer, device):
    blob = bytearray(
        create_bundle(model, card_for(model), signer, recipients=[device.public_key()])
    )
    blob[-10] ^= 0x40
    bundle = Bundle.parse(bytes(blob))
    verifier = BundleVerifier([signer.public_key()])
    with pytest.raises(TamperedBundleError, match="digest differs"):
        verifier.verify(bundle)
    with pytest.raises(TamperedBundleError, match="does not authenticate"):
        verifier.open(bundle, device, check_payload=False)  # the AEAD finds it too


def test_a_wrapped_key_for_another_bundle_does_not_open(model, signer, device):
    a = create_bundle(model, card_for(model), signer, recipients=[device.public_key()])
    b = create_bundle(model, card_for(model, "1.0.1"), signer, recipients=[device.public_key()])
    doc_a, payload_a = _split(a)
    doc_b, _ = _split(b)
    # Move b's wrapped key into a (as a publisher would have to re-sign a: they do here).
    doc_a["signed"]["payload"]["encryption"]["recipients"] = doc_b["signed"]["payload"][
        "encryption"
    ]["recipients"]
    from insitu._canonical import canonical_bytes

    message = b"insitu-bundle/1\n" + canonical_bytes(doc_a["signed"])
    sig = [{"keyid": doc_a["signatures"][0]["keyid"], "sig": signer.sign(message).hex()}]
    moved = Bundle.parse(assemble(doc_a["signed"], sig) + payload_a)
    with pytest.raises(TamperedBundleError, match="does not open"):
        BundleVerifier([signer.public_key()]).open(moved, device)


def test_wrong_device_key(model, signer, device):
    blob = create_bundle(model, card_for(model), signer, recipients=[device.public_key()])
    verifier = BundleVerifier([signer.public_key()])
    with pytest.raises(WrongDeviceKeyError, match="not encrypted for this device"):
        verifier.open(Bundle.parse(blob), X25519PrivateKey.generate())
    with pytest.raises(WrongDeviceKeyError, match="no device key"):
        verifier.open(Bundle.parse(blob), None)


@pytest.mark.parametrize(
    "data", [b"", b"PK\x03\x04zipfile", b"INSITUB\x01\xff\xff\xff\xff", b"INSITUB\x01\0\0\0\x02{}"]
)
def test_not_a_bundle(data):
    with pytest.raises(MalformedBundleError):
        Bundle.parse(data)


def test_not_an_onnx_model(signer):
    from insitu.bundle import schema_of

    with pytest.raises(MalformedBundleError, match="not a valid ONNX file"):
        schema_of(b"this is not a model")


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "01.0.0", "1.0.0+build"])
def test_bad_versions_are_usage_errors(model, version):
    with pytest.raises(UsageError, match="semantic version"):
        card_for(model, version)


def test_bad_privacy_figures(model):
    with pytest.raises(UsageError, match="delta"):
        card_for(model, privacy={"epsilon": 1.0, "delta": 1.5, "accountant": "rdp"})


def test_load_session_from_a_file_and_from_bytes(model, signer, device, tmp_path):
    from insitu.bundle import load_session

    blob = create_bundle(model, card_for(model), signer, recipients=[device.public_key()])
    path = tmp_path / "m.insb"
    path.write_bytes(blob)
    verifier = BundleVerifier([signer.public_key()])
    for source in (path, blob):
        bundle, session = load_session(source, verifier, device)
        assert bundle.version == "1.0.0"
        assert len(bundle.payload) == 0  # the header only: nothing decrypted is kept
        assert session.run(None, {"x": np.ones((1, 8), np.float32)})[0].shape == (1, 3)


def test_load_session_refuses_before_creating_a_session(
    model, signer, device, tmp_path, monkeypatch
):
    from insitu.bundle import _load, load_session

    blob = bytearray(
        create_bundle(model, card_for(model), signer, recipients=[device.public_key()])
    )
    blob[-1] ^= 1
    created = []
    monkeypatch.setattr(_load, "create_session", lambda *a, **k: created.append(a))
    with pytest.raises(TamperedBundleError):
        load_session(bytes(blob), BundleVerifier([signer.public_key()]), device)
    (tmp_path / "empty.insb").write_bytes(b"")
    with pytest.raises(MalformedBundleError):
        load_session(tmp_path / "empty.insb", BundleVerifier([signer.public_key()]), device)
    assert created == []
