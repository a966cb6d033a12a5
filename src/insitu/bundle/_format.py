r"""The bundle file: a signed header, then the (usually encrypted) ONNX model.

Layout (``.insb``)::

    b"INSITUB\x01"               8 bytes: magic and format version
    header length                 4 bytes, big endian
    header                        canonical JSON {"signed": {...}, "signatures": [...]}
    payload                       the model, sealed with _stream (or plain, with a warning)

``signed`` holds the manifest: bundle id, name, version, creation time, the model card,
the SHA-256 digest and length of each file (``model.onnx``, ``card.json`` and, in
bundles made by ``insitu bundle create``, ``bom.json``), the payload's own length and
digest, the encryption parameters with the data key wrapped for each recipient, and the
publisher's public key. Each signature is the node's key's (Ed25519, or ECDSA P-256 over
SHA-256) over ``b"insitu-bundle/1\n" + canonical_bytes(signed)`` (the prefix separates
this signature domain from the ledger's, which uses the same key). The signature and the
publisher's public key record their algorithm as the ledger's do (``insitu._signer``: an
Ed25519 one bare, as in every older bundle; a P-256 one labelled ``ecdsa-p256-sha256:``),
and a verifier refuses a signature whose algorithm is not its trusted key's.

Two optional members (both absent from bundles made before them, which keep their
bytes): ``bom``, the CycloneDX 1.6 ML-BOM whose canonical bytes are ``bom.json``
(:mod:`insitu.bundle._bom`), and ``oms``, an OpenSSF model signature over the plain
files with the publisher's model-signing key (:mod:`insitu.bundle._oms`).

Why insitu's own signature rather than OpenSSF ``model-signing`` alone (an in-toto
statement over file digests): that statement covers a directory of plain files, and
insitu must also sign the encryption envelope (who may open the bundle) and ship one file
that a TUF target can name. ADR 0102 has the comparison. The header is small canonical
JSON, so any Ed25519 implementation can check it; the OMS signature inside it lets
``model_signing verify`` check an exported model (ADR 0105).

Parsing (:meth:`Bundle.parse`) checks the structure and the type of every field that
code reads; trusting a bundle is :mod:`insitu.bundle._verify`'s job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from insitu._canonical import canonical_bytes, is_canonical
from insitu._clock import utc_now
from insitu._signer import Signer, SigningPublicKey, public_key_raw, public_key_text
from insitu.bundle import _stream
from insitu.bundle._card import ModelCard
from insitu.errors import MalformedBundleError

__all__ = [
    "BOM_FILE",
    "BUNDLE_MAGIC",
    "ENCRYPTION_SCHEME",
    "SIGNATURE_DOMAIN",
    "SIGNATURE_HEX",
    "Bundle",
    "assemble",
    "context_of",
    "create_bundle",
    "publisher_key_id",
    "seal_payload",
]

logger = logging.getLogger(__name__)

BUNDLE_MAGIC = b"INSITUB\x01"
BOM_FILE = "bom.json"
ENCRYPTION_SCHEME = "aes-256-gcm-stream+x25519-hkdf-sha256"
SIGNATURE_DOMAIN = b"insitu-bundle/1\n"
_MAX_HEADER = 16 << 20
#: A signature's one encoding: bare Ed25519, or ``ecdsa-p256-sha256:`` and r||s, in hex.
SIGNATURE_HEX = re.compile(rf"^(?:{b'ecdsa-p256-sha256:'.hex()})?[0-9a-f]{{128}}$")


def publisher_key_id(public: SigningPublicKey) -> str:
    """The id of a publisher's key: first 16 bytes of SHA-256 of its bytes (the node id)."""
    return hashlib.sha256(public_key_raw(public)).hexdigest()[:32]


def context_of(signed: Mapping[str, Any]) -> bytes:
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
            # Absent from bundles made before P-256 recipients (they are X25519).
            for key in ("algorithm", "kdf"):
                if key in entry:
                    need(entry[key], str, f"recipient {key}")
    need(need(signed.get("publisher"), dict, "publisher").get("keyid"), str, "publisher.keyid")
    if "bom" in signed:
        need(signed["bom"], dict, "bom")
        entry = need(files.get(BOM_FILE), dict, f"files.{BOM_FILE}")
        need(entry.get("sha256"), str, f"files.{BOM_FILE}.sha256")
    if "oms" in signed:
        oms = need(signed["oms"], dict, "oms")
        need(oms.get("signature"), dict, "oms.signature")
        for key in ("format", "public_key", "keyid"):
            need(oms.get(key), str, f"oms.{key}")
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
    def bom(self) -> dict[str, Any] | None:
        """The CycloneDX ML-BOM (``None`` in older bundles; trust it only once verified)."""
        bom = self.signed.get("bom")
        return dict(bom) if bom is not None else None

    @property
    def oms(self) -> dict[str, Any] | None:
        """The OpenSSF model signature and its public key (``None`` in older bundles)."""
        oms = self.signed.get("oms")
        return dict(oms) if oms is not None else None

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
            "bom": BOM_FILE in self.signed["files"] and "bom" in self.signed,
            "oms_key": (self.oms or {}).get("keyid"),
        }


def seal_payload(signed: Mapping[str, Any], model: bytes | bytearray, data_key: bytes) -> bytearray:
    """Encrypt ``model`` as the header ``signed`` says (deterministic: used by deltas)."""
    enc = signed["payload"]["encryption"]
    return _stream.encrypt(
        data_key,
        bytes.fromhex(enc["nonce_prefix"]),
        model,
        context_of(signed),
        segment_size=int(enc["segment_size"]),
    )


def assemble(signed: dict[str, Any], signatures: list[dict[str, str]]) -> bytes:
    """Magic, header length and header bytes for ``signed`` and its signatures."""
    header = canonical_bytes({"signed": signed, "signatures": signatures})
    return BUNDLE_MAGIC + len(header).to_bytes(4, "big") + header


def create_bundle(
    model: bytes,
    card: ModelCard,
    signing_key: Signer,
    *,
    recipients: Iterable[_stream.RecipientKey] = (),
    segment_size: int = _stream.DEFAULT_SEGMENT_SIZE,
    created: str | None = None,
    bom: Mapping[str, Any] | None = None,
    oms_signer: Callable[[dict[str, bytes]], dict[str, Any]] | None = None,
) -> bytes:
    """Build a signed bundle of ``model`` and ``card``, encrypted for ``recipients``.

    Recipients are X25519, P-256 or RSA (2048 bits or more) public keys; each one's entry
    records its kind (``x25519``, ``p256-ecdh`` or ``rsa-oaep-sha256``) inside the signed
    header.

    With no recipients the payload is stored in the clear, which is logged as a warning:
    anyone who gets the file gets the model (and what it memorized of its training data).
    ``bom`` (a CycloneDX document) is carried as ``bom.json``; ``oms_signer`` is given
    the plain files (name -> bytes) and returns the header's ``oms`` member.
    """
    recipients = list(recipients)
    plain = {"model.onnx": bytes(model), "card.json": card.to_bytes()}
    if bom is not None:
        plain[BOM_FILE] = canonical_bytes(bom)
    signed: dict[str, Any] = {
        "_type": "insitu-bundle",
        "format": 1,
        "bundle_id": uuid.uuid4().hex,
        "name": card.name,
        "version": card.version,
        "created": created or utc_now(),
        "card": card.to_json(),
        "files": {
            name: {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in plain.items()
        },
        "publisher": {
            "keyid": publisher_key_id(signing_key.public_key()),
            "public": public_key_text(signing_key.public_key()),
        },
        "payload": {"encryption": None},
    }
    if bom is not None:
        signed["bom"] = dict(bom)
    if oms_signer is not None:
        signed["oms"] = oms_signer(plain)
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
                _stream.wrap_key(data_key, unique[k], context_of(signed)) for k in sorted(unique)
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
    signature = signing_key.sign(SIGNATURE_DOMAIN + canonical_bytes(signed))
    sig_entry = {"keyid": signed["publisher"]["keyid"], "sig": signature.hex()}
    return assemble(signed, [sig_entry]) + bytes(payload)
