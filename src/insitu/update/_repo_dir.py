"""A repository in a directory: role keys beside the public tree that is served.

Layout::

    <repo>/keys/<role>-<n>.key     Ed25519 role keys (insitu-key/1, 0600, scrypt with a
                                   passphrase from INSITU_PASSPHRASE)
    <repo>/keys/<role>-<n>.pkcs11  or, with ``--key-uri``, where the role's ECDSA P-256
                                   key lives in a PKCS#11 token, and its public half
                                   (``insitu.update._role_tokens``; ADR 0021)
    <repo>/public/metadata/...     what a web server or CDN serves: metadata ...
    <repo>/public/targets/...      ... and targets
    <repo>/public/metadata/1.root.json   the root a device is enrolled with

Only ``public/`` is ever served (``insitu repo serve`` serves nothing else), so the keys
never leave the machine. In production the root keys belong offline: this layout keeps
them beside the others for a single-operator setup, and ADR 0103 says what to change
for a larger one. With ``--key-uri`` every role key is generated in the token and no
private key is under ``<repo>`` at all; ADR 0021 says why root goes there too and how to
keep it in a token of its own.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Signer

from insitu._atomic import fsync_dir
from insitu._signer import SigningPublicKey
from insitu.audit import Ledger, events
from insitu.errors import RepositoryError
from insitu.update._repository import DEFAULT_EXPIRY_DAYS, UpdateRepository
from insitu.update._role_tokens import (
    TOKEN_SUFFIX,
    TokenRoleSigner,
    base_uri_of,
    generate_role_key,
    load_role_signer,
)
from insitu.update._storage import DirectoryStorage
from insitu.workspace import (
    TokenKeyUri,
    load_private_key,
    passphrase_from_env,
    pin_from_env,
    save_private_key,
)

__all__ = [
    "init_directory_repository",
    "open_directory_repository",
    "role_keys_in_token",
    "rotate_directory_keys",
]

logger = logging.getLogger(__name__)


def _signers_from(
    keys_dir: Path, passphrase: str | None, pin: str | None = None
) -> dict[str, list[Signer]]:
    signers: dict[str, list[Signer]] = {}
    for role in DEFAULT_EXPIRY_DAYS:
        for path in sorted(keys_dir.glob(f"{role}-*.key")):
            key = load_private_key(path, "ed25519", passphrase)
            assert isinstance(key, Ed25519PrivateKey)
            signers.setdefault(role, []).append(CryptoSigner(key))
        for path in sorted(keys_dir.glob(f"{role}-*{TOKEN_SUFFIX}")):
            signers.setdefault(role, []).append(load_role_signer(path, pin))
    return signers


def role_keys_in_token(path: Path) -> bool:
    """Whether the repository at ``path`` keeps role keys in a PKCS#11 token."""
    return any((Path(path) / "keys").glob(f"*{TOKEN_SUFFIX}"))


def _generate_files(
    keys_dir: Path, threshold: int, passphrase: str | None
) -> dict[str, list[Signer]]:
    """``threshold`` Ed25519 key files per role (sealed with ``passphrase`` when given)."""
    for role in DEFAULT_EXPIRY_DAYS:
        for index in range(1, threshold + 1):
            key = Ed25519PrivateKey.generate()
            save_private_key(keys_dir / f"{role}-{index}.key", key, passphrase)
    return _signers_from(keys_dir, passphrase)


def _destroy_token_keys(signers: Mapping[str, Iterable[Signer]]) -> None:
    """Delete the token keys of ``signers`` (an init that did not complete)."""
    for role_signers in signers.values():
        for signer in role_signers:
            if isinstance(signer, TokenRoleSigner):
                signer.unlock().destroy()


def _generate_in_token(
    keys_dir: Path, token: TokenKeyUri, pin: str | None
) -> dict[str, list[Signer]]:
    """One P-256 key per role in ``token``; on a failure the ones made are deleted again."""
    made: list[TokenRoleSigner] = []
    try:
        for role in DEFAULT_EXPIRY_DAYS:
            made.append(generate_role_key(keys_dir, role, 1, token, pin))
    except BaseException:
        for signer in made:
            signer.unlock().destroy()
        raise
    return {role: [signer] for role, signer in zip(DEFAULT_EXPIRY_DAYS, made, strict=True)}


def init_directory_repository(
    path: Path,
    *,
    publishers: Iterable[SigningPublicKey],
    threshold: int = 1,
    expiry_days: Mapping[str, int] | None = None,
    passphrase: str | None = None,
    ledger: Ledger | None = None,
    key_uri: str | None = None,
    pkcs11_module: str | None = None,
    pin: str | None = None,
) -> UpdateRepository:
    """Create a repository at ``path`` with ``threshold`` fresh keys per role.

    With ``key_uri`` (``pkcs11:token=NAME;object=LABEL``), every role's key is an ECDSA
    P-256 key generated in that token, labelled ``LABEL-<role>``; ``pin`` (else
    ``INSITU_PKCS11_PIN``) logs in. Root goes there too: a repository has one operator
    here, and a root file beside a token would be the weakest key (ADR 0021). With
    ``ledger``, the creation is recorded there (``repo.initialized``, with where the
    keys live).

    Raises:
        RepositoryError: ``path`` already holds a repository, or is not empty, or a
            threshold above 1 with ``key_uri`` (one token is one holder).
        TokenError: the token refused (its subclasses name the cause); nothing is
            written and no key is left in the token.

    """
    path = Path(path)
    if (path / "public" / "metadata" / "root.json").exists():
        raise RepositoryError(f"{path} already holds an update repository; use it as it is")
    if path.exists() and any(path.iterdir()):
        raise RepositoryError(f"{path} is not empty; choose a new directory for the repository")
    if threshold < 1:
        raise RepositoryError("the threshold must be at least 1")
    token = TokenKeyUri.parse(key_uri, module=pkcs11_module) if key_uri else None
    if token is not None and threshold != 1:
        raise RepositoryError(
            "--threshold above 1 needs keys held by different people; keys in one token "
            "have one holder: leave out --threshold with --key-uri"
        )
    passphrase = passphrase or passphrase_from_env()
    if token is None and not passphrase:
        logger.warning(
            "INSITU_PASSPHRASE is not set: the repository's role keys are stored unencrypted "
            "(mode 0600). Set it for any repository that ships models to real devices."
        )
    # Built whole in a temporary sibling, then renamed into place: an interrupted init
    # leaves no half repository (and no keys that a root does not list).
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.init-", dir=path.absolute().parent))
    try:
        keys_dir = staging / "keys"
        keys_dir.mkdir(mode=0o700)
        if token is None:
            signers = _generate_files(keys_dir, threshold, passphrase)
        else:
            signers = _generate_in_token(keys_dir, token, pin or pin_from_env())
        try:
            UpdateRepository.create(
                DirectoryStorage(staging / "public"),
                signers,
                publishers=publishers,
                threshold=threshold,
                expiry_days=expiry_days,
            )
            if path.exists():
                path.rmdir()  # empty, checked above
            staging.rename(path)
            fsync_dir(path.absolute().parent)
        except BaseException:
            _destroy_token_keys(signers)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if ledger is not None:
        where = {} if token is None else {"key_store": "pkcs11", "key_uri": str(token)}
        events.REPO_INITIALIZED.record(ledger, threshold=threshold, root_version=1, **where)
    return open_directory_repository(path, passphrase=passphrase, pin=pin)


def rotate_directory_keys(
    path: Path,
    role: str,
    *,
    passphrase: str | None = None,
    ledger: Ledger | None = None,
    pin: str | None = None,
) -> UpdateRepository:
    """Replace the keys of ``role`` in the repository at ``path`` by fresh ones.

    New key files are written first and the old ones removed only after the new metadata
    is written, so an interruption leaves extra keys (harmless: their signatures are
    ignored), never a role without keys. A role whose keys are in a token gets new keys
    in the same token (``LABEL-<role>-<n>``), and the old private keys are deleted from
    it once the new metadata is written.
    """
    passphrase = passphrase or passphrase_from_env()
    pin = pin or pin_from_env()
    repo = open_directory_repository(path, passphrase=passphrase, pin=pin)
    keys_dir = Path(path) / "keys"
    old_files = sorted(keys_dir.glob(f"{role}-*.key"))
    old_tokens = sorted(keys_dir.glob(f"{role}-*{TOKEN_SUFFIX}"))
    if role not in DEFAULT_EXPIRY_DAYS or not (old_files or old_tokens):
        raise RepositoryError(f"no keys for role {role!r} in {keys_dir}")
    start = 1 + max(int(p.stem.rsplit("-", 1)[1]) for p in [*old_files, *old_tokens])
    new_signers: list[Signer] = []
    for index in range(start, start + len(old_files)):
        key = Ed25519PrivateKey.generate()
        save_private_key(keys_dir / f"{role}-{index}.key", key, passphrase)
        new_signers.append(CryptoSigner(key))
    for index, old in enumerate(old_tokens, start=start + len(old_files)):
        new_signers.append(generate_role_key(keys_dir, role, index, base_uri_of(old), pin))
    old_signers = [s for s in repo.signers[role] if isinstance(s, TokenRoleSigner)]
    repo.rotate_keys(role, new_signers, ledger=ledger)
    for old in old_files:
        old.unlink()
    for old, signer in zip(old_tokens, old_signers, strict=False):
        signer.unlock().destroy()
        old.unlink()
    return repo


def open_directory_repository(
    path: Path, *, passphrase: str | None = None, pin: str | None = None, unlock: bool = True
) -> UpdateRepository:
    """Open the repository at ``path`` with its role keys.

    Role keys in a token are opened here (``pin``, else ``INSITU_PKCS11_PIN``) unless
    ``unlock`` is false (reading only): a copy of the repository without its token fails
    now, before a publish writes any target.

    Raises:
        RepositoryError: no repository at ``path``.
        TokenError: a role key's token refused (its subclasses name the cause).

    """
    path = Path(path)
    if not (path / "public" / "metadata" / "root.json").is_file():
        raise RepositoryError(
            f"no update repository at {path}; create one with 'insitu repo init {path}'"
        )
    passphrase, pin = passphrase or passphrase_from_env(), pin or pin_from_env()
    signers = _signers_from(path / "keys", passphrase, pin)
    for role_signers in signers.values() if unlock else ():
        for signer in role_signers:
            if isinstance(signer, TokenRoleSigner):
                signer.unlock()
    return UpdateRepository(DirectoryStorage(path / "public"), signers)
