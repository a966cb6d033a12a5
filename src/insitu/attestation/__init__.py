"""Attested membership: a site or device proves its measured insitu build with a TPM quote.

Before a federation admits a site, and before an update repository encrypts a bundle
for a device, the site or device extends the digest of its insitu build
(:func:`build_digest`) into a PCR (:data:`DEFAULT_PCR`, 23) and quotes that PCR with its
TPM's attestation key over a fresh nonce from the verifier (:class:`Tpm`). The verifier
(:class:`Verifier`) checks the quote's signature against the AK it enrolled for that
subject, the nonce, and the PCR values against an allow-list of measured states
(:class:`AllowList`), and records the decision as ``attestation.checked`` in its
ledger. A refusal is one line naming the PCR that differs
(:class:`~insitu.errors.MeasurementMismatchError`).

The TPM is driven through tpm2-tools (see :mod:`insitu.attestation._quote` for why and
for the trust model); the verifier needs neither a TPM nor tpm2-tools. docs/attestation.md
says what is measured, what is not, and the limits.
"""

from __future__ import annotations

from insitu.attestation._ek import (
    ak_name,
    ak_public_key,
    check_ek_certificate,
    ek_fingerprint,
    load_ek_cas,
    make_credential,
)
from insitu.attestation._measure import build_digest, expected_pcr, package_dir
from insitu.attestation._quote import (
    DEFAULT_AK_HANDLE,
    DEFAULT_PCR,
    EK_CERTIFICATE_INDEX,
    EK_HANDLE,
    TCTI_ENV,
    Quote,
    Tpm,
)
from insitu.attestation._verify import (
    MAX_NONCES,
    MAX_NONCES_PER_SUBJECT,
    NONCE_TTL,
    AllowList,
    Challenge,
    Decision,
    MeasuredState,
    Verifier,
    ak_fingerprint,
    quoted_nonce,
)

__all__ = [
    "DEFAULT_AK_HANDLE",
    "DEFAULT_PCR",
    "EK_CERTIFICATE_INDEX",
    "EK_HANDLE",
    "MAX_NONCES",
    "MAX_NONCES_PER_SUBJECT",
    "NONCE_TTL",
    "TCTI_ENV",
    "AllowList",
    "Challenge",
    "Decision",
    "MeasuredState",
    "Quote",
    "Tpm",
    "Verifier",
    "ak_fingerprint",
    "ak_name",
    "ak_public_key",
    "build_digest",
    "check_ek_certificate",
    "ek_fingerprint",
    "expected_pcr",
    "load_ek_cas",
    "make_credential",
    "package_dir",
    "quoted_nonce",
]
