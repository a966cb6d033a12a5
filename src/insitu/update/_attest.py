"""A repository that requires attestation: no bundle is published for a device without its quote.

``insitu repo publish --attest ALLOWLIST`` checks one device's quote when the operator
asks for it; a repository that *requires* attestation asks it of every publish, so
forgetting the flag cannot hand a bundle to a device that runs a modified build. The
setting lives beside the role keys, never under ``public/`` (nothing of it is served)::

    <repo>/attestation/allow-list.toml          the measured states a device must show
    <repo>/attestation/devices/<key id>.ak.pem  each device's enrolled attestation key
    <repo>/attestation/ek-ca.pem                the pinned TPM vendors' CAs (optional)

With ``ek-ca.pem`` (``insitu repo attest --require ALLOWLIST --ek-ca CA.pem``), a
device's AK is bound to its TPM's certified EK: the challenge takes the device's EK
certificate and AK public area, and gives a credential file (the nonce inside, made to
that EK and AK name) instead of the nonce in clear, which only that TPM recovers
(``insitu attest quote --credential``). Without it, the enrolled AK is trusted on first
use.

While it is on, a publish names exactly one ``--device`` and brings that device's quote,
over a nonce of the publisher's workspace (``insitu repo attest REPO --challenge ID``),
checked against the repository's allow-list and the AK enrolled *here* (a per-publish
``--ak`` is not taken: whoever runs the publish would choose the key). A publish to a
channel is refused: a channel reaches every enrolled device, attested or not. Each
refusal is one line and is recorded in the publisher's ledger (``repo.publish_refused``,
or ``attestation.checked`` once a quote was checked); turning the setting on or off and
enrolling a key are recorded too (``repo.attestation_set``, ``repo.attestation_enrolled``).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from insitu._atomic import atomic_write_bytes, atomic_write_text
from insitu.attestation import (
    AllowList,
    Challenge,
    Quote,
    Verifier,
    ak_fingerprint,
    load_ek_cas,
)
from insitu.audit import Ledger, events
from insitu.errors import (
    AttestationRequiredError,
    UnknownAttestationKeyError,
    UsageError,
)
from insitu.workspace import Workspace

__all__ = ["DeviceAttestation", "device_attestation", "set_device_attestation"]

logger = logging.getLogger(__name__)

_DIR = "attestation"
_ALLOW = "allow-list.toml"
_EK_CA = "ek-ca.pem"
_DEVICE_ID = re.compile(r"^[0-9a-f]{16,64}$")


def _folder(repo: Path) -> Path:
    return Path(repo) / _DIR


def _check_repository(repo: Path) -> None:
    if not (Path(repo) / "public" / "metadata" / "root.json").is_file():
        raise UsageError(f"{repo} holds no update repository; create one with 'insitu repo init'")


@dataclass(frozen=True)
class DeviceAttestation:
    """A repository's attestation requirement: its allow-list and enrolled device AKs."""

    repo: Path
    allow_list: AllowList
    ek_cas: tuple[x509.Certificate, ...] | None = None

    def _ak_path(self, device: str) -> Path:
        if not _DEVICE_ID.match(device):
            raise UsageError(f"{device!r} is not a device key id (hex, from 'insitu info')")
        return _folder(self.repo) / "devices" / f"{device}.ak.pem"

    def enrolled(self) -> dict[str, str]:
        """Each enrolled device's AK fingerprint, by device key id."""
        folder = _folder(self.repo) / "devices"
        return {
            path.name.removesuffix(".ak.pem"): ak_fingerprint(path.read_bytes())
            for path in sorted(folder.glob("*.ak.pem"))
        }

    def enroll(self, device: str, ak_pem: bytes, *, ledger: Ledger) -> str:
        """Enroll ``device``'s attestation key (PEM); returns its fingerprint.

        Raises:
            UsageError: not a device key id, or not a PEM public key.

        """
        path = self._ak_path(device)
        try:
            fingerprint = ak_fingerprint(ak_pem)
        except (ValueError, TypeError) as exc:
            raise UsageError(
                "the AK is not a PEM public key; give the file 'insitu attest key --out' wrote"
            ) from exc
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, ak_pem)
        events.REPO_ATTESTATION_ENROLLED.record(ledger, device=device, ak_fingerprint=fingerprint)
        return fingerprint

    def _verifier(self, ws: Workspace, device: str) -> Verifier:
        path = self._ak_path(device)
        keys = {device: path.read_bytes()} if path.is_file() else {}
        return Verifier(
            ws, self.allow_list, keys, kind="device", persistent=True, ek_cas=self.ek_cas
        )

    def challenge(
        self,
        ws: Workspace,
        device: str,
        *,
        ek_certificate: bytes | None = None,
        ak_public: bytes | None = None,
    ) -> Challenge:
        """A fresh nonce for ``device``, kept in ``ws`` until its quote is checked.

        With pinned EK CAs, ``ek_certificate`` and ``ak_public`` are checked first (a
        refusal is recorded and raised) and the challenge carries the credential.
        """
        return self._verifier(ws, device).challenge(
            device, ek_certificate=ek_certificate, ak_public=ak_public
        )

    def check_publish(
        self,
        ws: Workspace,
        *,
        devices: Sequence[str],
        channels: Sequence[str],
        quote: Quote | None,
    ) -> None:
        """Let a publish go ahead only for one device whose fresh quote is allowed.

        Every refusal is recorded in ``ws``'s ledger before it is raised.

        Raises:
            AttestationRequiredError: a channel, not exactly one device, or no quote.
            UnknownAttestationKeyError: the device has no AK enrolled in this repository.
            AttestationRefusedError: the quote is refused (its one line, e.g. the PCR).

        """
        required = f"the repository {self.repo} requires attestation of every device"
        if channels or len(devices) != 1:
            self._refused(
                ws,
                AttestationRequiredError(
                    f"{required}: publish to one --device with its --quote, not to a channel "
                    "(a channel reaches every enrolled device, attested or not)"
                ),
            )
        (device,) = devices
        if not self._ak_path(device).is_file():
            self._refused(
                ws,
                UnknownAttestationKeyError(
                    f"{required}: device {device} has no attestation key enrolled; enroll the "
                    f"one it printed with 'insitu repo attest {self.repo} --enroll {device} "
                    "--ak AK.pem'"
                ),
            )
        if quote is None:
            self._refused(
                ws,
                AttestationRequiredError(
                    f"{required}: device {device} gave no quote; get a nonce with 'insitu repo "
                    f"attest {self.repo} --challenge {device}', have the device run 'insitu "
                    "attest quote --nonce N', and publish with --quote"
                ),
            )
        assert quote is not None
        self._verifier(ws, device).check(device, quote).raise_if_refused()

    @staticmethod
    def _refused(ws: Workspace, error: Exception) -> None:
        with ws.ledger() as ledger:
            events.REPO_PUBLISH_REFUSED.record(ledger, reason=type(error).__name__)
        raise error


def device_attestation(repo: Path) -> DeviceAttestation | None:
    """The repository's attestation requirement, or None when it publishes without one.

    Raises:
        AllowListError: the stored allow-list cannot be read (one line naming the file).

    """
    path = _folder(repo) / _ALLOW
    if not path.exists():
        return None
    pinned = _folder(repo) / _EK_CA
    ek_cas = tuple(load_ek_cas(pinned)) if pinned.exists() else None
    return DeviceAttestation(Path(repo), AllowList.load(path), ek_cas)


def set_device_attestation(
    repo: Path, allow_list: Path | None, *, ledger: Ledger, ek_ca: Path | None = None
) -> DeviceAttestation | None:
    """Require attestation of every device against ``allow_list`` (None: require none).

    The allow-list is read and copied into the repository (a later edit of the
    original changes nothing); enrolled device keys are kept either way. With
    ``ek_ca`` (PEM), devices' AKs are bound to EK certificates chaining to it; without
    it, they are trusted on first use (a warning says so).

    Raises:
        UsageError: ``repo`` holds no repository.
        AllowListError: ``allow_list`` cannot be read as one.
        EkCertificateError: ``ek_ca`` holds no PEM certificate.

    """
    _check_repository(repo)
    target = _folder(repo) / _ALLOW
    pinned = _folder(repo) / _EK_CA
    if allow_list is None:
        target.unlink(missing_ok=True)
        pinned.unlink(missing_ok=True)
        events.REPO_ATTESTATION_SET.record(ledger, required=False)
        logger.info("repository %s: attestation of devices is no longer required", repo)
        return None
    stored = AllowList.load(allow_list)
    ek_cas = tuple(load_ek_cas(ek_ca)) if ek_ca is not None else None
    text = stored.to_toml()
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, text)
    pinned_sha256: dict[str, str] = {}
    if ek_cas is not None:
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in ek_cas)
        atomic_write_bytes(pinned, pem)
        pinned_sha256["ek_ca_sha256"] = hashlib.sha256(pem).hexdigest()
    else:
        pinned.unlink(missing_ok=True)
        logger.warning(
            "repository %s trusts each device's AK on first use (its enrollment), not its "
            "TPM's EK certificate: pin the TPM vendor's CA with --ek-ca to bind it",
            repo,
        )
    events.REPO_ATTESTATION_SET.record(
        ledger,
        required=True,
        allow_list_sha256=hashlib.sha256(text.encode()).hexdigest(),
        states=len(stored.states),
        pcrs=stored.pcrs,
        **pinned_sha256,
    )
    return DeviceAttestation(Path(repo), stored, ek_cas)
