"""An AK bound to its TPM's certified EK: the EK certificate chains to a pinned CA, and
only the TPM holding that EK and the AK recovers a credential made for them.

The TPMs are swtpm states manufactured with an EK certificate by swtpm-localca (the
"vendor" CA the verifier pins); the verifier's side is Python only.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from insitu.attestation import (
    Tpm,
    ak_fingerprint,
    ak_public_key,
    check_ek_certificate,
    make_credential,
)
from insitu.errors import EkCertificateError, TpmError

from .conftest import provision_ek


def _pinned(ca: Path) -> list[x509.Certificate]:
    """The vendor's CA certificates an operator pins: swtpm-localca's root and issuer."""
    return [
        x509.load_pem_x509_certificate((ca / name).read_bytes())
        for name in ("swtpm-localca-rootca-cert.pem", "issuercert.pem")
    ]


def test_an_ak_resident_with_a_certified_ek_recovers_its_credential(
    start_swtpm: Callable[..., str], tmp_path: Path
) -> None:
    vendor = tmp_path / "vendor-ca"
    tpm = Tpm(start_swtpm("site", ek_ca=vendor))
    ek = check_ek_certificate(tpm.ek_certificate(), _pinned(vendor))
    area = tpm.ak_public_area()
    assert ak_fingerprint(ak_public_key(area)) == ak_fingerprint(tpm.ak_public_pem())
    secret = secrets.token_bytes(32)
    assert tpm.activate(make_credential(ek, area, secret)) == secret


def test_attack_ak_of_another_tpm_cannot_recover_the_credential(
    start_swtpm: Callable[..., str], tmp_path: Path
) -> None:
    # Two genuine TPMs of the same vendor. The attacker presents A's certified EK with
    # an AK of B (a key it holds elsewhere), hoping B's AK is taken as A's.
    vendor = tmp_path / "vendor-ca"
    a = Tpm(start_swtpm("a", ek_ca=vendor))
    b = Tpm(start_swtpm("b", ek_ca=vendor))
    ek_of_a = check_ek_certificate(a.ek_certificate(), _pinned(vendor))
    credential = make_credential(ek_of_a, b.ak_public_area(), secrets.token_bytes(32))
    with pytest.raises(TpmError, match="tpm2_activatecredential failed"):
        b.activate(credential)  # B holds its AK, not A's EK
    with pytest.raises(TpmError, match="tpm2_activatecredential failed"):
        a.activate(credential)  # A holds the EK, not B's AK


def test_attack_ek_certificate_of_an_unpinned_ca_is_refused(
    start_swtpm: Callable[..., str], tmp_path: Path
) -> None:
    vendor, rogue = tmp_path / "vendor-ca", tmp_path / "rogue-ca"
    (tmp_path / "unused").mkdir()
    provision_ek(tmp_path / "unused", vendor)  # the vendor's CA exists; this TPM is not its
    tpm = Tpm(start_swtpm("site", ek_ca=rogue))
    with pytest.raises(EkCertificateError, match="does not chain to a pinned CA"):
        check_ek_certificate(tpm.ek_certificate(), _pinned(vendor))
    with pytest.raises(EkCertificateError, match="cannot be read"):
        check_ek_certificate(b"not a certificate", _pinned(vendor))


def test_an_ak_public_area_unfit_to_attest_is_refused(
    start_swtpm: Callable[..., str], tmp_path: Path
) -> None:
    area = bytearray(Tpm(start_swtpm("site", ek_ca=tmp_path / "ca")).ak_public_area())
    area[7] &= ~0x01  # objectAttributes bytes 6-9: clear 'restricted' (0x00010000)
    with pytest.raises(EkCertificateError, match="not those of an attestation key"):
        ak_public_key(bytes(area))
    with pytest.raises(EkCertificateError, match="not a TPM2B_PUBLIC"):
        ak_public_key(bytes(area[:-1]))
