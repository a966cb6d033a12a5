"""What signs for a node, and how its signatures and public keys are recorded and checked.

A leaf, so that the ledger, bundles and the workspace name the same types and read the
same encodings. A node's signing key is Ed25519 or ECDSA P-256 over SHA-256 (a TPM and
many HSMs have no Ed25519). A signer is anything with ``sign`` and ``public_key``:
cryptography's ``Ed25519PrivateKey``, :class:`P256Signer` around cryptography's P-256
key, or ``insitu.workspace``'s token key (whose private half never leaves the token).

**Signatures carry their algorithm.** ``sign`` returns the *recorded* signature:

* Ed25519: the 64 bytes of the signature, as every ledger and bundle has always held
  them: a signature without a label reads as Ed25519;
* ECDSA P-256: ``b"ecdsa-p256-sha256:" + r || s`` (32 bytes each, big-endian), with the
  low ``s`` of the two that verify.

:func:`verify_signature` refuses a signature whose recorded algorithm is not the key's
before any arithmetic: a verifier never lets a record choose how it is checked. Each
signature has one encoding only (no label on Ed25519, low ``s`` on P-256, refused
otherwise), so a changed byte in a ledger export or a bundle header is always found.

**Public keys** are recorded as text (:func:`public_key_text`): Ed25519 as the 64 hex
digits of the raw key (unchanged), P-256 as ``ecdsa-p256-sha256:`` and the hex of the
33-byte compressed point. :func:`public_key_from_text` reads both and nothing else.
"""

from __future__ import annotations

from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "ALGORITHMS",
    "ED25519",
    "P256",
    "Ed25519Signer",
    "P256Signer",
    "Signer",
    "SigningPublicKey",
    "algorithm_of",
    "ecdsa_record",
    "public_key_from_text",
    "public_key_raw",
    "public_key_text",
    "signature_algorithm",
    "verify_signature",
]

#: The algorithm names recorded in signatures, public keys and ``workspace.init``.
ED25519 = "ed25519"
P256 = "ecdsa-p256-sha256"
ALGORITHMS = (ED25519, P256)

SigningPublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey

_P256_LABEL = b"ecdsa-p256-sha256:"
_SCALAR = 32  # bytes of r and s on P-256
#: The order of P-256's base point: ``s`` and ``n - s`` both verify; only the low one is kept.
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class Signer(Protocol):
    """Signs with a private key it may not be able to show."""

    def sign(self, data: bytes) -> bytes:
        """The recorded signature of ``data`` (see the module docstring)."""
        ...

    def public_key(self) -> SigningPublicKey:
        """The public half."""
        ...


#: The name this protocol had when every node key was Ed25519.
Ed25519Signer = Signer


def algorithm_of(public: SigningPublicKey) -> str:
    """``ed25519`` or ``ecdsa-p256-sha256``; raises ``ValueError`` for another curve."""
    if isinstance(public, Ed25519PublicKey):
        return ED25519
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
        return P256
    raise ValueError(f"a node's key is Ed25519 or ECDSA P-256, not {type(public).__name__}")


def public_key_raw(public: SigningPublicKey) -> bytes:
    """The key's bytes: Ed25519's 32 raw bytes, P-256's 33-byte compressed point.

    The node id is the SHA-256 of these (an Ed25519 key and a P-256 key never have bytes
    of the same length).
    """
    if algorithm_of(public) == ED25519:
        return public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return public.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)


def public_key_text(public: SigningPublicKey) -> str:
    """The key as recorded in exports, proofs and bundles (module docstring)."""
    if algorithm_of(public) == ED25519:
        return public_key_raw(public).hex()
    return f"{P256}:{public_key_raw(public).hex()}"


def public_key_from_text(text: object) -> SigningPublicKey:
    """Read :func:`public_key_text`; raises ``ValueError`` for anything else."""
    if not isinstance(text, str) or text != text.lower():
        raise ValueError("a public key is lower-case hex, optionally labelled")
    label, sep, body = text.rpartition(":")
    raw = bytes.fromhex(body)
    if not sep and len(raw) == 32:
        return Ed25519PublicKey.from_public_bytes(raw)
    if label == P256 and len(raw) == 33:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    raise ValueError(f"not an Ed25519 or ECDSA P-256 public key ({len(raw)} bytes, {label!r})")


def signature_algorithm(signature: bytes) -> tuple[str, bytes]:
    """The algorithm a recorded signature names, and its bare bytes.

    Raises ``ValueError`` for a label insitu does not know or a body of the wrong length.
    """
    algorithm, body = ED25519, signature
    if signature.startswith(_P256_LABEL):
        algorithm, body = P256, signature[len(_P256_LABEL) :]
    if len(body) != 64:
        raise ValueError(f"a {algorithm} signature has 64 bytes, not {len(body)}")
    return algorithm, body


def ecdsa_record(r_s: bytes) -> bytes:
    """The recorded form of a P-256 signature given as ``r || s`` (what PKCS#11 returns).

    ``s`` is replaced by ``n - s`` when it is the high one (both verify; one is kept).
    """
    if len(r_s) != 2 * _SCALAR:
        raise ValueError(f"a P-256 signature is 64 bytes r||s, not {len(r_s)}")
    s = int.from_bytes(r_s[_SCALAR:], "big")
    low = min(s, _P256_ORDER - s)
    return _P256_LABEL + r_s[:_SCALAR] + low.to_bytes(_SCALAR, "big")


def verify_signature(public: SigningPublicKey, signature: bytes, data: bytes) -> None:
    """Check that ``public`` made ``signature`` (a recorded one) over ``data``.

    Raises:
        InvalidSignature: it did not, or the signature records another algorithm than
            the key's (``str(exc)`` says which).

    """
    try:
        algorithm, body = signature_algorithm(signature)
    except ValueError as exc:
        raise InvalidSignature(str(exc)) from None
    expected = algorithm_of(public)
    if algorithm != expected:
        raise InvalidSignature(f"the signature is recorded as {algorithm}, the key is {expected}")
    if isinstance(public, Ed25519PublicKey):
        public.verify(body, data)
        return
    r, s = int.from_bytes(body[:_SCALAR], "big"), int.from_bytes(body[_SCALAR:], "big")
    if s > _P256_ORDER // 2:
        raise InvalidSignature("a P-256 signature with the high s (a second encoding)")
    public.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))


class P256Signer:
    """A signer around cryptography's ECDSA P-256 private key (a file key, or tests')."""

    def __init__(self, private: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private.curve, ec.SECP256R1):
            raise TypeError(f"a node's ECDSA key is on P-256, not {private.curve.name}")
        self._private = private

    def sign(self, data: bytes) -> bytes:
        """``ecdsa-p256-sha256:`` and ``r || s`` of ``data``."""
        r, s = decode_dss_signature(self._private.sign(data, ec.ECDSA(hashes.SHA256())))
        return ecdsa_record(r.to_bytes(_SCALAR, "big") + s.to_bytes(_SCALAR, "big"))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The public half."""
        return self._private.public_key()
