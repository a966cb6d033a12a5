"""Trusting a bundle: signature by a pinned publisher key, digests, decryption.

Verification order (:class:`BundleVerifier`): parse -> signature by a trusted publisher
key -> payload length (and, where no device key is at hand, payload digest) -> unwrap the
data key -> decrypt -> model digest. Nothing of the model is used before the signature
and the digests have been checked; a caller that decrypts into its own buffer
(:meth:`BundleVerifier.open_into`) must discard it if a check fails.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag

from insitu._canonical import canonical_bytes
from insitu._signer import SigningPublicKey, verify_signature
from insitu.bundle import _stream
from insitu.bundle._card import ModelCard
from insitu.bundle._format import (
    SIGNATURE_DOMAIN,
    SIGNATURE_HEX,
    Bundle,
    context_of,
    publisher_key_id,
)
from insitu.errors import (
    TamperedBundleError,
    UnsignedBundleError,
    UntrustedPublisherError,
    WrongDeviceKeyError,
)

__all__ = ["BundleVerifier", "OpenedBundle", "data_key_for", "decrypt_payload"]


@dataclass(frozen=True)
class OpenedBundle:
    """A verified bundle and its decrypted model (in memory only)."""

    bundle: Bundle
    model: bytearray

    @property
    def card(self) -> ModelCard:
        """The verified model card."""
        return self.bundle.card


class BundleVerifier:
    """Checks a bundle against a set of trusted publisher keys, then opens it.

    Invariants: :meth:`verify` returns only if a signature over the exact signed header
    verifies under one of ``trusted`` (looked up by key id, never by the key the header
    carries) and the payload has the signed length (and, unless ``check_payload`` is
    false, the signed SHA-256). :meth:`open` returns a
    model only if, in addition, it decrypts and has the signed ``model.onnx`` digest.
    The verifier holds no state between calls.
    """

    def __init__(self, trusted: Iterable[SigningPublicKey]) -> None:
        self._trusted = {publisher_key_id(key): key for key in trusted}
        if not self._trusted:
            raise ValueError("a verifier needs at least one trusted publisher key")

    def verify(self, bundle: Bundle, *, check_payload: bool = True) -> None:
        """Check signature and payload digest; raise a :class:`BundleError` if not."""
        message = SIGNATURE_DOMAIN + canonical_bytes(bundle.signed)
        if not bundle.signatures:
            raise UnsignedBundleError(f"bundle {bundle.name} {bundle.version} carries no signature")
        known = [s for s in bundle.signatures if s.get("keyid") in self._trusted]
        if not known:
            claimed = ", ".join(str(s.get("keyid")) for s in bundle.signatures)
            raise UntrustedPublisherError(
                f"bundle {bundle.name} {bundle.version} is signed by key {claimed}, which is "
                "not a trusted publisher key; install it only from the publisher you enrolled "
                "with (pin its key with --publisher)"
            )
        for sig in known:
            # One encoding per signature (lower-case hex): a bundle has no second form
            # that verifies, so any changed byte of a bundle file is refused.
            if not SIGNATURE_HEX.match(str(sig.get("sig", ""))):
                continue
            try:
                # The trusted key decides the algorithm; a signature recording another
                # one is refused (insitu._signer).
                verify_signature(self._trusted[sig["keyid"]], bytes.fromhex(sig["sig"]), message)
                break
            except (InvalidSignature, ValueError):
                continue
        else:
            raise UnsignedBundleError(
                f"the signature of bundle {bundle.name} {bundle.version} does not verify: the "
                "header was changed after signing; download it again from the repository"
            )
        expected = bundle.signed["payload"]
        if len(bundle.payload) != expected["length"]:
            raise TamperedBundleError(
                f"bundle {bundle.name} {bundle.version}: payload is {len(bundle.payload)} "
                f"bytes, the signed manifest says {expected['length']}; download it again"
            )
        if check_payload and hashlib.sha256(bundle.payload).hexdigest() != expected["sha256"]:
            raise TamperedBundleError(
                f"bundle {bundle.name} {bundle.version}: payload digest differs from the "
                "signed manifest (tampered or corrupt); download it again"
            )

    def open(
        self, bundle: Bundle, device_key: _stream.DeviceKey | None, *, check_payload: bool = True
    ) -> OpenedBundle:
        """Verify, decrypt with ``device_key`` and check the model digest.

        ``check_payload=False`` skips the digest of the *ciphertext*: the signed digest of
        the decrypted model binds every byte of it (the AEAD alone would not: every
        recipient knows the data key); the ciphertext digest is for checks made without
        a device key (a mirror, ``bundle verify``).
        """
        self.verify(bundle, check_payload=check_payload or not bundle.encrypted)
        model = bytearray(int(bundle.signed["files"]["model.onnx"]["length"]))
        self._decrypt_checked(bundle, device_key, into=model)
        return OpenedBundle(bundle, model)

    def open_to(
        self,
        bundle: Bundle,
        device_key: _stream.DeviceKey | None,
        sink: Callable[[memoryview], None],
        *,
        check_payload: bool = True,
    ) -> None:
        """:meth:`open`, handing the decrypted model to ``sink`` segment by segment.

        Returns only when the whole model was written and its digest matched. If this
        raises, what ``sink`` received is unverified and must be discarded.
        """
        self.verify(bundle, check_payload=check_payload or not bundle.encrypted)
        self._decrypt_checked(bundle, device_key, sink=sink)

    @staticmethod
    def _decrypt_checked(
        bundle: Bundle,
        device_key: _stream.DeviceKey | None,
        *,
        into: Any = None,
        sink: Callable[[memoryview], None] | None = None,
    ) -> None:
        # Called only after verify(): the header fields read here are the signed ones.
        expected = bundle.signed["files"]["model.onnx"]
        enc = bundle.signed["payload"].get("encryption")
        plain = (
            _stream.plaintext_length(len(bundle.payload), int(enc["segment_size"]))
            if enc is not None and _valid_length(bundle, int(enc["segment_size"]))
            else len(bundle.payload)
        )
        if plain != expected["length"] or (
            into is not None and len(memoryview(into).cast("B")) != plain
        ):
            raise TamperedBundleError(
                f"bundle {bundle.name} {bundle.version}: the payload does not have the signed "
                "model length; download it again"
            )
        hasher = hashlib.sha256()
        decrypt_payload(bundle, device_key, into=into, hasher=hasher, sink=sink)
        if hasher.hexdigest() != expected["sha256"]:
            raise TamperedBundleError(
                f"bundle {bundle.name} {bundle.version}: the decrypted model differs from "
                "the signed digest; download it again from the repository"
            )


def _valid_length(bundle: Bundle, segment_size: int) -> bool:
    try:
        _stream.plaintext_length(len(bundle.payload), segment_size)
    except ValueError:
        return False
    return segment_size > 0


def data_key_for(bundle: Bundle, device_key: _stream.DeviceKey | None) -> bytes:
    """Unwrap the bundle's data key for ``device_key``.

    Raises:
        WrongDeviceKeyError: no key, or a key that is not among the recipients.
        TamperedBundleError: the wrapped key for this device does not open.

    """
    enc = bundle.signed["payload"]["encryption"]
    if device_key is None:
        raise WrongDeviceKeyError(
            f"bundle {bundle.name} {bundle.version} is encrypted and no device key was "
            "given; run it on a device it was encrypted for"
        )
    try:
        return _stream.unwrap_key(enc["recipients"], device_key, context_of(bundle.signed))
    except LookupError:
        raise WrongDeviceKeyError(
            f"bundle {bundle.name} {bundle.version} was not encrypted for this device (key "
            f"{_stream.key_id(device_key.public_key())}); ask the publisher to add this "
            "device's encryption key (keys/encryption.pub.pem) as a recipient"
        ) from None
    except (InvalidTag, ValueError, KeyError):
        raise TamperedBundleError(
            f"bundle {bundle.name} {bundle.version}: the key wrapped for this device does not "
            "open (tampered); download it again"
        ) from None


def decrypt_payload(
    bundle: Bundle,
    device_key: _stream.DeviceKey | None,
    *,
    into: Any = None,
    hasher: Any = None,
    sink: Callable[[memoryview], None] | None = None,
) -> Any:
    """The plaintext model of ``bundle`` (in ``into`` if given, else a new ``bytearray``).

    With ``sink``, the plaintext is handed to it segment by segment and nothing is
    returned (see :func:`insitu.bundle._stream.decrypt`).

    Raises:
        TamperedBundleError: the payload does not authenticate, or has the wrong length.

    """
    enc = bundle.signed["payload"].get("encryption")
    if enc is None and sink is not None:
        for start in range(0, len(bundle.payload), _stream.DEFAULT_SEGMENT_SIZE):
            chunk = bundle.payload[start : start + _stream.DEFAULT_SEGMENT_SIZE]
            sink(chunk)
            if hasher is not None:
                hasher.update(chunk)
        return None
    if enc is None:
        out = bytearray(bundle.payload) if into is None else into
        view = memoryview(out).cast("B")
        if len(view) != len(bundle.payload):
            raise TamperedBundleError(f"bundle {bundle.name}: payload has the wrong length")
        if into is not None:
            view[:] = bundle.payload
        if hasher is not None:
            hasher.update(view)
        return out
    key = data_key_for(bundle, device_key)
    try:
        return _stream.decrypt(
            key,
            bytes.fromhex(enc["nonce_prefix"]),
            bundle.payload,
            context_of(bundle.signed),
            segment_size=int(enc["segment_size"]),
            into=into,
            hasher=hasher,
            sink=sink,
        )
    except (InvalidTag, ValueError):
        raise TamperedBundleError(
            f"bundle {bundle.name} {bundle.version}: the encrypted payload does not "
            "authenticate (tampered or truncated); download it again"
        ) from None
