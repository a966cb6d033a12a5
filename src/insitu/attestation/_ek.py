"""Binding an attestation key to its TPM's endorsement key: EK certificate and credential.

Trust on first enrollment (see :mod:`insitu.attestation._quote`) believes that the AK a
site printed lives in a TPM. This module is what replaces that belief with a proof, on
the verifier's side, without a TPM (``cryptography`` only):

1. :func:`check_ek_certificate`: the TPM's endorsement key (EK) certificate, read from
   the TPM's NV index (:meth:`~insitu.attestation.Tpm.ek_certificate`), chains to a CA
   the operator pinned (a TPM vendor's, or swtpm-localca's in the tests), and is in date;
2. :func:`ak_public_key`: the AK's public area (``TPMT_PUBLIC``, as the TPM holds it) is
   a restricted, fixed-TPM signing key, and its point is the AK the verifier enrolls;
3. :func:`make_credential`: TPM2_MakeCredential (TPM 2.0 Part 1, 24): a secret encrypted
   so that only a TPM holding the EK's private key *and* an object of that AK's name can
   recover it (``tpm2_activatecredential``, :meth:`~insitu.attestation.Tpm.activate`).
   The prover sending the secret back proves the AK is resident with the certified EK.

RSA EKs (the TCG's default template, ``0x01C00002``) only: the seed is RSA-OAEP with the
label ``IDENTITY``, the inner wrap AES-128-CFB, both as the EK template fixes them. This
is what ``insitu federate server --ek-ca`` uses (:class:`~insitu.attestation.Verifier`'s
``ek_cas``); docs/attestation.md says what it proves and what not.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import struct
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from insitu.errors import EkCertificateError

__all__ = [
    "ak_name",
    "ak_public_key",
    "check_ek_certificate",
    "ek_fingerprint",
    "load_ek_cas",
    "make_credential",
]

_ALG_SHA256 = 0x000B
_ALG_ECC = 0x0023
_ALG_NULL = 0x0010
_CURVE_P256 = 0x0003
_FIXED_TPM, _FIXED_PARENT, _SENSITIVE_ORIGIN = 0x2, 0x10, 0x20
_RESTRICTED, _DECRYPT, _SIGN = 0x10000, 0x20000, 0x40000
_CHAIN_DEPTH = 5
#: tpm2-tools' credential file: magic, version, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
_CREDENTIAL_HEADER = struct.pack(">II", 0xBADCC0DE, 1)


def check_ek_certificate(
    certificate: bytes, pinned: Sequence[x509.Certificate]
) -> rsa.RSAPublicKey:
    """The EK's public key, once its certificate (DER or PEM) chains to a pinned CA.

    ``pinned`` holds the operator's CA certificates (roots and intermediates); the chain
    ends at a self-signed one of them. Every certificate on the way must be in date.

    Raises:
        EkCertificateError: unreadable, not chaining to ``pinned``, out of date, or not
            an RSA key.

    """
    current = _certificate(certificate)
    ek = current.public_key()
    now = datetime.datetime.now(datetime.UTC)
    for _ in range(_CHAIN_DEPTH):
        if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
            raise EkCertificateError(
                f"the certificate {current.subject.rfc4514_string()} on the EK's chain is "
                "out of date"
            )
        issuer = _issuer(current, pinned)
        if issuer is None:
            raise EkCertificateError(
                f"the EK certificate does not chain to a pinned CA (no pinned issuer "
                f"{current.issuer.rfc4514_string()!r} signed it); pin the TPM vendor's CA"
            )
        if issuer.subject == issuer.issuer:
            if not isinstance(ek, rsa.RSAPublicKey):
                raise EkCertificateError("the EK is not an RSA key; only RSA EKs are supported")
            return ek
        current = issuer
    raise EkCertificateError(f"the EK certificate's chain is longer than {_CHAIN_DEPTH}")


def load_ek_cas(path: Path) -> list[x509.Certificate]:
    """The CA certificates (PEM, one or more) an operator pins for EK certificates.

    Raises:
        EkCertificateError: the file cannot be read or holds no PEM certificate.

    """
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise EkCertificateError(
            f"cannot read the pinned EK CA certificates {path} ({exc}); give the TPM "
            "vendor's CA certificates, PEM"
        ) from exc


def ek_fingerprint(certificate: bytes) -> str:
    """``sha256:<hex>`` of an EK certificate (DER), as the ledger records it.

    Raises:
        EkCertificateError: the certificate (DER or PEM) cannot be read.

    """
    return (
        "sha256:"
        + hashlib.sha256(
            _certificate(certificate).public_bytes(serialization.Encoding.DER)
        ).hexdigest()
    )


def _certificate(certificate: bytes) -> x509.Certificate:
    try:
        if certificate.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(certificate)
        return x509.load_der_x509_certificate(certificate)
    except ValueError as exc:
        raise EkCertificateError(f"the EK certificate cannot be read: {exc}") from exc


def _issuer(cert: x509.Certificate, pinned: Sequence[x509.Certificate]) -> x509.Certificate | None:
    for candidate in pinned:
        if candidate.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return candidate
    return None


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise EkCertificateError("the AK's public area is truncated")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def sized(self) -> bytes:
        return self.take(self.u16())


def _tpmt(public_area: bytes) -> bytes:
    """The TPMT_PUBLIC inside a TPM2B_PUBLIC (``tpm2_readpublic -o``)."""
    if len(public_area) < 2 or int.from_bytes(public_area[:2]) != len(public_area) - 2:
        raise EkCertificateError("the AK's public area is not a TPM2B_PUBLIC")
    return public_area[2:]


def ak_name(public_area: bytes) -> bytes:
    """The TPM name of an AK (SHA-256 name algorithm): ``0x000B || SHA-256(TPMT_PUBLIC)``."""
    return _ALG_SHA256.to_bytes(2) + hashlib.sha256(_tpmt(public_area)).digest()


def ak_public_key(public_area: bytes) -> bytes:
    """The PEM public key of an AK public area, once it is a fit attestation key.

    Raises:
        EkCertificateError: not an ECC P-256 key named with SHA-256, or not restricted,
            sign-only, fixed to its TPM and parent, generated in the TPM.

    """
    r = _Reader(_tpmt(public_area))
    kind, name_alg = r.u16(), r.u16()
    attributes = int.from_bytes(r.take(4))
    r.sized()  # authPolicy
    if kind != _ALG_ECC or name_alg != _ALG_SHA256:
        raise EkCertificateError("the AK is not an ECC key named with SHA-256")
    wanted = _FIXED_TPM | _FIXED_PARENT | _SENSITIVE_ORIGIN | _RESTRICTED | _SIGN
    if attributes & wanted != wanted or attributes & _DECRYPT:
        raise EkCertificateError(
            f"the AK's attributes {attributes:#010x} are not those of an attestation key "
            "(restricted, sign-only, fixedTPM, fixedParent, sensitiveDataOrigin)"
        )
    if r.u16() != _ALG_NULL:  # symmetric: a signing key has none
        raise EkCertificateError("the AK has a symmetric algorithm: not a signing key")
    if r.u16() != _ALG_NULL:  # scheme, then its hash
        r.u16()
    if r.u16() != _CURVE_P256:
        raise EkCertificateError("the AK is not on curve P-256")
    if r.u16() != _ALG_NULL:  # kdf
        r.u16()
    x, y = r.sized(), r.sized()
    point = ec.EllipticCurvePublicNumbers(
        int.from_bytes(x), int.from_bytes(y), ec.SECP256R1()
    ).public_key()
    return point.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _kdfa(key: bytes, label: bytes, context: bytes, bits: int) -> bytes:
    """KDFa with HMAC-SHA256 (TPM 2.0 Part 1, 11.4.10.2), the label NUL-terminated."""
    out = b""
    counter = 1
    while len(out) * 8 < bits:
        block = struct.pack(">I", counter) + label + b"\x00" + context + struct.pack(">I", bits)
        out += hmac.new(key, block, hashlib.sha256).digest()
        counter += 1
    return out[: bits // 8]


def make_credential(ek: rsa.RSAPublicKey, public_area: bytes, secret: bytes) -> bytes:
    """TPM2_MakeCredential for ``secret`` (at most 32 bytes) to the AK of ``public_area``.

    Returns tpm2-tools' credential file (``tpm2_activatecredential -i``).
    """
    if not 0 < len(secret) <= 32:
        raise ValueError("a credential secret is 1 to 32 bytes")
    name = ak_name(public_area)
    seed = os.urandom(32)
    encrypted_seed = ek.encrypt(
        seed,
        padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"IDENTITY\x00"
        ),
    )
    symmetric = _kdfa(seed, b"STORAGE", name, 128)
    encryptor = Cipher(algorithms.AES(symmetric), CFB(bytes(16))).encryptor()
    identity = encryptor.update(len(secret).to_bytes(2) + secret) + encryptor.finalize()
    integrity = hmac.new(_kdfa(seed, b"INTEGRITY", b"", 256), identity + name, hashlib.sha256)
    outer = integrity.digest()
    id_object = len(outer).to_bytes(2) + outer + identity
    return (
        _CREDENTIAL_HEADER
        + len(id_object).to_bytes(2)
        + id_object
        + len(encrypted_seed).to_bytes(2)
        + encrypted_seed
    )
