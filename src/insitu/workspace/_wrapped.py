"""Site secrets sealed to the workspace's decryption key in a token (issue 19).

A workspace made with ``insitu init --key-uri`` keeps its signing and decryption keys
in a PKCS#11 token, but its two site secrets, ``keys/pseudonym.key`` (the HMAC key of
pseudonymization) and ``keys/data.key`` (the AES-256-GCM key of the sealed local
caches), would still be 256-bit keys in files: a copy of the disk (with the passphrase,
for scrypt-sealed files) could link the site's pseudonyms and open its caches. Here
they are *sealed to* the token's decryption key instead, so that a copy of the
workspace without the token opens neither.

Why not keep them *in* the token: they key an HMAC or an AES-GCM operation per record,
over data sets of many records; a PKCS#11 call per record would be far too slow (and a
TPM has no HMAC over a key it will not show). So they are unsealed once per process
(one token operation per secret per :class:`~insitu.workspace.Workspace` object) and
used in memory, as the data key of a bundle is.

Two constructions, chosen by the token key (a file's ``protection``):

``token-p256-ecdh+hkdf-sha256+aes-256-gcm`` (SoftHSM2, any token with ECDH)
    An ephemeral P-256 key pair is made in software; its ECDH with the token key's
    public key gives a shared secret (sealing needs no token). Opening asks the token
    for the ECDH of its private key with the ephemeral public key
    (:meth:`TokenDecryptionKey.exchange`).

``token-rsa-oaep-sha256+hkdf-sha256+aes-256-gcm`` (a TPM through tpm2-pkcs11: no ECDH)
    A random 32-byte secret is encrypted with RSA-OAEP (SHA-256, MGF1-SHA-256) to the
    token's RSA public key; opening decrypts it in the token. The OAEP label is empty:
    tpm2-pkcs11 on a TPM refuses labels (see ``insitu.bundle``'s ``rsa-oaep-sha256``),
    so the binding is carried by HKDF and AES-GCM below, not by the label.

Both then derive the wrapping key with HKDF-SHA256, whose info names the construction,
the file's format, kind and key id, the token key's public key (SubjectPublicKeyInfo)
and the encapsulation (the ephemeral public key, or the OAEP ciphertext); AES-256-GCM
seals the secret with the format, kind and key id as associated data, as the scrypt
envelope of ``_keys`` does. A file moved beside another key id, sealed to another token
key, or changed in any byte fails to open, with one line naming the fix.

What leaves the token: the ECDH shared secret of the file's own ephemeral key, or the
OAEP plaintext of the file's own encapsulation, i.e. exactly the material of one sealed
file, which opens nothing else; the private key stays there. The secrets themselves are
in the process's memory while it runs (as they must be to be used).

Whoever can write the key file can make opening fail (a changed field is refused with one
line), and on a TPM could hand it an undecodable OAEP ciphertext of the right length,
which puts libtpms 0.9.2 (swtpm) in failure mode until restarted: a denial of service by
someone who could delete the file anyway, never a disclosure.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from insitu._canonical import canonical_bytes
from insitu.errors import KeyFileError
from insitu.workspace._pkcs11 import TokenDecryptionKey, TokenRsaDecryptionKey

__all__ = ["SEALED_P256", "SEALED_RSA", "TokenSeal", "is_token_sealed"]

SEALED_P256 = "token-p256-ecdh+hkdf-sha256+aes-256-gcm"
SEALED_RSA = "token-rsa-oaep-sha256+hkdf-sha256+aes-256-gcm"
_INFO = "insitu sealed site secret/1"
# The empty label is fixed, not chosen per file: a TPM refuses OAEP labels.
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)

TokenSecretKey = TokenDecryptionKey | TokenRsaDecryptionKey


def is_token_sealed(protection: object) -> bool:
    """Whether a key file's ``protection`` is one of this module's (sealed to a token)."""
    return protection in (SEALED_P256, SEALED_RSA)


def _spki(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _wrapping_key(
    protection: str, shared: bytes, aad: bytes, recipient: bytes, encapsulation: bytes
) -> bytes:
    info = canonical_bytes(
        {
            "construction": f"{_INFO} {protection}",
            "context": aad.decode("utf-8"),
            "recipient": recipient.hex(),
            "encapsulation": encapsulation.hex(),
        }
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


class TokenSeal:
    """Seals site secrets to a decryption key in a token, and opens them there.

    ``key`` returns the token key; it is called when a file is sealed or opened, so a
    workspace whose secret files are not sealed never logs into the token for them.
    """

    def __init__(self, key: Callable[[], TokenSecretKey]) -> None:
        self._key = key

    def seal(self, secret: bytes, aad: bytes) -> dict[str, str]:
        """The fields of a key file that hold ``secret`` sealed to the token key.

        Runs in software (public key operations only): sealing needs no PIN.
        """
        key = self._key()
        public = key.public_key()
        protection: str
        if isinstance(public, ec.EllipticCurvePublicKey):
            protection = SEALED_P256
            ephemeral = ec.generate_private_key(ec.SECP256R1())
            shared = ephemeral.exchange(ec.ECDH(), public)
            encapsulation = ephemeral.public_key().public_bytes(
                Encoding.X962, PublicFormat.CompressedPoint
            )
        else:
            protection = SEALED_RSA
            shared = secrets.token_bytes(32)
            encapsulation = public.encrypt(shared, _OAEP)
        recipient = _spki(public)
        nonce = secrets.token_bytes(12)
        wrapping = _wrapping_key(protection, shared, aad, recipient, encapsulation)
        return {
            "protection": protection,
            "recipient": hashlib.sha256(recipient).hexdigest(),
            "encapsulation": encapsulation.hex(),
            "nonce": nonce.hex(),
            "secret": AESGCM(wrapping).encrypt(nonce, secret, aad).hex(),
        }

    def open(self, doc: dict[str, Any], aad: bytes, path: Path) -> bytes:
        """The secret of the key file ``doc`` (read from ``path``), unsealed in the token.

        Raises:
            KeyFileError: the file is sealed to another token key, or does not open
                (changed, or moved beside another key id).
            TokenKeyNotFoundError: the token holds no such key (another machine's token).
            KeyError, TypeError, ValueError: a field is missing or malformed (the caller
                says the file is corrupt).

        """
        key = self._key()
        public = key.public_key()
        recipient = _spki(public)
        if doc["recipient"] != hashlib.sha256(recipient).hexdigest():
            raise KeyFileError(
                f"{path} is sealed to another token key than this workspace's decryption "
                f"key ({key.uri}); use the token it was sealed to, or restore the workspace "
                "from its backup (nothing was changed)"
            )
        protection = str(doc["protection"])
        encapsulation = bytes.fromhex(doc["encapsulation"])
        if protection == SEALED_P256 and isinstance(key, TokenDecryptionKey):
            peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), encapsulation)
            shared = key.exchange(peer)
        elif protection == SEALED_RSA and isinstance(key, TokenRsaDecryptionKey):
            shared = key.decrypt(encapsulation, _OAEP)
        else:
            raise KeyFileError(
                f"{path} is sealed with {protection}, which the token key {key.uri} "
                f"({key.algorithm}) does not open; restore the workspace from its backup"
            )
        wrapping = _wrapping_key(protection, shared, aad, recipient, encapsulation)
        try:
            return AESGCM(wrapping).decrypt(
                bytes.fromhex(doc["nonce"]), bytes.fromhex(doc["secret"]), aad
            )
        except InvalidTag:
            raise KeyFileError(
                f"{path} does not open with the token key {key.uri}: the file was changed; "
                "restore it from your backup (nothing was changed)"
            ) from None
