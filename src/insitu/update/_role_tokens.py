"""TUF role keys in a PKCS#11 token: ECDSA P-256 keys made there, signing there.

``insitu repo init REPO --key-uri 'pkcs11:token=NAME;object=LABEL'`` generates one
ECDSA P-256 key pair per role in the token (labels ``LABEL-root``, ``LABEL-targets``,
``LABEL-assignments``, ``LABEL-snapshot``, ``LABEL-timestamp``; a rotation adds
``LABEL-<role>-<n>``), private halves sensitive and not extractable. The repository keeps
only where each key lives and its public half, one small JSON file per key::

    <repo>/keys/<role>-<n>.pkcs11   {"uri": "pkcs11:token=..;object=..", "module": PATH,
                                     "keyid": ..., "public_key": <securesystemslib key>}

TUF metadata is signed by :class:`TokenRoleSigner`, a ``securesystemslib`` ``Signer``
whose signature is the token's ``CKM_ECDSA`` over the SHA-256 of the canonical metadata,
DER-encoded as ``ecdsa-sha2-nistp256`` wants: python-tuf clients (``insitu update``)
verify it as any other ECDSA key. Why not securesystemslib's own ``HSMSigner``: it is
written on python-pkcs11 (not installed here; insitu's tokens run on PyKCS11, as
model_signing's signer does), finds keys by ``CKA_ID`` rather than by the label an RFC
7512 URI names, and opens and logs in a session per signature. This signer reuses
``insitu.workspace``'s token session, URI parsing, PIN handling and error lines.

A signer opens its key on first use (:meth:`TokenRoleSigner.unlock`, or eagerly from
:func:`~insitu.update.open_directory_repository`), and refuses a key whose public half
is not the one recorded (and listed by root): a token of the same name holding another
key of the same label is another machine's, not this repository's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from securesystemslib.signer import Key, SecretsHandler, Signature, Signer, SSlibKey

from insitu._atomic import atomic_write_bytes
from insitu._signer import P256, signature_algorithm
from insitu.errors import RepositoryError, TokenError
from insitu.workspace import TokenKey, TokenKeyUri, generate_token_key, open_token_key

__all__ = [
    "SCHEME",
    "TOKEN_SUFFIX",
    "TokenRoleSigner",
    "base_uri_of",
    "generate_role_key",
    "load_role_signer",
]

logger = logging.getLogger(__name__)

#: The TUF signature scheme of a role key in a token.
SCHEME = "ecdsa-sha2-nistp256"
#: How the file recording a role key in a token ends (``keys/timestamp-1.pkcs11``).
TOKEN_SUFFIX = ".pkcs11"  # noqa: S105 - a file name, not a secret


def role_label(base: str, role: str, index: int) -> str:
    """The token label of ``role``'s ``index``-th key (``LABEL-root``, ``LABEL-root-2``)."""
    return f"{base}-{role}" if index == 1 else f"{base}-{role}-{index}"


class TokenRoleSigner(Signer):
    """A ``securesystemslib`` signer over an ECDSA P-256 key in a PKCS#11 token."""

    def __init__(
        self, uri: TokenKeyUri, public_key: SSlibKey, pin: str | None, key: TokenKey | None = None
    ) -> None:
        self.uri = uri
        self._public_key = public_key
        self._pin = pin
        self._key = key

    @property
    def public_key(self) -> Key:
        """The role's public key as root (or targets) lists it."""
        return self._public_key

    @classmethod
    def from_priv_key_uri(
        cls,
        priv_key_uri: str,
        public_key: Key,
        secrets_handler: SecretsHandler | None = None,
    ) -> TokenRoleSigner:
        """A signer for ``pkcs11:token=..;object=..?module-path=..`` (the PIN from the handler)."""
        if not isinstance(public_key, SSlibKey):
            raise TypeError(f"expected an SSlibKey for {priv_key_uri}")
        pin = secrets_handler("pin") if secrets_handler is not None else None
        return cls(TokenKeyUri.parse(priv_key_uri), public_key, pin)

    def unlock(self) -> TokenKey:
        """Open the key in its token (once) and check it is the recorded one.

        Raises:
            TokenKeyNotFoundError: no such token or key (another machine's token store).
            WrongPinError: the token refused the PIN.
            TokenModuleError: the module is missing or not a PKCS#11 library.
            TokenError: no PIN, or the token's key is not the one root lists.

        """
        if self._key is None:
            key = open_token_key(self.uri, self._pin)
            public = key.public_key()
            found = (
                SSlibKey.from_crypto(public, scheme=SCHEME).keyid
                if isinstance(public, ec.EllipticCurvePublicKey)
                else None
            )
            if found != self._public_key.keyid:
                raise TokenError(
                    f"token {self.uri.token!r}: the key labelled {self.uri.object!r} is not "
                    "the one this repository's metadata lists; use the token the repository "
                    "was made with"
                )
            self._key = key
        return self._key

    def sign(self, payload: bytes) -> Signature:
        """The token's ECDSA P-256 signature of ``payload`` (SHA-256), DER in hex."""
        algorithm, r_s = signature_algorithm(self.unlock().sign(payload))
        if algorithm != P256:  # pragma: no cover - unlock checked the key
            raise TokenError(f"token key {self.uri} signed with {algorithm}, not P-256")
        der = encode_dss_signature(int.from_bytes(r_s[:32], "big"), int.from_bytes(r_s[32:], "big"))
        return Signature(self._public_key.keyid, der.hex())


def generate_role_key(
    keys_dir: Path, role: str, index: int, base: TokenKeyUri, pin: str | None
) -> TokenRoleSigner:
    """Generate ``role``'s ``index``-th P-256 key in ``base``'s token; record it in ``keys_dir``.

    The record (``<role>-<index>.pkcs11``) is written only after the key exists. On a
    failure to write it, the new key is deleted from the token again.
    """
    uri = TokenKeyUri(base.token, role_label(base.object, role, index), base.module)
    key = generate_token_key(uri, pin, algorithm="p256")
    try:
        public = key.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        sslib = SSlibKey.from_crypto(public, scheme=SCHEME)
        record = {
            "uri": str(uri),
            "module": uri.module,
            "keyid": sslib.keyid,
            "base": base.object,
            "public_key": sslib.to_dict(),
        }
        atomic_write_bytes(
            keys_dir / f"{role}-{index}{TOKEN_SUFFIX}",
            (json.dumps(record, indent=2, sort_keys=True) + "\n").encode(),
        )
    except BaseException:
        key.destroy()
        raise
    logger.info("generated the %s key %s in its token", role, uri)
    return TokenRoleSigner(uri, sslib, pin, key)


def load_role_signer(path: Path, pin: str | None) -> TokenRoleSigner:
    """The signer a ``.pkcs11`` record names (the key is opened on first use).

    Raises:
        RepositoryError: the record is not one ``generate_role_key`` wrote.

    """
    try:
        record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        uri = TokenKeyUri.parse(record["uri"], module=record.get("module"))
        public = SSlibKey.from_dict(record["keyid"], dict(record["public_key"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RepositoryError(
            f"{path} does not record a role key in a token ({exc}); restore it from a backup"
        ) from exc
    return TokenRoleSigner(uri, public, pin)


def base_uri_of(path: Path) -> TokenKeyUri:
    """The ``--key-uri`` a ``.pkcs11`` record's key was made under (for a rotation)."""
    try:
        record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        uri = TokenKeyUri.parse(record["uri"], module=record.get("module"))
        return TokenKeyUri(uri.token, str(record["base"]), uri.module)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RepositoryError(
            f"{path} does not record a role key in a token ({exc}); restore it from a backup"
        ) from exc
