r"""The bundle file: a signed header, then the (usually encrypted) ONNX model.

Layout (``.insb``)::

    b"INSITUB\x01"               8 bytes: magic and format version
    header length                 4 bytes, big endian
    header                        canonical JSON {"signed": {...}, "signatures": [...]}
    payload                       the model, sealed with _stream (or plain, with a warning)

``signed`` holds the manifest: bundle id, name, version, creation time, the model card,
the SHA-256 digest and length of each file (``model.onnx`` and ``card.json``), the
payload's own length and digest, the encryption parameters with the data key wrapped
for each recipient, and the publisher's public key. Each signature is Ed25519 over
``b"insitu-bundle/1\n" + canonical_bytes(signed)`` (the prefix separates this signature
domain from the ledger's, which uses the same key).

Why not OpenSSF ``model-signing`` (an in-toto statement over file digests): the signed
statement would have to sit beside a directory of files, and insitu must also sign the
encryption envelope (who may open the bundle) and ship one file that a TUF target can
name; its 1.1.1 release also imports pyOpenSSL without declaring it. ADR 0102 has the
comparison. The header is small canonical JSON, so any Ed25519 implementation can check
it.

Verification order (:class:`BundleVerifier`): parse -> signature by a trusted publisher
key -> payload length and digest -> decrypt -> model digest. Nothing of the model is
used before the signature and the digests have been checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from insitu._canonical import canonical_bytes, is_canonical
from insitu.audit._records import utc_now
from insitu.bundle import _stream
from insitu.bundle._card import ModelCard
from insitu.errors import (
    MalformedBundleError,
    TamperedBundleError,
    UnsignedBundleError,
    UntrustedPublisherError,
    WrongDeviceKeyError,
)

__all__ = [
    "BUNDLE_MAGIC",
    "ENCRYPTION_SCHEME",
    "Bundle",
    "BundleVerifier",
    "OpenedBundle",
    "create_bundle",
    "publisher_key_id",
]

logger = logging.getLogger(__name__)

BUNDLE_MAGIC = b"INSITUB\x01"
ENCRYPTION_SCHEME = "aes-256-gcm-stream+x25519-hkdf-sha256"
_SIGNATURE_DOMAIN = b"insitu-bundle/1\n"
_MAX_HEADER = 16 << 20
_SIG_HEX = re.compile(r"^[0-9a-f]{128}$")


def publisher_key_id(public: Ed25519PublicKey) -> str:
    """The id of a publisher's Ed25519 key: first 16 bytes of SHA-256 of the raw key."""
    return hashlib.sha256(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:32]


def _context(signed: Mapping[str, Any]) -> bytes:
    """Associated data of the payload and of the key wrapping: binds them to one bundle."""
    return canonical_bytes(
        {"bundle_id": signed["bundle_id"], "name": signed["name"], "version": signed["version"]}
    )


def _check_fields(signed: dict[str, Any], signatures: Any) -> None:
    """Raise ``TypeError`` unless every field the code reads has the type it expects."""

    def need(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TypeError(f"{what} is missing or of the wrong type")
        return value

    for key in ("bundle_id", "name", "version"):
        need(signed.get(key), str, key)
    need(signed.get("card"), dict, "card")
    files = need(signed.get("files"), dict, "files")
    for name in ("model.onnx", "card.json"):
        entry = need(files.get(name), dict, f"files.{name}")
        need(entry.get("length"), int, f"files.{name}.length")
        need(entry.get("sha256"), str, f"files.{name}.sha256")
    payload = need(signed.get("payload"), dict, "payload")
    need(payload.get("length"), int, "payload.length")
    need(payload.get("sha256"), str, "payload.sha256")
    enc = payload.get("encryption")
    if enc is not None:
        need(enc, dict, "payload.encryption")
        need(enc.get("segment_size"), int, "payload.encryption.segment_size")
        need(enc.get("nonce_prefix"), str, "payload.encryption.nonce_prefix")
        for entry in need(enc.get("recipients"), list, "payload.encryption.recipients"):
            for key in ("keyid", "ephemeral", "wrapped"):
                need(need(entry, dict, "recipient").get(key), str, f"recipient {key}")
    need(need(signed.get("publisher"), dict, "publisher").get("keyid"), str, "publisher.keyid")
    for sig in need(signatures, list, "signatures"):
        need(need(sig, dict, "signature").get("keyid"), str, "signature keyid")
        need(sig.get("sig"), str, "signature")


@dataclass(frozen=True)
class Bundle:
    """A parsed, *not yet verified* bundle: its header and a view of its payload.

    ``header_bytes`` are the exact bytes from the magic to the end of the header; the
    delta path ships them verbatim so that a rebuilt bundle is byte-identical.
    """

    signed: dict[str, Any]
    signatures: list[dict[str, str]]
    header_bytes: bytes
    payload: memoryview

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> Bundle:
        """Split ``data`` into header and payload.

        Raises:
            MalformedBundleError: not a bundle, or a header that cannot be read.

        """
        view = memoryview(data).cast("B")
        if bytes(view[:8]) != BUNDLE_MAGIC:
            raise MalformedBundleError(
                "not an insitu bundle (bad magic); create one with 'insitu bundle create'"
            )
        length = int.from_bytes(view[8:12], "big")
        if length > _MAX_HEADER or 12 + length > len(view):
            raise MalformedBundleError("the bundle header is truncated or too large")
        try:
            text = bytes(view[12 : 12 + length]).decode("ascii")
            doc = json.loads(text)
            signed, signatures = doc["signed"], doc["signatures"]
            if not is_canonical(text) or not isinstance(signed, dict):
                raise ValueError("header is not canonical JSON")
            _check_fields(signed, signatures)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise MalformedBundleError(f"the bundle header is not valid ({exc})") from exc
        return cls(signed, list(signatures), bytes(view[: 12 + length]), view[12 + length :])

    @property
    def name(self) -> str:
        """The model name."""
        return str(self.signed["name"])

    @property
    def version(self) -> str:
        """The model version."""
        return str(self.signed["version"])

    @property
    def bundle_id(self) -> str:
        """A random id, unique to this bundle (bound into the encryption)."""
        return str(self.signed["bundle_id"])

    @property
    def card(self) -> ModelCard:
        """The model card (trust it only after :class:`BundleVerifier` has run)."""
        return ModelCard.from_json(self.signed["card"])

    @property
    def encrypted(self) -> bool:
        """Whether the payload is encrypted."""
        return self.signed["payload"].get("encryption") is not None

    @property
    def recipients(self) -> list[str]:
        """Key ids of the devices that can open the payload."""
        enc = self.signed["payload"].get("encryption") or {}
        return [r["keyid"] for r in enc.get("recipients", [])]

    @property
    def publisher_keyid(self) -> str:
        """Key id of the publisher key named in the header (claimed, not yet verified)."""
        return str(self.signed["publisher"]["keyid"])

    def summary(self) -> dict[str, Any]:
        """A JSON-able description (for ``inspect``)."""
        return {
            "bundle_id": self.bundle_id,
            "name": self.name,
            "version": self.version,
            "created": self.signed.get("created"),
            "files": self.signed["files"],
            "payload": {
                "length": self.signed["payload"]["length"],
                "sha256": self.signed["payload"]["sha256"],
                "encrypted": self.encrypted,
                "recipients": self.recipients,
            },
            "publisher": self.publisher_keyid,
            "card": self.signed["card"],
        }


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

    def __init__(self, trusted: Iterable[Ed25519PublicKey]) -> None:
        self._trusted = {publisher_key_id(key): key for key in trusted}
        if not self._trusted:
            raise ValueError("a verifier needs at least one trusted publisher key")

    def verify(self, bundle: Bundle, *, check_payload: bool = True) -> None:
        """Check signature and payload digest; raise a :class:`BundleError` if not."""
        message = _SIGNATURE_DOMAIN + canonical_bytes(bundle.signed)
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
            if not _SIG_HEX.match(str(sig.get("sig", ""))):
                continue
            try:
                self._trusted[sig["keyid"]].verify(bytes.fromhex(sig["sig"]), message)
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
        self, bundle: Bundle, device_key: X25519PrivateKey | None, *, check_payload: bool = True
    ) -> OpenedBundle:
        """Verify, decrypt with ``device_key`` and check the model digest.

        ``check_payload=False`` skips the digest of the *ciphertext*: the signed digest of
        the decrypted model binds every byte of it (the AEAD alone would not: every
        recipient knows the data key); the ciphertext digest is for checks made without
        a device key (a mirror, ``bundle verify``).
        """
        self.verify(bundle, check_payload=check_payload or not bundle.encrypted)
        model = bytearray(int(bundle.signed["files"]["model.onnx"]["length"]))
        self._decrypt_checked(bundle, device_key, model)
        return OpenedBundle(bundle, model)

    def open_into(
        self,
        bundle: Bundle,
        device_key: X25519PrivateKey | None,
        into: Any,
        *,
        check_payload: bool = True,
    ) -> None:
        """:meth:`open`, decrypting into the writable buffer ``into`` (of the model's length).

        If this raises, ``into`` holds unverified bytes and must not be used.
        """
        self.verify(bundle, check_payload=check_payload or not bundle.encrypted)
        self._decrypt_checked(bundle, device_key, into)

    @staticmethod
    def _decrypt_checked(bundle: Bundle, device_key: X25519PrivateKey | None, into: Any) -> None:
        # Called only after verify(): the header fields read here are the signed ones.
        expected = bundle.signed["files"]["model.onnx"]
        if len(memoryview(into).cast("B")) != expected["length"]:
            raise TamperedBundleError(
                f"bundle {bundle.name} {bundle.version}: the payload does not have the signed "
                "model length; download it again"
            )
        hasher = hashlib.sha256()
        decrypt_payload(bundle, device_key, into=into, hasher=hasher)
        if hasher.hexdigest() != expected["sha256"]:
            raise TamperedBundleError(
                f"bundle {bundle.name} {bundle.version}: the decrypted model differs from "
                "the signed digest; download it again from the repository"
            )


def data_key_for(bundle: Bundle, device_key: X25519PrivateKey | None) -> bytes:
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
        return _stream.unwrap_key(enc["recipients"], device_key, _context(bundle.signed))
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
    bundle: Bundle, device_key: X25519PrivateKey | None, *, into: Any = None, hasher: Any = None
) -> Any:
    """The plaintext model of ``bundle`` (in ``into`` if given, else a new ``bytearray``).

    Raises:
        TamperedBundleError: the payload does not authenticate, or has the wrong length.

    """
    enc = bundle.signed["payload"].get("encryption")
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
            _context(bundle.signed),
            segment_size=int(enc["segment_size"]),
            into=into,
            hasher=hasher,
        )
    except (InvalidTag, ValueError):
        raise TamperedBundleError(
            f"bundle {bundle.name} {bundle.version}: the encrypted payload does not "
            "authenticate (tampered or truncated); download it again"
        ) from None


def seal_payload(signed: Mapping[str, Any], model: bytes | bytearray, data_key: bytes) -> bytearray:
    """Encrypt ``model`` as the header ``signed`` says (deterministic: used by deltas)."""
    enc = signed["payload"]["encryption"]
    return _stream.encrypt(
        data_key,
        bytes.fromhex(enc["nonce_prefix"]),
        model,
        _context(signed),
        segment_size=int(enc["segment_size"]),
    )


def assemble(signed: dict[str, Any], signatures: list[dict[str, str]]) -> bytes:
    """Magic, header length and header bytes for ``signed`` and its signatures."""
    header = canonical_bytes({"signed": signed, "signatures": signatures})
    return BUNDLE_MAGIC + len(header).to_bytes(4, "big") + header


def create_bundle(
    model: bytes,
    card: ModelCard,
    signing_key: Ed25519PrivateKey,
    *,
    recipients: Iterable[X25519PublicKey] = (),
    segment_size: int = _stream.DEFAULT_SEGMENT_SIZE,
    created: str | None = None,
) -> bytes:
    """Build a signed bundle of ``model`` and ``card``, encrypted for ``recipients``.

    With no recipients the payload is stored in the clear, which is logged as a warning:
    anyone who gets the file gets the model (and what it memorized of its training data).
    """
    recipients = list(recipients)
    signed: dict[str, Any] = {
        "_type": "insitu-bundle",
        "format": 1,
        "bundle_id": uuid.uuid4().hex,
        "name": card.name,
        "version": card.version,
        "created": created or utc_now(),
        "card": card.to_json(),
        "files": {
            "model.onnx": {"length": len(model), "sha256": hashlib.sha256(model).hexdigest()},
            "card.json": {
                "length": len(card.to_bytes()),
                "sha256": hashlib.sha256(card.to_bytes()).hexdigest(),
            },
        },
        "publisher": {
            "keyid": publisher_key_id(signing_key.public_key()),
            "public": signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex(),
        },
        "payload": {"encryption": None},
    }
    payload: bytes | bytearray
    if recipients:
        data_key = secrets.token_bytes(_stream.KEY_SIZE)
        # Keys are deduplicated: one device listed twice would get two wrapped copies.
        unique = {_stream.key_id(r): r for r in recipients}
        signed["payload"]["encryption"] = {
            "scheme": ENCRYPTION_SCHEME,
            "segment_size": segment_size,
            "nonce_prefix": secrets.token_bytes(_stream.NONCE_PREFIX_SIZE).hex(),
            "recipients": [
                _stream.wrap_key(data_key, unique[k], _context(signed)) for k in sorted(unique)
            ],
        }
        payload = seal_payload(signed, model, data_key)
    else:
        logger.warning(
            "bundle %s %s is NOT encrypted: anyone with the file can run or copy the model. "
            "Pass the devices' encryption keys (--recipient) for anything trained on real data.",
            card.name,
            card.version,
        )
        payload = model
    signed["payload"] |= {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    signature = signing_key.sign(_SIGNATURE_DOMAIN + canonical_bytes(signed))
    sig_entry = {"keyid": signed["publisher"]["keyid"], "sig": signature.hex()}
    return assemble(signed, [sig_entry]) + bytes(payload)
