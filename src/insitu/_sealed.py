r"""Sealed files: local caches and intermediate files encrypted with the site's data key.

Format ``insitu-sealed/1``::

    b"insitu-sealed/1\n" | u16 header length | header (canonical JSON) | nonce (12) | ciphertext

The header names the file's ``context`` (what it is, e.g. ``prepared-data``) and the
``key_id`` of the site key; both are bound as associated data of AES-256-GCM, so a
sealed file renamed into another role, or opened with another site's key, is refused
with an error that says which. Writes go through ``_atomic``: the temporary file holds
ciphertext only, so an interrupted run can leave a partial *ciphertext*, never
plaintext; :func:`purge_stale_temporaries` removes such leftovers.

One-shot AES-GCM in ``cryptography`` takes at most 2**31 - 1 bytes; sealed caches are
tabular data sets far below that, and larger inputs are refused with a clear error
(model bundles, which can be larger, use the segmented format of ``insitu.bundle``).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from insitu._atomic import atomic_write_bytes
from insitu._canonical import canonical_bytes
from insitu.errors import DataError, SealedFileError

__all__ = [
    "MAX_SEALED_BYTES",
    "purge_stale_temporaries",
    "read_sealed",
    "secret_key_id",
    "write_sealed",
]

MAGIC = b"insitu-sealed/1\n"
MAX_SEALED_BYTES = 2**31 - 1 - 16


def secret_key_id(secret: bytes) -> bytes:
    """The public identifier of a symmetric key: a hash that reveals nothing of it."""
    return hashlib.sha256(b"insitu/secret-key-id/v1\n" + secret).digest()[:16]


def write_sealed(path: Path, plaintext: bytes, key: bytes, *, context: str) -> None:
    """Encrypt ``plaintext`` with the site ``key`` and write it atomically (mode 0600)."""
    if len(plaintext) > MAX_SEALED_BYTES:
        raise DataError(
            f"{path.name}: {len(plaintext)} bytes is more than a sealed cache holds "
            f"({MAX_SEALED_BYTES}); split the data set"
        )
    header = canonical_bytes({"context": context, "key_id": secret_key_id(key).hex()})
    nonce = secrets.token_bytes(12)
    aad = MAGIC + header
    sealed = AESGCM(key).encrypt(nonce, plaintext, aad)
    atomic_write_bytes(
        path, MAGIC + struct.pack(">H", len(header)) + header + nonce + sealed, mode=0o600
    )


def read_sealed(path: Path, key: bytes, *, context: str) -> bytes:
    """Decrypt a sealed file, checking that it is a ``context`` file sealed with ``key``.

    Raises:
        SealedFileError: not a sealed file, another role, another site's key, or altered.

    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SealedFileError(f"cannot read {path}: {exc.strerror}") from exc
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 2:
        raise SealedFileError(f"{path} is not an insitu sealed file")
    (length,) = struct.unpack(">H", data[len(MAGIC) : len(MAGIC) + 2])
    start = len(MAGIC) + 2
    header_bytes = data[start : start + length]
    try:
        header = json.loads(header_bytes)
        found_context, found_key = str(header["context"]), str(header["key_id"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SealedFileError(f"{path} has a damaged header: it was altered") from exc
    if found_context != context:
        raise SealedFileError(f"{path} holds {found_context!r}, not {context!r}")
    if found_key != secret_key_id(key).hex():
        raise SealedFileError(
            f"{path} was sealed with another site key (key id {found_key[:12]}...): "
            "open it from the workspace that wrote it"
        )
    nonce = data[start + length : start + length + 12]
    try:
        return AESGCM(key).decrypt(nonce, data[start + length + 12 :], MAGIC + header_bytes)
    except InvalidTag:
        raise SealedFileError(f"{path} was altered or truncated: it does not decrypt") from None


def purge_stale_temporaries(directory: Path) -> int:
    """Remove temporary files an interrupted atomic write left in ``directory``."""
    removed = 0
    for leftover in directory.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed
