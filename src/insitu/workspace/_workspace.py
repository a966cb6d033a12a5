"""A workspace: one node's home directory with its config, identity and ledger.

Layout (``./.insitu`` by default; ``--home`` or ``INSITU_HOME`` elsewhere)::

    config.toml              validated configuration (``_config``)
    keys/signing.key         Ed25519 private key, 0600, scrypt-encrypted with a passphrase
    keys/signing.pub.pem     its public half
    keys/encryption.key      X25519 private key for receiving encrypted bundles, 0600
    keys/encryption.pub.pem  its public half
    keys/api-token           bearer token of the localhost API, 0600
    keys/pseudonym.key       site secret: HMAC key of pseudonymization, 0600
    keys/data.key            site secret: AES-256-GCM key of local caches, 0600
    ledger.db                the audit ledger (``insitu.audit``)

Invariants: a workspace is created whole or not at all (built in a temporary sibling
directory, then renamed into place), and the keys of an existing workspace are never
overwritten: ``init`` on a workspace opens it and says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

import insitu
from insitu._atomic import atomic_write_text, fsync_dir
from insitu._clock import utc_now
from insitu.audit import Ledger, events, node_id_for
from insitu.errors import (
    KeyFileError,
    WorkspaceError,
    WorkspaceNotFoundError,
    WorkspaceNotWritableError,
)
from insitu.workspace._config import Config, load_config, save_config
from insitu.workspace._keys import (
    create_secret,
    load_private_key,
    load_secret,
    passphrase_from_env,
    save_private_key,
    save_public_key,
)

__all__ = ["DEFAULT_HOME", "HOME_ENV", "Workspace", "resolve_home"]

logger = logging.getLogger(__name__)

HOME_ENV = "INSITU_HOME"
_warned = {"unencrypted": False}
DEFAULT_HOME = Path(".insitu")


def resolve_home(home: Path | str | None = None) -> Path:
    """The workspace home: ``home`` if given, else ``$INSITU_HOME``, else ``./.insitu``."""
    if home is not None:
        return Path(home).expanduser()
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else DEFAULT_HOME


@dataclass(frozen=True)
class Workspace:
    """An opened workspace. Create with :meth:`init` or :meth:`open`."""

    home: Path
    config: Config

    # -- paths ---------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        """``config.toml``."""
        return self.home / "config.toml"

    @property
    def keys_dir(self) -> Path:
        """The directory of key files."""
        return self.home / "keys"

    @property
    def ledger_path(self) -> Path:
        """The SQLite file of the ledger."""
        return self.home / "ledger.db"

    @property
    def node_id(self) -> str:
        """The node id, derived from the signing key."""
        return node_id_for(self.signing_public_key)

    @property
    def name(self) -> str:
        """The human name given at ``init``."""
        return str(self.config.get("node", "name"))

    # -- keys ----------------------------------------------------------------------

    @property
    def signing_public_key(self) -> Ed25519PublicKey:
        """The Ed25519 public key that verifies this node's ledger and bundles."""
        key = self._public("signing.pub.pem")
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{self.keys_dir / 'signing.pub.pem'} is not an Ed25519 key")
        return key

    @property
    def encryption_public_key(self) -> X25519PublicKey:
        """The X25519 public key that bundles are encrypted to."""
        key = self._public("encryption.pub.pem")
        if not isinstance(key, X25519PublicKey):
            raise KeyFileError(f"{self.keys_dir / 'encryption.pub.pem'} is not an X25519 key")
        return key

    def _public(self, name: str) -> object:
        path = self.keys_dir / name
        try:
            return load_pem_public_key(path.read_bytes())
        except FileNotFoundError:
            raise KeyFileError(
                f"public key {path} is missing; restore it from your backup"
            ) from None
        except ValueError as exc:
            raise KeyFileError(f"public key {path} is corrupt ({exc})") from exc

    def signing_key(self, passphrase: str | None = None) -> Ed25519PrivateKey:
        """The Ed25519 private key (passphrase from ``INSITU_PASSPHRASE`` by default)."""
        key = load_private_key(
            self.keys_dir / "signing.key", "ed25519", passphrase or passphrase_from_env()
        )
        assert isinstance(key, Ed25519PrivateKey)
        if node_id_for(key.public_key()) != self.node_id:
            raise KeyFileError("keys/signing.key does not match keys/signing.pub.pem")
        return key

    def encryption_key(self, passphrase: str | None = None) -> X25519PrivateKey:
        """The X25519 private key that decrypts bundles sent to this node."""
        key = load_private_key(
            self.keys_dir / "encryption.key", "x25519", passphrase or passphrase_from_env()
        )
        assert isinstance(key, X25519PrivateKey)
        return key

    def secret(self, name: Literal["pseudonym", "data"], passphrase: str | None = None) -> bytes:
        """A site secret (created on first use in workspaces older than it)."""
        path = self.keys_dir / f"{name}.key"
        passphrase = passphrase or passphrase_from_env()
        if not path.exists() and create_secret(path, passphrase):
            logger.info("created site secret %s", path)
        return load_secret(path, passphrase)

    def api_token(self) -> str:
        """The bearer token of this node's localhost API."""
        try:
            return (self.keys_dir / "api-token").read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"cannot read {self.keys_dir / 'api-token'} ({exc})") from exc

    def with_config(self, section: str, **values: Any) -> Workspace:
        """Set ``values`` in ``section`` of ``config.toml`` (validated, written atomically).

        Returns the workspace re-opened with the new configuration.

        Raises:
            ConfigError: the new values are not a valid configuration.

        """
        self.config.sections.setdefault(section, {}).update(values)
        save_config(self.config_path, self.config)
        return Workspace.open(self.home)

    # -- ledger --------------------------------------------------------------------

    def ledger(self) -> Ledger:
        """Open this node's ledger. The private key is loaded at the first write only."""
        return Ledger(
            self.ledger_path,
            log_id=self.node_id,
            public_key=self.signing_public_key,
            signing_key=self.signing_key,
            head_interval=int(self.config.get("ledger", "head_interval")),
        )

    # -- creation ------------------------------------------------------------------

    @classmethod
    def open(cls, home: Path | str | None = None) -> Workspace:
        """Open an existing workspace.

        Raises:
            WorkspaceNotFoundError: no workspace at ``home``.
            ConfigError: its config is corrupt or invalid.

        """
        path = resolve_home(home)
        if not (path / "config.toml").is_file():
            raise WorkspaceNotFoundError(
                f"no insitu workspace at {path}: run 'insitu init' there first, or pass "
                f"--home (or set {HOME_ENV}) to the workspace you meant"
            )
        return cls(home=path, config=load_config(path / "config.toml"))

    @classmethod
    def init(
        cls,
        home: Path | str | None = None,
        *,
        name: str | None = None,
        passphrase: str | None = None,
    ) -> tuple[Workspace, bool]:
        """Create a workspace, or open the existing one. Returns it and whether it is new.

        The passphrase (default: ``INSITU_PASSPHRASE``) encrypts the private keys; without
        one they are stored in the clear (0600) and a warning is logged.

        Raises:
            WorkspaceNotWritableError: ``home`` cannot be created.
            WorkspaceError: ``home`` exists, is not empty, and is not a workspace.

        """
        path = resolve_home(home)
        if (path / "config.toml").exists():
            return cls.open(path), False
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise WorkspaceError(
                f"{path} exists and is not an insitu workspace; choose another --home or remove it"
            )
        passphrase = passphrase or passphrase_from_env()
        if not passphrase and not _warned["unencrypted"]:
            # Once per process: a simulation creates a workspace per site.
            _warned["unencrypted"] = True
            logger.warning(
                "INSITU_PASSPHRASE is not set: private keys will be stored unencrypted "
                "(mode 0600). Set it before 'insitu init' on any machine that holds real data."
            )
        created_parents = _make_parents(path.absolute().parent)
        try:
            staging = Path(
                tempfile.mkdtemp(prefix=f".{path.name}.init-", dir=path.absolute().parent)
            )
        except OSError as exc:
            _remove_dirs(created_parents)
            raise WorkspaceNotWritableError(
                f"cannot create the workspace at {path}: {exc.strerror}; choose a writable "
                f"--home (or {HOME_ENV})"
            ) from exc
        try:
            _populate(
                staging, name=name or path.absolute().parent.name or "node", passphrase=passphrase
            )
            if path.exists():
                path.rmdir()  # empty, checked above
            staging.rename(path)
            fsync_dir(path.absolute().parent)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            _remove_dirs(created_parents)
            raise WorkspaceNotWritableError(
                f"cannot create the workspace at {path}: {exc.strerror or exc}; choose a "
                f"writable --home (or {HOME_ENV})"
            ) from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            _remove_dirs(created_parents)
            raise
        return cls.open(path), True


def _populate(root: Path, *, name: str, passphrase: str | None) -> None:
    """Write a complete workspace into the (temporary) directory ``root``."""
    keys = root / "keys"
    keys.mkdir(mode=0o700)
    signing = Ed25519PrivateKey.generate()
    encryption = X25519PrivateKey.generate()
    save_private_key(keys / "signing.key", signing, passphrase)
    save_public_key(keys / "signing.pub.pem", signing.public_key())
    save_private_key(keys / "encryption.key", encryption, passphrase)
    save_public_key(keys / "encryption.pub.pem", encryption.public_key())
    atomic_write_text(keys / "api-token", secrets.token_urlsafe(32) + "\n", mode=0o600)
    create_secret(keys / "pseudonym.key", passphrase)
    create_secret(keys / "data.key", passphrase)
    node_id = node_id_for(signing.public_key())
    config = Config(
        {
            "node": {"id": node_id, "name": name, "created": utc_now()},
            "ledger": {"head_interval": 256},
            "server": {"host": "127.0.0.1", "port": 8765},
        }
    )
    save_config(root / "config.toml", config)
    with Ledger(
        root / "ledger.db", log_id=node_id, public_key=signing.public_key(), signing_key=signing
    ) as ledger:
        events.WORKSPACE_INIT.record(
            ledger,
            node=node_id,
            name=name,
            insitu_version=insitu.__version__,
            keys_encrypted=bool(passphrase),
        )
        ledger.sign_head()
    # Closing the last connection checkpoints the WAL into ledger.db and removes it, so
    # the directory is renamed with a self-contained database.


def _make_parents(parent: Path) -> list[Path]:
    """Create missing parent directories; return those created, deepest first."""
    missing: list[Path] = []
    probe = parent
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except OSError as exc:
            _remove_dirs([d for d in missing if d.exists()])
            raise WorkspaceNotWritableError(
                f"cannot create {directory}: {exc.strerror}; choose a writable --home "
                f"(or {HOME_ENV})"
            ) from exc
    return missing


def _remove_dirs(directories: list[Path]) -> None:
    for directory in directories:  # deepest first
        with contextlib.suppress(OSError):
            directory.rmdir()
