"""OpenSSF model signatures (OMS) of a bundle's plain files, made with ``model_signing``.

Every bundle a publisher creates also carries an OMS signature: a Sigstore bundle
(``application/vnd.dev.sigstore.bundle.v0.3+json``) holding a DSSE envelope over an
in-toto statement that lists the SHA-256 of each plain file the bundle carries
(``model.onnx``, ``card.json``, ``bom.json``), signed with the publisher's ECDSA P-256
model-signing key (ADR 0105). The signature and the public key's PEM sit in the signed
header (``oms``), so insitu's own Ed25519 signature covers them too.

It is for tools outside insitu: ``insitu bundle export`` verifies a bundle with insitu's
own verification, decrypts it, and writes a directory that the package's own command
accepts::

    model_signing verify key --signature DIR/model.sig --public_key DIR/oms.pub.pem DIR

insitu's verification stays the gate on devices; a device never imports this module's
``model_signing`` (the ``sign`` extra is not part of ``insitu[device]``).

``model_signing``'s stable API signs a directory with a key file, so :func:`sign_files`
writes the files into a private temporary directory (0700) with the key as an encrypted
PKCS#8 PEM under a one-time password held in memory, and removes it afterwards. The
signed statement records ``model.sig`` and ``oms.pub.pem`` as ignored paths: they sit in
the exported directory beside the model but are not part of it.

A publisher whose signing key is an ECDSA P-256 key in a PKCS#11 token (``insitu init
--key-uri ... --key-algorithm p256``, or a TPM) signs with that key instead
(:func:`sign_files_in_token`, ADR 0021): ``model_signing``'s own PKCS#11 signer
(``Config.use_pkcs11_signer``, on PyKCS11 and asn1crypto, which the ``hsm`` and ``sign``
extras bring) signs the statement in the token, and no model-signing key file is made.
It is handed a URI without a PIN: it opens a session of its own on the token this
process is already logged in to (a login belongs to the process, and a second
``C_Login`` would be refused), and it loads the same module path, so PyKCS11 shares the
one loaded library instead of finalizing it under the node's own key. An Ed25519 token
key cannot sign an OMS signature (``model_signing`` takes EC keys only): such a node
keeps the file key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
    PublicFormat,
)

from insitu._signer import P256
from insitu.bundle._bom import sign_extra_missing
from insitu.errors import TokenError

__all__ = [
    "OMS_FORMAT",
    "PUBLIC_KEY_FILE",
    "SIGNATURE_FILE",
    "TokenSigningKey",
    "fingerprint",
    "sign_files",
    "sign_files_in_token",
    "token_key_for_oms",
]

logger = logging.getLogger(__name__)

OMS_FORMAT = "oms-sigstore-bundle-v0.3"
SIGNATURE_FILE = "model.sig"
PUBLIC_KEY_FILE = "oms.pub.pem"


def fingerprint(pem: bytes) -> str:
    """SHA-256 of a public key's PEM: the key hint ``model_signing`` writes in a signature."""
    return hashlib.sha256(pem).hexdigest()


class _TokenUri(Protocol):
    token: str
    object: str
    module: str | None


class TokenSigningKey(Protocol):
    """A node's signing key in a token, as ``insitu.workspace`` opens it (``TokenKey``)."""

    uri: _TokenUri
    algorithm: str

    def public_key(self) -> Any: ...


def token_key_for_oms(key: object) -> TokenSigningKey | None:
    """``key`` when it is a P-256 key in a PKCS#11 token (it can sign OMS), else ``None``."""
    uri = getattr(key, "uri", None)
    if uri is None or getattr(key, "algorithm", None) != P256:
        return None
    if not isinstance(getattr(key, "public_key", lambda: None)(), ec.EllipticCurvePublicKey):
        return None
    return key  # type: ignore[return-value]  # checked by its attributes just above


def _sign(
    files: Mapping[str, bytes | bytearray],
    *,
    name: str,
    pem: bytes,
    use_signer: Callable[[Any, Path], Any],
) -> dict[str, Any]:
    """Write ``files`` into a private directory; ``use_signer(config, root)`` picks the key."""
    try:
        from model_signing import hashing, signing
    except ModuleNotFoundError as exc:
        raise sign_extra_missing(exc) from exc

    with tempfile.TemporaryDirectory(prefix="insitu-oms-") as tmp:  # mkdtemp: mode 0700
        root = Path(tmp)
        model_dir = root / name
        model_dir.mkdir(mode=0o700)
        for file_name, data in files.items():
            (model_dir / file_name).write_bytes(data)
        signature_path = root / SIGNATURE_FILE
        # Its constructors are unannotated.
        config = signing.Config()  # type: ignore[no-untyped-call]
        hashes = hashing.Config()  # type: ignore[no-untyped-call]
        use_signer(config, root).set_hashing_config(
            hashes.set_ignored_paths(
                paths=[SIGNATURE_FILE, PUBLIC_KEY_FILE], ignore_git_paths=False
            )
        ).sign(model_dir, signature_path)
        signature: dict[str, Any] = json.loads(signature_path.read_text(encoding="utf-8"))
    return {
        "format": OMS_FORMAT,
        "files": sorted(files),
        "signature": signature,
        "public_key": pem.decode("ascii"),
        "keyid": fingerprint(pem),
    }


def sign_files(
    files: Mapping[str, bytes | bytearray], key: ec.EllipticCurvePrivateKey, *, name: str
) -> dict[str, Any]:
    """An OMS signature over ``files`` (file name -> plain bytes), for the bundle header.

    ``name`` names the signed model (the statement's subject; informative only).

    Raises:
        MissingDependencyError: ``model_signing`` is not installed (``sign`` extra).

    """
    password = secrets.token_bytes(32)

    def use_key_file(config: Any, root: Path) -> Any:
        key_path = root / "key.pem"
        key_path.write_bytes(
            key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(password))
        )
        key_path.chmod(0o600)
        # It annotates the password as str but hands it to cryptography, which needs bytes.
        return config.use_elliptic_key_signer(private_key=key_path, password=password)

    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return _sign(files, name=name, pem=pem, use_signer=use_key_file)


def sign_files_in_token(
    files: Mapping[str, bytes | bytearray], key: TokenSigningKey, *, name: str
) -> dict[str, Any]:
    """An OMS signature over ``files`` made in the token of ``key`` (an opened P-256 key).

    Raises:
        MissingDependencyError: ``model_signing`` is not installed (``sign`` extra).
        TokenError: the token or ``model_signing``'s PKCS#11 signer failed.

    """
    uri = key.uri
    pkcs11_uri = f"pkcs11:token={quote(uri.token, safe='')};object={quote(uri.object, safe='')}"
    if uri.module:
        pkcs11_uri += f"?module-path={quote(uri.module, safe='/')}"

    configs: list[Any] = []

    def use_token(config: Any, _root: Path) -> Any:
        configs.append(config.use_pkcs11_signer(pkcs11_uri=pkcs11_uri))
        return configs[-1]

    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    import PyKCS11

    try:
        return _sign(files, name=name, pem=pem, use_signer=use_token)
    except (ValueError, PyKCS11.PyKCS11Error) as exc:
        raise TokenError(
            f"token {uri.token!r}: model_signing could not sign with {uri.object!r} ({exc}); "
            "check the token"
        ) from exc
    finally:
        for config in configs:
            _close_signer_session(config)


def _close_signer_session(config: Any) -> None:
    """Close the PKCS#11 session ``model_signing``'s signer opened, now, not at its ``__del__``.

    A TPM through tpm2-pkcs11 keeps the key loaded while the session is open, and a TPM
    without a resource manager holds three objects: a signer left to the garbage collector
    (a reference cycle) kept the key loaded, and the node's next key did not fit.
    """
    import PyKCS11

    signer: Any = getattr(config, "_signer", None)
    session = getattr(signer, "session", None)
    if session is None:
        return
    try:
        session.closeSession()
    except PyKCS11.PyKCS11Error:
        logger.debug("closing model_signing's PKCS#11 session failed", exc_info=True)
    signer.session = None  # its __del__ closes nothing twice
