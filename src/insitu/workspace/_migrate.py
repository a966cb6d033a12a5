"""``insitu keys migrate``: move a workspace's file signing key into a PKCS#11 token.

Issue 19 asks that existing file keys keep working and that a workspace made before
tokens can move its key into one. The key stays the same key (it is imported with
``C_CreateObject``, not regenerated), so the node id, the ledger's signatures and every
verifier that pinned the node's public key are unchanged.

The order is what makes a refusal leave nothing behind:

1. everything is checked first: the workspace keeps its key in a file, the file opens
   (``INSITU_PASSPHRASE`` for a scrypt-sealed one) and matches the workspace's public
   key, the token exists, takes the PIN, has ``CKM_EDDSA``, and holds no object of the
   label;
2. the key is created in the token as a *sensitive*, *not extractable* private key
   (``CKA_TOKEN``, ``CKA_PRIVATE``, sign-only) with its public half, and the token must
   sign a fresh challenge that the workspace's public key verifies; a failure destroys
   both objects again;
3. only then does anything change on disk: ``config.toml``'s ``[keys]`` (written
   atomically), the ``workspace.keys_migrated`` ledger entry (signed in the token), and
   last the key file, overwritten and unlinked. A failure of the config or the ledger
   restores the config and removes the token's objects.

Overwriting the key file is a courtesy, not a guarantee: on an SSD the old blocks may
survive wear levelling, and snapshots, backups and copy-on-write file systems keep
earlier versions. A key that was ever a file may have been copied; generating the key in
the token (``insitu init --key-uri``) is the way to a key that never existed outside it.

The bundle decryption key (X25519, ``keys/encryption.key``) is not moved: tokens such
as SoftHSM2 have no X25519, and a token-held decryption key needs bundles encrypted to
P-256 recipients first.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from insitu._atomic import fsync_dir
from insitu._signer import verify_signature
from insitu.audit import Ledger, events, node_id_for
from insitu.errors import KeyFileError, TokenError
from insitu.workspace._config import save_config
from insitu.workspace._keys import load_private_key, passphrase_from_env
from insitu.workspace._pkcs11 import (
    _ED25519_PARAMS,
    TokenKey,
    TokenKeyUri,
    _check,
    _public_of,
    _Session,
    pin_from_env,
)
from insitu.workspace._workspace import Workspace

__all__ = ["KeyMigration", "migrate_keys"]

logger = logging.getLogger(__name__)

#: What the challenge the token must sign starts with (the rest is 32 random bytes).
_CHALLENGE = b"insitu keys migrate: the token signs with the node's key\n"


@dataclass(frozen=True)
class KeyMigration:
    """What :func:`migrate_keys` did: the keys moved, where to, and the ledger entry."""

    node: str
    keys: tuple[str, ...]
    uri: str
    module: str
    seq: int
    destroyed: tuple[str, ...]


def migrate_keys(
    ws: Workspace,
    key_uri: str,
    *,
    pkcs11_module: str | None = None,
    pin: str | None = None,
    passphrase: str | None = None,
) -> KeyMigration:
    """Move ``ws``'s file signing key into the PKCS#11 token ``key_uri`` names.

    ``pin`` defaults to ``INSITU_PKCS11_PIN`` and ``passphrase`` (of a scrypt-sealed key
    file) to ``INSITU_PASSPHRASE``. The key file is overwritten and unlinked at the end;
    overwriting does not defeat SSD wear levelling, snapshots or backups, which is why
    generating the key in the token (``insitu init --key-uri``) is preferred.

    Raises:
        UsageError: ``key_uri`` is not a PKCS#11 URI naming a token and a key.
        TokenError: the workspace's key is already in a token, the token lacks Ed25519,
            a key of that label is there already, or the token does not sign with it.
        WrongPinError: the token refused the PIN.
        TokenModuleError: the PKCS#11 module is missing or does not load.
        TokenKeyNotFoundError: no token of that label.
        KeyFileError: the key file is missing, corrupt, or not the workspace's key.
        PassphraseRequiredError: the key file is sealed and no passphrase was given.
        WrongPassphraseError: the passphrase does not open the key file.

    """
    uri = TokenKeyUri.parse(key_uri, module=pkcs11_module)
    if ws.signing_key_uri is not None:
        raise TokenError(
            f"the signing key of {ws.home} is already in a token ({ws.signing_key_uri}); "
            "nothing to migrate"
        )
    private = _file_key(ws, passphrase or passphrase_from_env())
    session = _Session(uri, pin or pin_from_env())
    _check_token(session)
    key = _import(session, private)
    try:
        _prove(ws, key)
    except BaseException:
        key.destroy()
        raise
    return _commit(ws, key, uri)


def _file_key(ws: Workspace, passphrase: str | None) -> Ed25519PrivateKey:
    path = ws.keys_dir / "signing.key"
    loaded = load_private_key(path, "ed25519", passphrase)
    assert isinstance(loaded, Ed25519PrivateKey)
    if node_id_for(loaded.public_key()) != ws.node_id:
        raise KeyFileError(
            f"{path} does not match keys/signing.pub.pem; restore the workspace's own key "
            "from a backup before migrating it"
        )
    return loaded


def _check_token(session: _Session) -> None:
    """The token signs with Ed25519 and holds no object of the key's label."""
    import PyKCS11

    uri = session.uri
    try:
        slot = session.session.getSessionInfo().slotID
        mechanisms = set(session.lib.getMechanismList(slot))
    except PyKCS11.PyKCS11Error as exc:
        raise _check(exc, uri, "listing its mechanisms") from exc
    if "CKM_EDDSA" not in mechanisms:
        raise TokenError(
            f"token {uri.token!r} cannot sign with Ed25519 (no CKM_EDDSA; a TPM has none), "
            "so the Ed25519 key cannot move there; nothing was changed. Use a token with "
            "Ed25519, or a new workspace made in this one (insitu init --key-uri)"
        )
    if session.find(PyKCS11.CKO_PRIVATE_KEY) or session.find(PyKCS11.CKO_PUBLIC_KEY):
        raise TokenError(
            f"token {uri.token!r} already holds a key labelled {uri.object!r}; choose "
            "another object= label (two nodes must never share a key), nothing was changed"
        )


def _import(session: _Session, private: Ed25519PrivateKey) -> TokenKey:
    """``C_CreateObject`` of the key pair: the private half sensitive, not extractable."""
    import PyKCS11

    uri = session.uri
    raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    point = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    common: list[tuple[int, Any]] = [
        (PyKCS11.CKA_TOKEN, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC_EDWARDS),
        (PyKCS11.CKA_LABEL, uri.object),
        (PyKCS11.CKA_EC_PARAMS, _ED25519_PARAMS),
    ]
    public_template = [
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY),
        (PyKCS11.CKA_VERIFY, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_EC_POINT, b"\x04\x20" + point),  # DER OCTET STRING, as generated
        *common,
    ]
    private_template = [
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY),
        (PyKCS11.CKA_SIGN, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_PRIVATE, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_SENSITIVE, PyKCS11.CK_TRUE),
        (PyKCS11.CKA_EXTRACTABLE, PyKCS11.CK_FALSE),
        (PyKCS11.CKA_DECRYPT, PyKCS11.CK_FALSE),
        (PyKCS11.CKA_DERIVE, PyKCS11.CK_FALSE),
        (PyKCS11.CKA_VALUE, raw),
        *common,
    ]
    made: list[Any] = []
    try:
        made.append(session.session.createObject(private_template))
        made.append(session.session.createObject(public_template))
        public = _public_of(session, made[1])
    except (PyKCS11.PyKCS11Error, TokenError) as exc:
        for handle in made:
            with contextlib.suppress(PyKCS11.PyKCS11Error):
                session.session.destroyObject(handle)
        raise TokenError(
            f"token {uri.token!r} did not take the Ed25519 key ({exc}); use a token that "
            "imports CKK_EC_EDWARDS keys, nothing was changed"
        ) from exc
    return TokenKey(session, made[0], public, made[1])


def _prove(ws: Workspace, key: TokenKey) -> None:
    """The token signs a fresh challenge that the workspace's public key verifies."""
    challenge = _CHALLENGE + secrets.token_bytes(32)
    try:
        verify_signature(ws.signing_public_key, key.sign(challenge), challenge)
    except InvalidSignature:
        raise TokenError(
            f"token {key.uri.token!r} signs with a key that is not the workspace's; "
            "nothing was changed (check the token)"
        ) from None


def _commit(ws: Workspace, key: TokenKey, uri: TokenKeyUri) -> KeyMigration:
    """Config, ledger entry, then the key file; a failure before the last undoes the rest."""
    before = copy.deepcopy(ws.config)
    module = uri.module or ""
    try:
        ws.config.sections["keys"] = {"signing": str(uri), "pkcs11_module": module}
        save_config(ws.config_path, ws.config)
        with Ledger(
            ws.ledger_path,
            log_id=ws.node_id,
            public_key=ws.signing_public_key,
            signing_key=key,
            head_interval=int(ws.config.get("ledger", "head_interval")),
            genesis=events.WORKSPACE_INIT.name,
        ) as ledger:
            entry = events.WORKSPACE_KEYS_MIGRATED.record(
                ledger,
                node=ws.node_id,
                keys=["signing"],
                store="pkcs11",
                uris={"signing": _recorded_uri(uri)},
                algorithms={"signing": "ed25519"},
            )
            ledger.sign_head()
    except BaseException:
        ws.config.sections.clear()
        ws.config.sections.update(before.sections)
        with contextlib.suppress(OSError):
            save_config(ws.config_path, before)
        key.destroy()
        raise
    destroyed = _destroy(ws.keys_dir / "signing.key")
    logger.info("moved the signing key of %s into %s", ws.home, uri)
    return KeyMigration(ws.node_id, ("signing",), str(uri), module, entry.seq, destroyed)


def _recorded_uri(uri: TokenKeyUri) -> str:
    """The URI as the ledger keeps it: with the module's path (never a PIN).

    The module says what the token is (``libtpm2_pkcs11.so``: a TPM), which the report
    reads from the ledger alone.
    """
    return f"{uri}?module-path={uri.module}" if uri.module else str(uri)


def _destroy(path: Path) -> tuple[str, ...]:
    """Overwrite ``path`` with random bytes, flush, unlink (see the module docstring).

    Raises:
        KeyFileError: the file could not be removed (the key is in the token by now).

    """
    try:
        size = path.stat().st_size
        with path.open("r+b") as handle:
            handle.write(secrets.token_bytes(max(size, 1)))
            handle.flush()
            os.fsync(handle.fileno())
        path.unlink()
        fsync_dir(path.parent)
    except OSError as exc:
        raise KeyFileError(
            f"the key is in the token and recorded, but {path} could not be removed "
            f"({exc.strerror or exc}); delete it by hand (shred -u {path})"
        ) from exc
    return (path.name,)
