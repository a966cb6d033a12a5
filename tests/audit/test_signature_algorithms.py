"""A node's key is Ed25519 or ECDSA P-256; every signature records which, every verifier checks.

The attacker of ``test_attack_algorithm_confusion_is_refused`` can write the ledger file, an
export or a bundle, and relabels signatures: an Ed25519 signature presented as ECDSA, a
P-256 one stripped of its label (so it reads as Ed25519), or the other ``s`` of an ECDSA
signature (a second encoding that verifies mathematically).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from insitu._canonical import canonical_text
from insitu._signer import (
    ED25519,
    P256,
    P256Signer,
    Signer,
    algorithm_of,
    public_key_from_text,
    public_key_text,
    verify_signature,
)
from insitu.audit import Ledger, export_ledger, node_id_for, verify_export
from insitu.bundle import Bundle, BundleVerifier, ModelCard, create_bundle, schema_of
from insitu.bundle._format import assemble
from insitu.errors import BadEntrySignatureError, BadHeadSignatureError, UnsignedBundleError
from tests.audit._tamper import raw
from tests.bundle._models import mlp

_LABEL = b"ecdsa-p256-sha256:"
_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _p256() -> P256Signer:
    return P256Signer(ec.generate_private_key(ec.SECP256R1()))


def _ledger(path: Path, key: Signer, events: int = 3) -> Ledger:
    ledger = Ledger(
        path, log_id=node_id_for(key.public_key()), public_key=key.public_key(), signing_key=key
    )
    for i in range(events):
        ledger.record("test.event", i=i)
    return ledger


def _relabel(sig: bytes) -> bytes:
    """The attacker's relabelling: Ed25519 presented as ECDSA, ECDSA as Ed25519."""
    return sig[len(_LABEL) :] if sig.startswith(_LABEL) else _LABEL + sig


def test_a_p256_ledger_and_its_export_verify(tmp_path: Path) -> None:
    key = _p256()
    with _ledger(tmp_path / "l.db", key, events=5) as ledger:
        head = ledger.sign_head()
        assert ledger.verify().entries == 5
        first = next(iter(ledger.entries()))
        export_ledger(ledger, tmp_path / "export.jsonl")
    assert first.sig.startswith(_LABEL)
    assert len(first.sig) == len(_LABEL) + 64
    assert head.sig.startswith(_LABEL)
    result = verify_export(tmp_path / "export.jsonl", public_key=key.public_key(), first_type=None)
    assert result.node_id == node_id_for(key.public_key())
    assert result.public_key_hex.startswith("ecdsa-p256-sha256:")


def test_ed25519_records_keep_their_bytes_and_node_ids() -> None:
    key = Ed25519PrivateKey.generate()
    raw_key = key.public_key().public_bytes_raw()
    # The node id and the recorded public key of an Ed25519 node are what they always were.
    assert public_key_text(key.public_key()) == raw_key.hex()
    assert node_id_for(key.public_key()) == hashlib.sha256(raw_key).hexdigest()[:32]
    assert algorithm_of(public_key_from_text(raw_key.hex())) == ED25519
    signature = key.sign(b"m")  # bare 64 bytes: read as Ed25519
    verify_signature(key.public_key(), signature, b"m")
    p256 = _p256().public_key()
    assert algorithm_of(public_key_from_text(public_key_text(p256))) == P256
    assert node_id_for(p256) != node_id_for(key.public_key())


@pytest.mark.parametrize("algorithm", [ED25519, P256])
def test_attack_algorithm_confusion_is_refused(tmp_path: Path, algorithm: str) -> None:
    key: Signer = Ed25519PrivateKey.generate() if algorithm == ED25519 else _p256()
    path = tmp_path / "ledger.db"
    with _ledger(path, key) as ledger:
        ledger.sign_head()
        export_ledger(ledger, tmp_path / "export.jsonl")
    # 1. In the ledger file: entry 2's signature relabelled.
    conn = raw(path)
    (sig,) = conn.execute("SELECT sig FROM entries WHERE seq = 2").fetchone()
    conn.execute("UPDATE entries SET sig = ? WHERE seq = 2", (_relabel(sig),))
    conn.close()
    other = ED25519 if algorithm == P256 else P256
    with (
        Ledger(path, log_id=node_id_for(key.public_key()), public_key=key.public_key()) as ledger,
        pytest.raises(
            BadEntrySignatureError,
            match=f"entry 2 is not signed by this node's key \\(the signature is recorded as "
            f"{other}, the key is {algorithm}\\)",
        ),
    ):
        ledger.verify()
    # 2. In an export: the head's signature relabelled (each line stays canonical).
    lines = (tmp_path / "export.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    header["head"]["sig"] = _relabel(bytes.fromhex(header["head"]["sig"])).hex()
    forged = tmp_path / "forged.jsonl"
    forged.write_text("\n".join([canonical_text(header), *lines[1:]]) + "\n")
    with pytest.raises(BadHeadSignatureError, match=f"recorded as {other}, the key is {algorithm}"):
        verify_export(forged, public_key=key.public_key(), first_type=None)
    # 3. In a bundle: the publisher's signature relabelled.
    model, _ = mlp([4, 2])
    inputs, outputs = schema_of(model)
    card = ModelCard(name="m", version="1.0.0", inputs=inputs, outputs=outputs)
    bundle = Bundle.parse(create_bundle(model, card, key))
    BundleVerifier([key.public_key()]).verify(bundle)
    (signature,) = bundle.signatures
    relabelled = {**signature, "sig": _relabel(bytes.fromhex(signature["sig"])).hex()}
    blob = assemble(bundle.signed, [relabelled]) + bytes(bundle.payload)
    with pytest.raises(UnsignedBundleError, match="does not verify"):
        BundleVerifier([key.public_key()]).verify(Bundle.parse(blob))


def test_attack_the_other_ecdsa_s_is_a_second_encoding_and_refused(tmp_path: Path) -> None:
    key = _p256()
    path = tmp_path / "ledger.db"
    with _ledger(path, key):
        pass
    conn = raw(path)
    (sig,) = conn.execute("SELECT sig FROM entries WHERE seq = 1").fetchone()
    body = sig[len(_LABEL) :]
    s = int.from_bytes(body[32:], "big")
    flipped = _LABEL + body[:32] + (_ORDER - s).to_bytes(32, "big")
    conn.execute("UPDATE entries SET sig = ? WHERE seq = 1", (flipped,))
    conn.close()
    with (
        Ledger(path, log_id=node_id_for(key.public_key()), public_key=key.public_key()) as ledger,
        pytest.raises(BadEntrySignatureError, match="high s \\(a second encoding\\)"),
    ):
        ledger.verify()
