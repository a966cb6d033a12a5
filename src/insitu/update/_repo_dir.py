"""A repository in a directory: role keys beside the public tree that is served.

Layout::

    <repo>/keys/<role>-<n>.key     Ed25519 role keys (insitu-key/1, 0600, scrypt with a
                                   passphrase from INSITU_PASSPHRASE)
    <repo>/public/metadata/...     what a web server or CDN serves: metadata ...
    <repo>/public/targets/...      ... and targets
    <repo>/public/metadata/1.root.json   the root a device is enrolled with

Only ``public/`` is ever served (``insitu repo serve`` serves nothing else), so the keys
never leave the machine. In production the root keys belong offline: this layout keeps
them beside the others for a single-operator setup, and ADR 0103 says what to change
for a larger one.
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
from insitu.update._storage import DirectoryStorage
from insitu.workspace import load_private_key, passphrase_from_env, save_private_key

__all__ = ["init_directory_repository", "open_directory_repository", "rotate_directory_keys"]

logger = logging.getLogger(__name__)


def _signers_from(keys_dir: Path, passphrase: str | None) -> dict[str, list[Signer]]:
    signers: dict[str, list[Signer]] = {}
    for role in DEFAULT_EXPIRY_DAYS:
        for path in sorted(keys_dir.glob(f"{role}-*.key")):
            key = load_private_key(path, "ed25519", passphrase)
            assert isinstance(key, Ed25519PrivateKey)
            signers.setdefault(role, []).append(CryptoSigner(key))
    return signers


def init_directory_repository(
    path: Path,
    *,
    publishers: Iterable[SigningPublicKey],
    threshold: int = 1,
    expiry_days: Mapping[str, int] | None = None,
    passphrase: str | None = None,
    ledger: Ledger | None = None,
) -> UpdateRepository:
    """Create a repository at ``path`` with ``threshold`` fresh keys per role.

    With ``ledger``, the creation is recorded there (``repo.initialized``).

    Raises:
        RepositoryError: ``path`` already holds a repository, or is not empty.

    """
    path = Path(path)
    if (path / "public" / "metadata" / "root.json").exists():
        raise RepositoryError(f"{path} already holds an update repository; use it as it is")
    if path.exists() and any(path.iterdir()):
        raise RepositoryError(f"{path} is not empty; choose a new directory for the repository")
    if threshold < 1:
        raise RepositoryError("the threshold must be at least 1")
    passphrase = passphrase or passphrase_from_env()
    if not passphrase:
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
        for role in DEFAULT_EXPIRY_DAYS:
            for index in range(1, threshold + 1):
                save_private_key(
                    keys_dir / f"{role}-{index}.key", Ed25519PrivateKey.generate(), passphrase
                )
        UpdateRepository.create(
            DirectoryStorage(staging / "public"),
            _signers_from(keys_dir, passphrase),
            publishers=publishers,
            threshold=threshold,
            expiry_days=expiry_days,
        )
        if path.exists():
            path.rmdir()  # empty, checked above
        staging.rename(path)
        fsync_dir(path.absolute().parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if ledger is not None:
        events.REPO_INITIALIZED.record(ledger, threshold=threshold, root_version=1)
    return open_directory_repository(path, passphrase=passphrase)


def rotate_directory_keys(
    path: Path, role: str, *, passphrase: str | None = None, ledger: Ledger | None = None
) -> UpdateRepository:
    """Replace the keys of ``role`` in the repository at ``path`` by fresh ones.

    New key files are written first and the old ones removed only after the new metadata
    is written, so an interruption leaves extra keys (harmless: their signatures are
    ignored), never a role without keys.
    """
    passphrase = passphrase or passphrase_from_env()
    repo = open_directory_repository(path, passphrase=passphrase)
    keys_dir = Path(path) / "keys"
    old_files = sorted(keys_dir.glob(f"{role}-*.key"))
    if role not in DEFAULT_EXPIRY_DAYS or not old_files:
        raise RepositoryError(f"no keys for role {role!r} in {keys_dir}")
    start = 1 + max(int(p.stem.rsplit("-", 1)[1]) for p in old_files)
    new_signers: list[Signer] = []
    for index in range(start, start + len(old_files)):
        key = Ed25519PrivateKey.generate()
        save_private_key(keys_dir / f"{role}-{index}.key", key, passphrase)
        new_signers.append(CryptoSigner(key))
    repo.rotate_keys(role, new_signers, ledger=ledger)
    for old in old_files:
        old.unlink()
    return repo


def open_directory_repository(path: Path, *, passphrase: str | None = None) -> UpdateRepository:
    """Open the repository at ``path`` with its role keys.

    Raises:
        RepositoryError: no repository at ``path``.

    """
    path = Path(path)
    if not (path / "public" / "metadata" / "root.json").is_file():
        raise RepositoryError(
            f"no update repository at {path}; create one with 'insitu repo init {path}'"
        )
    signers = _signers_from(path / "keys", passphrase or passphrase_from_env())
    return UpdateRepository(DirectoryStorage(path / "public"), signers)
