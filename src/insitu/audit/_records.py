r"""The two signed records of the ledger: entries and tree heads, and their encodings.

An entry's hash covers every field but the hash and signature themselves, over the
canonical JSON encoding (``insitu._canonical``) with a domain-separation prefix::

    hash = SHA-256(b"insitu/ledger-entry/v1\\n" || canonical({v, seq, time, node,
                                                           type, payload, prev}))
    sig  = Sign(b"insitu/ledger-entry-sig/v1\\n" || hash)

A tree head signs the RFC 6962 root of the first ``size`` entries::

    sig  = Sign(b"insitu/tree-head/v1\\n" || canonical({v, log, size, root, time}))

``Sign`` is the node's key: Ed25519, or ECDSA P-256 over SHA-256. A signature records its
algorithm (``insitu._signer``: 64 bare bytes are Ed25519, as in every older ledger; a
P-256 one is labelled ``ecdsa-p256-sha256:``), and verification refuses one whose
algorithm is not the key's. Distinct prefixes mean a signature made for one kind of
record can never be replayed as the other. ``prev`` of the first entry is 32 zero bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature

from insitu._canonical import canonical_bytes
from insitu._clock import utc_now
from insitu._signer import Signer, SigningPublicKey, public_key_raw, verify_signature
from insitu._signer import signature_algorithm as _signature_algorithm
from insitu.errors import BadHeadSignatureError, MalformedLedgerError

__all__ = ["GENESIS_PREV", "Entry", "TreeHead", "entry_hash", "node_id_for"]

RECORD_VERSION = 1
GENESIS_PREV = bytes(32)
_ENTRY_PREFIX = b"insitu/ledger-entry/v1\n"
_ENTRY_SIG_PREFIX = b"insitu/ledger-entry-sig/v1\n"
_HEAD_PREFIX = b"insitu/tree-head/v1\n"


def node_id_for(public_key: SigningPublicKey) -> str:
    """A node's id (and its ledger's log id): SHA-256 of the public key, 32 hex digits.

    The key's bytes are Ed25519's 32 raw bytes (unchanged since the first ledgers) or
    P-256's 33-byte compressed point. Derived, never chosen, so an entry cannot claim a
    node without that node's key.
    """
    return hashlib.sha256(public_key_raw(public_key)).hexdigest()[:32]


def entry_hash(
    *, seq: int, time: str, node: str, event_type: str, payload_json: str, prev: bytes
) -> bytes:
    """Hash of an entry's content; ``payload_json`` is the canonical payload text."""
    # The payload is embedded as its canonical text so that hashing never re-parses it:
    # the stored text is the hashed text.
    body = canonical_bytes(
        {
            "v": RECORD_VERSION,
            "seq": seq,
            "time": time,
            "node": node,
            "type": event_type,
            "payload": payload_json,
            "prev": prev.hex(),
        }
    )
    return hashlib.sha256(_ENTRY_PREFIX + body).digest()


def entry_signing_message(digest: bytes) -> bytes:
    """The bytes an entry's signature is made over."""
    return _ENTRY_SIG_PREFIX + digest


@dataclass(frozen=True, slots=True)
class Entry:
    """One ledger entry, as stored."""

    seq: int
    time: str
    node: str
    type: str
    payload_json: str
    prev: bytes
    hash: bytes
    sig: bytes

    def computed_hash(self) -> bytes:
        """The hash this entry's content should have."""
        return entry_hash(
            seq=self.seq,
            time=self.time,
            node=self.node,
            event_type=self.type,
            payload_json=self.payload_json,
            prev=self.prev,
        )

    @property
    def payload(self) -> dict[str, Any]:
        """The payload as a dictionary."""
        value: dict[str, Any] = json.loads(self.payload_json)
        return value

    def to_json(self) -> dict[str, Any]:
        """The entry as a JSON object (binary fields in hex); the export line format."""
        return {
            "seq": self.seq,
            "time": self.time,
            "node": self.node,
            "type": self.type,
            "payload": self.payload_json,
            "prev": self.prev.hex(),
            "hash": self.hash.hex(),
            "sig": self.sig.hex(),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Entry:
        """Parse an export line's object; raises :class:`MalformedLedgerError`."""
        try:
            if not isinstance(obj, dict) or set(obj) != _ENTRY_FIELDS:
                raise TypeError("wrong fields")
            seq, payload = obj["seq"], obj["payload"]
            if type(seq) is not int or not isinstance(payload, str):
                raise TypeError("wrong field types")
            return cls(
                seq=seq,
                time=str(obj["time"]),
                node=str(obj["node"]),
                type=str(obj["type"]),
                payload_json=payload,
                prev=_unhex(obj["prev"], 32),
                hash=_unhex(obj["hash"], 32),
                sig=_unsig(obj["sig"]),
            )
        except (TypeError, ValueError, KeyError) as exc:
            seq_hint = obj.get("seq") if isinstance(obj, dict) else None
            raise MalformedLedgerError(
                f"not a ledger entry ({exc}); the export was altered or is not an insitu export",
                seq=seq_hint if isinstance(seq_hint, int) else None,
            ) from exc


_ENTRY_FIELDS = {"seq", "time", "node", "type", "payload", "prev", "hash", "sig"}
_HEAD_FIELDS = {"log", "size", "root", "time", "sig"}


def _unhex(value: Any, length: int) -> bytes:
    if not isinstance(value, str) or value != value.lower():
        raise ValueError("binary fields are lower-case hex")
    raw = bytes.fromhex(value)
    if len(raw) != length:
        raise ValueError(f"expected {length} bytes, got {len(raw)}")
    return raw


def _unsig(value: Any) -> bytes:
    """A recorded signature from its hex (an Ed25519 or a labelled P-256 one)."""
    if not isinstance(value, str) or value != value.lower():
        raise ValueError("binary fields are lower-case hex")
    raw = bytes.fromhex(value)
    _signature_algorithm(raw)
    return raw


@dataclass(frozen=True, slots=True)
class TreeHead:
    """A signed statement: "the log ``log`` had ``size`` entries with this ``root``"."""

    log: str
    size: int
    root: bytes
    time: str
    sig: bytes

    def signing_message(self) -> bytes:
        """The bytes the head's signature is made over."""
        body = {
            "v": RECORD_VERSION,
            "log": self.log,
            "size": self.size,
            "root": self.root.hex(),
            "time": self.time,
        }
        return _HEAD_PREFIX + canonical_bytes(body)

    @classmethod
    def sign(cls, key: Signer, *, log: str, size: int, root: bytes) -> TreeHead:
        """Make and sign a head at the current time."""
        unsigned = cls(log=log, size=size, root=root, time=utc_now(), sig=b"")
        return cls(
            log=log,
            size=size,
            root=root,
            time=unsigned.time,
            sig=key.sign(unsigned.signing_message()),
        )

    def verify_signature(self, public_key: SigningPublicKey) -> None:
        """Raise :class:`BadHeadSignatureError` unless ``public_key`` signed this head."""
        try:
            verify_signature(public_key, self.sig, self.signing_message())
        except InvalidSignature as exc:
            why = f" ({exc})" if str(exc) else ""
            raise BadHeadSignatureError(
                f"the tree head at size {self.size} is not signed by this node's key{why}: "
                "it was forged or altered; do not trust this copy of the ledger"
            ) from None

    def to_json(self) -> dict[str, Any]:
        """The head as a JSON object; the format of ``insitu audit head``."""
        return {
            "log": self.log,
            "size": self.size,
            "root": self.root.hex(),
            "time": self.time,
            "sig": self.sig.hex(),
        }

    @classmethod
    def from_json(cls, obj: Any) -> TreeHead:
        """Parse a head; raises :class:`MalformedLedgerError`."""
        try:
            if not isinstance(obj, dict) or set(obj) != _HEAD_FIELDS:
                raise TypeError("wrong fields")
            if type(obj["size"]) is not int or obj["size"] < 0:
                raise TypeError("size is not a count")
            return cls(
                log=str(obj["log"]),
                size=obj["size"],
                root=_unhex(obj["root"], 32),
                time=str(obj["time"]),
                sig=_unsig(obj["sig"]),
            )
        except (TypeError, ValueError, KeyError) as exc:
            raise MalformedLedgerError(
                f"not a signed tree head ({exc}); pass a file written by 'insitu audit head'"
            ) from exc


def verify_entry_signature(public_key: SigningPublicKey, digest: bytes, sig: bytes) -> bool:
    """Whether ``sig`` is this key's signature of the entry hash ``digest``.

    A signature that records another algorithm than the key's is not (``_signer``).
    """
    try:
        verify_signature(public_key, sig, entry_signing_message(digest))
    except InvalidSignature:
        return False
    return True


def entry_signature_problem(public_key: SigningPublicKey, sig: bytes) -> str:
    """Why an entry signature that did not verify failed, in a few words."""
    try:
        verify_signature(public_key, sig, b"")
    except InvalidSignature as exc:
        return str(exc) or "it does not verify with the node's key"
    return "it does not verify with the node's key"
