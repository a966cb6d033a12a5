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

The bundle decryption key (X25519, ``keys/encryption.key``) cannot move: tokens such as
SoftHSM2 and a TPM have no X25519. With ``decryption=True`` (``--new-decryption-key``) it
is *replaced*: a new decryption key is generated in the token (P-256 for ECDH in the
token, ``-decrypt`` beside the signing key's label), ``keys/encryption.pub.pem`` becomes
its public key, and the X25519 file is destroyed as the signing key's is. That is a new
key, not the old one moved: bundles already encrypted to the old key can no longer be
opened here, and the update repository must enrol the new public key (the device's id
there is its key's). Hence a flag, never the default; the ledger entry names the key in
``replaced``. It works for a workspace whose signing key is already in a token, too.
The site secrets (``keys/pseudonym.key``, ``keys/data.key``) keep their values but are
sealed to the new token key in the same commit (``insitu.workspace._wrapped``), so that
a copy of the workspace without the token no longer opens them; a failure of the
commit puts their files back as they were. Their earlier files may survive on the disk
as the key files may (see above).
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

from insitu._atomic import atomic_write_bytes, fsync_dir
from insitu._signer import verify_signature
from insitu.audit import Entry, Ledger, events, node_id_for
from insitu.errors import KeyFileError, TokenError
from insitu.workspace._config import save_config
from insitu.workspace._keys import (
    load_private_key,
    load_secret,
    passphrase_from_env,
    reseal_secret,
    save_public_key,
)
from insitu.workspace._pkcs11 import (
    _ED25519_PARAMS,
    TokenDecryptionKey,
    TokenKey,
    TokenKeyUri,
    _check,
    _public_of,
    _Session,
    decryption_uri_for,
    generate_token_decryption_key,
    open_token_key,
    pin_from_env,
)
from insitu.workspace._workspace import Workspace
from insitu.workspace._wrapped import TokenSeal

__all__ = ["KeyMigration", "migrate_keys"]

logger = logging.getLogger(__name__)

#: What the challenge the token must sign starts with (the rest is 32 random bytes).
_CHALLENGE = b"insitu keys migrate: the token signs with the node's key\n"


@dataclass(frozen=True)
class KeyMigration:
    """What :func:`migrate_keys` did: the keys moved or replaced, where to, the ledger entry."""

    node: str
    keys: tuple[str, ...]
    uri: str
    module: str
    seq: int
    destroyed: tuple[str, ...]
    #: Keys made anew in the token rather than moved (``decryption``): see the docstring.
    replaced: tuple[str, ...] = ()


def migrate_keys(
    ws: Workspace,
    key_uri: str,
    *,
    pkcs11_module: str | None = None,
    pin: str | None = None,
    passphrase: str | None = None,
    decryption: bool = False,
) -> KeyMigration:
    """Move ``ws``'s file signing key into the PKCS#11 token ``key_uri`` names.

    With ``decryption``, also replace the file decryption key by a new one generated in
    that token (labelled as ``key_uri``'s object plus ``-decrypt``); this works when the
    signing key is in a token already, too. ``pin`` defaults to ``INSITU_PKCS11_PIN`` and
    ``passphrase`` (of a scrypt-sealed key file) to ``INSITU_PASSPHRASE``. The key files
    are overwritten and unlinked at the end; overwriting does not defeat SSD wear
    levelling, snapshots or backups, which is why generating the keys in the token
    (``insitu init --key-uri``) is preferred.

    Raises:
        UsageError: ``key_uri`` is not a PKCS#11 URI naming a token and a key.
        TokenError: the workspace's keys are already in a token, the token lacks Ed25519
            (or ECDH, for ``decryption``), a key of that label is there already, or the
            token does not sign with it.
        WrongPinError: the token refused the PIN.
        TokenModuleError: the PKCS#11 module is missing or does not load.
        TokenKeyNotFoundError: no token of that label.
        KeyFileError: the key file is missing, corrupt, or not the workspace's key.
        PassphraseRequiredError: the key file is sealed and no passphrase was given.
        WrongPassphraseError: the passphrase does not open the key file.

    """
    uri = TokenKeyUri.parse(key_uri, module=pkcs11_module)
    moves_signing = _check_request(ws, uri, decryption)
    pin = pin or pin_from_env()
    resealed = _site_secrets(ws, passphrase or passphrase_from_env()) if decryption else {}
    if moves_signing:
        signer = _moved_signing_key(ws, uri, pin, passphrase or passphrase_from_env())
    else:
        signer = open_token_key(_signing_uri(ws), pin)
        uri = TokenKeyUri(uri.token, uri.object, signer.uri.module)  # the workspace's module
    decrypting: TokenDecryptionKey | None = None
    try:
        if decryption:
            decrypting = _new_decryption_key(uri, pin, signer)
        keys, seq = _commit(
            ws, signer, uri, decrypting, moves_signing=moves_signing, resealed=resealed
        )
    except BaseException:
        if moves_signing:
            signer.destroy()
        raise
    # Recorded: from here on a failure leaves the keys in the token and says what to do.
    destroyed: tuple[str, ...] = ()
    if moves_signing:
        destroyed += _destroy(ws.keys_dir / "signing.key")
    if decrypting is not None and (ws.keys_dir / "encryption.key").exists():
        destroyed += _destroy(ws.keys_dir / "encryption.key")
    logger.info("moved the keys %s of %s into %s", ", ".join(keys), ws.home, uri)
    replaced = ("decryption",) if decrypting is not None else ()
    return KeyMigration(ws.node_id, keys, str(uri), uri.module or "", seq, destroyed, replaced)


def _check_request(ws: Workspace, uri: TokenKeyUri, decryption: bool) -> bool:
    """Whether the signing key moves; refuses a request with nothing to do."""
    if ws.signing_key_uri is None:
        return True
    if not decryption:
        raise TokenError(
            f"the signing key of {ws.home} is already in a token ({ws.signing_key_uri}); "
            "nothing to migrate (--new-decryption-key makes the decryption key there)"
        )
    if ws.decryption_key_uri is not None:
        raise TokenError(
            f"the keys of {ws.home} are already in a token ({ws.signing_key_uri}, "
            f"{ws.decryption_key_uri}); nothing to migrate"
        )
    module = str(ws.config.get("keys", "pkcs11_module")) or None
    if uri.module is not None and uri.module != module:
        raise TokenError(
            f"the signing key of {ws.home} is in a token of module {module}; the decryption "
            "key goes to a token of the same module (leave out --pkcs11-module)"
        )
    return False


def _signing_uri(ws: Workspace) -> TokenKeyUri:
    return TokenKeyUri.parse(
        str(ws.signing_key_uri), module=str(ws.config.get("keys", "pkcs11_module")) or None
    )


def _moved_signing_key(
    ws: Workspace, uri: TokenKeyUri, pin: str | None, passphrase: str | None
) -> TokenKey:
    """The file signing key imported into the token, proven to sign as the workspace."""
    private = _file_key(ws, passphrase)
    session = _Session(uri, pin)
    _check_token(session)
    key = _import(session, private)
    try:
        _prove(ws, key)
    except BaseException:
        key.destroy()
        raise
    return key


def _new_decryption_key(uri: TokenKeyUri, pin: str | None, signer: TokenKey) -> TokenDecryptionKey:
    """A new decryption key generated in ``uri``'s token, beside the signing key."""
    if not signer.offers("CKM_ECDH1_DERIVE"):
        raise TokenError(
            f"token {uri.token!r} has no CKM_ECDH1_DERIVE, so no decryption key can be made "
            "there; nothing was changed (use a token with P-256 ECDH)"
        )
    beside = signer if signer.uri.token == uri.token else None
    return generate_token_decryption_key(decryption_uri_for(uri), pin, beside=beside)


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


def _site_secrets(ws: Workspace, passphrase: str | None) -> dict[Path, tuple[bytes, bytes]]:
    """The site secret files there are: each one's bytes and secret (opened to reseal)."""
    found = {}
    for name in ("pseudonym", "data"):
        path = ws.keys_dir / f"{name}.key"
        if path.exists():  # an older workspace makes them at first use (sealed then)
            found[path] = (path.read_bytes(), load_secret(path, passphrase))
    return found


def _commit(
    ws: Workspace,
    signer: TokenKey,
    uri: TokenKeyUri,
    decrypting: TokenDecryptionKey | None,
    *,
    moves_signing: bool,
    resealed: dict[Path, tuple[bytes, bytes]] | None = None,
) -> tuple[tuple[str, ...], int]:
    """Config, public key, site secrets resealed, ledger entry; a failure undoes them."""
    resealed = resealed or {}
    before = copy.deepcopy(ws.config)
    public_path = ws.keys_dir / "encryption.pub.pem"
    public_before = public_path.read_bytes() if decrypting is not None else b""
    keys: tuple[str, ...] = ("signing",) if moves_signing else ()
    keys += ("decryption",) if decrypting is not None else ()
    try:
        _write_config(ws, uri, decrypting, moves_signing=moves_signing)
        if decrypting is not None:
            save_public_key(public_path, decrypting.public_key())
            token_key = decrypting
            for path, (_, secret) in resealed.items():
                reseal_secret(path, secret, TokenSeal(lambda: token_key))
        sealed = tuple(path.stem for path in resealed)
        entry = _record(ws, signer, uri, decrypting, keys, resealed=sealed)
    except BaseException:
        ws.config.sections.clear()
        ws.config.sections.update(before.sections)
        with contextlib.suppress(OSError):
            save_config(ws.config_path, before)
        if decrypting is not None:
            with contextlib.suppress(OSError):
                atomic_write_bytes(public_path, public_before)
            for path, (data, _) in resealed.items():
                with contextlib.suppress(OSError):
                    atomic_write_bytes(path, data, mode=0o600)
            decrypting.destroy()
        raise
    return keys, entry.seq


def _write_config(
    ws: Workspace, uri: TokenKeyUri, decrypting: TokenDecryptionKey | None, *, moves_signing: bool
) -> None:
    section = dict(ws.config.sections.get("keys", {}))
    if moves_signing:
        section = {"signing": str(uri), "pkcs11_module": uri.module or ""}
    if decrypting is not None:
        section["decryption"] = str(decrypting.uri)
    ws.config.sections["keys"] = section
    save_config(ws.config_path, ws.config)


def _record(
    ws: Workspace,
    signer: TokenKey,
    uri: TokenKeyUri,
    decrypting: TokenDecryptionKey | None,
    keys: tuple[str, ...],
    *,
    resealed: tuple[str, ...] = (),
) -> Entry:
    """``workspace.keys_migrated``, signed in the token."""
    uris = {"signing": _recorded_uri(uri)} if "signing" in keys else {}
    algorithms = {"signing": "ed25519"} if "signing" in keys else {}
    extra: dict[str, Any] = {}
    if decrypting is not None:
        uris["decryption"] = _recorded_uri(decrypting.uri)
        algorithms["decryption"] = "p256-ecdh"
        extra["replaced"] = ["decryption"]
    if resealed:
        extra["resealed"] = list(resealed)  # the site secrets, now sealed to the token key
    with Ledger(
        ws.ledger_path,
        log_id=ws.node_id,
        public_key=ws.signing_public_key,
        signing_key=signer,
        head_interval=int(ws.config.get("ledger", "head_interval")),
        genesis=events.WORKSPACE_INIT.name,
    ) as ledger:
        entry = events.WORKSPACE_KEYS_MIGRATED.record(
            ledger,
            node=ws.node_id,
            keys=list(keys),
            store="pkcs11",
            uris=uris,
            algorithms=algorithms,
            **extra,
        )
        ledger.sign_head()
    return entry


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
