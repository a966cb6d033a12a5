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
"""

from __future__ import annotations

import hashlib
import json
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
    PublicFormat,
)

from insitu.bundle._bom import sign_extra_missing

__all__ = ["OMS_FORMAT", "PUBLIC_KEY_FILE", "SIGNATURE_FILE", "fingerprint", "sign_files"]

OMS_FORMAT = "oms-sigstore-bundle-v0.3"
SIGNATURE_FILE = "model.sig"
PUBLIC_KEY_FILE = "oms.pub.pem"


def fingerprint(pem: bytes) -> str:
    """SHA-256 of a public key's PEM: the key hint ``model_signing`` writes in a signature."""
    return hashlib.sha256(pem).hexdigest()


def sign_files(
    files: Mapping[str, bytes | bytearray], key: ec.EllipticCurvePrivateKey, *, name: str
) -> dict[str, Any]:
    """An OMS signature over ``files`` (file name -> plain bytes), for the bundle header.

    ``name`` names the signed model (the statement's subject; informative only).

    Raises:
        MissingDependencyError: ``model_signing`` is not installed (``sign`` extra).

    """
    try:
        from model_signing import hashing, signing
    except ModuleNotFoundError as exc:
        raise sign_extra_missing(exc) from exc

    password = secrets.token_bytes(32)
    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    with tempfile.TemporaryDirectory(prefix="insitu-oms-") as tmp:  # mkdtemp: mode 0700
        root = Path(tmp)
        model_dir = root / name
        model_dir.mkdir(mode=0o700)
        for file_name, data in files.items():
            (model_dir / file_name).write_bytes(data)
        key_path = root / "key.pem"
        key_path.write_bytes(
            key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(password))
        )
        key_path.chmod(0o600)
        signature_path = root / SIGNATURE_FILE
        # Its constructors are unannotated; it annotates the password as str but hands
        # it to cryptography, which needs bytes.
        config = signing.Config()  # type: ignore[no-untyped-call]
        hashes = hashing.Config()  # type: ignore[no-untyped-call]
        config.use_elliptic_key_signer(
            private_key=key_path,
            password=password,  # type: ignore[arg-type]
        ).set_hashing_config(
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
