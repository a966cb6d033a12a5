"""Node keys on disk: Ed25519 signing, X25519 for receiving bundles, and site secrets.

A publisher also holds an ECDSA P-256 key (kind ``ecdsa-p256``) that signs the OpenSSF
model signature of its bundles: ``model_signing``'s key signer accepts only NIST curves
(ADR 0105). Its file holds the private scalar (32 bytes) and, as ``public``, the
compressed point.

The site secrets are 256-bit symmetric keys that never leave the site: ``pseudonym``
(HMAC key of pseudonymization: the same person maps to the same token at this site and
to an unrelated token anywhere else) and ``data`` (AES-256-GCM key of local caches).
They use the same file format with kind ``secret`` and, as ``public``, a key id (a hash
that reveals nothing of the key). In a workspace whose decryption key is in a token they
are sealed to that key instead (protection ``token-...``: ``insitu.workspace._wrapped``),
so that a copy of the disk without the token opens neither.

Private key file format ``insitu-key/1`` (JSON, mode 0600)::

    {"format": "insitu-key/1", "kind": "ed25519" | "x25519" | "ecdsa-p256" | "secret",
     "public": "<hex>",
     "protection": "none" | "scrypt+aes-256-gcm" | "token-..." (secrets only),
     "kdf": {"n": 32768, "r": 8, "p": 1, "salt": "<hex>"},   # when protected
     "recipient": "<hex>", "encapsulation": "<hex>",          # when sealed to a token
     "nonce": "<hex>", "secret": "<hex>"}

Why not PKCS#8 PEM: ``cryptography`` encrypts PKCS#8 with PBKDF2 (OpenSSL's default
iteration count), and a stolen edge device should cost an attacker a memory-hard KDF per
guess. scrypt (RFC 7914, n=2^15, r=8, p=1: 32 MiB and about 0.1 s here) derives an
AES-256-GCM key; the associated data binds the kind and public key, so a ciphertext
moved into another key file, or a public key swapped beside it, fails to open. The
public halves are also written as standard PEM (``*.pub.pem``) for other tools.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from insitu._atomic import atomic_create_bytes, atomic_write_bytes
from insitu._canonical import canonical_bytes
from insitu._sealed import secret_key_id
from insitu.errors import KeyFileError, PassphraseRequiredError, WrongPassphraseError
from insitu.workspace._wrapped import TokenSeal, is_token_sealed

__all__ = [
    "KEY_FORMAT",
    "PASSPHRASE_ENV",
    "KeyKind",
    "create_private_key",
    "create_secret",
    "load_private_key",
    "load_secret",
    "passphrase_from_env",
    "reseal_secret",
    "save_private_key",
    "save_public_key",
]

logger = logging.getLogger(__name__)

KEY_FORMAT = "insitu-key/1"
PASSPHRASE_ENV = "INSITU_PASSPHRASE"  # noqa: S105 -- a variable name, not a secret
PROTECTED = "scrypt+aes-256-gcm"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1

KeyKind = Literal["ed25519", "x25519", "ecdsa-p256", "secret"]
PrivateKey = Ed25519PrivateKey | X25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = Ed25519PublicKey | X25519PublicKey | ec.EllipticCurvePublicKey


def passphrase_from_env() -> str | None:
    """The passphrase in ``INSITU_PASSPHRASE``, or ``None`` when unset or empty."""
    return os.environ.get(PASSPHRASE_ENV) or None


def _kind_of(key: PrivateKey) -> KeyKind:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise TypeError(f"only P-256 elliptic-curve keys are kept, not {key.curve.name}")
        return "ecdsa-p256"
    return "ed25519" if isinstance(key, Ed25519PrivateKey) else "x25519"


def _public_raw(key: PrivateKey) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _secret_of(key: PrivateKey) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.private_numbers().private_value.to_bytes(32, "big")
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _derive(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


def _aad(kind: KeyKind, public_hex: str) -> bytes:
    return canonical_bytes({"format": KEY_FORMAT, "kind": kind, "public": public_hex})


def _envelope(
    kind: KeyKind,
    public: bytes,
    secret: bytes,
    passphrase: str | None,
    seal: TokenSeal | None = None,
) -> bytes:
    doc: dict[str, Any] = {"format": KEY_FORMAT, "kind": kind, "public": public.hex()}
    if seal is not None:
        doc |= seal.seal(secret, _aad(kind, public.hex()))
    elif passphrase:
        salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
        aead_key = _derive(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        aad = _aad(kind, public.hex())
        doc |= {
            "protection": PROTECTED,
            "kdf": {"n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": salt.hex()},
            "nonce": nonce.hex(),
            "secret": AESGCM(aead_key).encrypt(nonce, secret, aad).hex(),
        }
    else:
        doc |= {"protection": "none", "secret": secret.hex()}
    return json.dumps(doc, indent=2).encode() + b"\n"


def save_private_key(path: Path, key: PrivateKey, passphrase: str | None) -> None:
    """Write ``key`` to ``path`` (mode 0600), encrypted when a passphrase is given."""
    data = _envelope(_kind_of(key), _public_raw(key), _secret_of(key), passphrase)
    atomic_write_bytes(path, data, mode=0o600)


def create_private_key(path: Path, key: PrivateKey, passphrase: str | None) -> bool:
    """Write ``key`` to ``path`` unless a key file is there; True if this call wrote it.

    Never overwrites (as :func:`create_secret`): of two processes creating the same key,
    the loser keeps the winner's.
    """
    data = _envelope(_kind_of(key), _public_raw(key), _secret_of(key), passphrase)
    return atomic_create_bytes(path, data, mode=0o600)


def create_secret(path: Path, passphrase: str | None, seal: TokenSeal | None = None) -> bool:
    """Create a random 256-bit key file at ``path`` unless one exists; True if created.

    With ``seal`` the secret is sealed to the workspace's decryption key in a token
    (``passphrase`` is then not used). Never overwrites: the file is linked into place,
    which fails if another process created it first (the loser keeps the winner's key).
    """
    secret = secrets.token_bytes(32)
    data = _envelope("secret", secret_key_id(secret), secret, passphrase, seal)
    return atomic_create_bytes(path, data, mode=0o600)


def reseal_secret(path: Path, secret: bytes, seal: TokenSeal) -> None:
    """Replace the key file at ``path`` by ``secret`` sealed with ``seal`` (atomically)."""
    data = _envelope("secret", secret_key_id(secret), secret, None, seal)
    atomic_write_bytes(path, data, mode=0o600)


def load_secret(path: Path, passphrase: str | None, seal: TokenSeal | None = None) -> bytes:
    """Load a symmetric key written by :func:`create_secret` (same errors as private keys).

    A file sealed to a token key needs ``seal`` (the workspace's token decryption key);
    files with no protection or a passphrase open as before, whether ``seal`` is given
    or not.

    Raises:
        KeyFileError: also when the file is sealed to a token and ``seal`` is ``None``,
            or to another token key than ``seal``'s.
        TokenKeyNotFoundError: the token holds no such key (another machine's token).

    """
    doc = _read_doc(path, "secret")
    if is_token_sealed(doc.get("protection")):
        secret, public = _unseal(path, doc, seal)
    else:
        secret, public = _open_doc(path, doc, "secret", passphrase)
    if secret_key_id(secret) != public:
        raise KeyFileError(f"key file {path} holds a key that does not match its id")
    return secret


def save_public_key(path: Path, key: PublicKey) -> None:
    """Write a public key as PEM (SubjectPublicKeyInfo)."""
    atomic_write_bytes(path, key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))


def _read_doc(path: Path, kind: KeyKind) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeyFileError(
            f"key file {path} is missing; restore it from your backup (keys are never "
            "regenerated over an existing workspace)"
        ) from None
    except (OSError, ValueError) as exc:
        raise KeyFileError(
            f"key file {path} is unreadable ({exc}); restore it from your backup"
        ) from exc
    if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT or doc.get("kind") != kind:
        raise KeyFileError(f"{path} is not an insitu {kind} key file; restore it from your backup")
    if path.stat().st_mode & 0o077:
        logger.warning("key file %s is readable by other users; run: chmod 600 %s", path, path)
    return doc


def _unseal(path: Path, doc: dict[str, Any], seal: TokenSeal | None) -> tuple[bytes, bytes]:
    """Open a secret sealed to a token key; returns (secret, public)."""
    if seal is None:
        raise KeyFileError(
            f"{path} is sealed to a token key and this workspace names none "
            "(keys.decryption in config.toml); open the workspace with the token it was "
            "made with"
        )
    try:
        public = bytes.fromhex(doc["public"])
        return seal.open(doc, _aad("secret", doc["public"]), path), public
    except (KeyError, TypeError, ValueError) as exc:
        raise KeyFileError(
            f"key file {path} is corrupt ({exc}); restore it from your backup"
        ) from exc


def _open(path: Path, kind: KeyKind, passphrase: str | None) -> tuple[bytes, bytes]:
    """Read and decrypt a key file; returns (secret, public)."""
    return _open_doc(path, _read_doc(path, kind), kind, passphrase)


def _open_doc(
    path: Path, doc: dict[str, Any], kind: KeyKind, passphrase: str | None
) -> tuple[bytes, bytes]:
    """Decrypt the key file ``doc`` read from ``path``; returns (secret, public)."""
    try:
        public = bytes.fromhex(doc["public"])
        if doc["protection"] == "none":
            return bytes.fromhex(doc["secret"]), public
        if doc["protection"] != PROTECTED:
            raise KeyFileError(f"{path} uses unknown protection {doc['protection']!r}")
        if not passphrase:
            raise PassphraseRequiredError(
                f"the keys in {path.parent} are encrypted; set {PASSPHRASE_ENV} to "
                "the workspace passphrase"
            )
        kdf = doc["kdf"]
        aead_key = _derive(passphrase, bytes.fromhex(kdf["salt"]), kdf["n"], kdf["r"], kdf["p"])
        aad = _aad(kind, doc["public"])
        try:
            secret = AESGCM(aead_key).decrypt(
                bytes.fromhex(doc["nonce"]), bytes.fromhex(doc["secret"]), aad
            )
        except InvalidTag:
            raise WrongPassphraseError(
                f"{PASSPHRASE_ENV} does not open the keys in {path.parent}: "
                "check the passphrase (nothing was changed)"
            ) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise KeyFileError(
            f"key file {path} is corrupt ({exc}); restore it from your backup"
        ) from exc
    return secret, public


def load_private_key(path: Path, kind: KeyKind, passphrase: str | None) -> PrivateKey:
    """Load a private key written by :func:`save_private_key`.

    Raises:
        KeyFileError: missing, corrupt, or not a key of ``kind``.
        PassphraseRequiredError: the key is encrypted and ``passphrase`` is ``None``.
        WrongPassphraseError: the passphrase does not decrypt it.

    """
    secret, public = _open(path, kind, passphrase)
    try:
        key: PrivateKey
        if kind == "ecdsa-p256":
            key = ec.derive_private_key(int.from_bytes(secret, "big"), ec.SECP256R1())
        elif kind == "ed25519":
            key = Ed25519PrivateKey.from_private_bytes(secret)
        else:
            key = X25519PrivateKey.from_private_bytes(secret)
    except ValueError as exc:
        raise KeyFileError(
            f"key file {path} is corrupt ({exc}); restore it from your backup"
        ) from exc
    if _public_raw(key) != public:
        raise KeyFileError(
            f"key file {path} holds a private key that does not match its public key"
        )
    return key
