"""A workspace: one node's home directory with its config, identity, ledger and layout.

The home is ``./.insitu`` by default (``--home`` or ``INSITU_HOME`` elsewhere); every
path under it is named by :class:`Workspace` (the tree is drawn in its docstring), so no
other package spells one.

Invariants: a workspace is created whole or not at all (built in a temporary sibling
directory, then renamed into place), and the keys of an existing workspace are never
overwritten: ``init`` on a workspace opens it and says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

import insitu
from insitu._atomic import atomic_write_text, fsync_dir
from insitu._clock import utc_now
from insitu._home import HOME_ENV
from insitu._signer import Signer, SigningPublicKey, algorithm_of
from insitu.audit import Ledger, events, node_id_for
from insitu.errors import (
    InsituError,
    KeyFileError,
    UsageError,
    WorkspaceError,
    WorkspaceNotFoundError,
    WorkspaceNotWritableError,
)
from insitu.workspace._config import Config, load_config, save_config
from insitu.workspace._keys import (
    create_private_key,
    create_secret,
    load_private_key,
    load_secret,
    passphrase_from_env,
    save_private_key,
    save_public_key,
)
from insitu.workspace._pkcs11 import (
    KEY_ALGORITHMS,
    TokenDecryptionKey,
    TokenKey,
    TokenKeyUri,
    TokenRsaDecryptionKey,
    decryption_uri_for,
    destroy_token_keys,
    generate_token_decryption_key,
    generate_token_key,
    generate_token_rsa_decryption_key,
    offers_rsa_oaep,
    open_token_decryption_key,
    open_token_key,
    pin_from_env,
)
from insitu.workspace._wrapped import TokenSeal

__all__ = [
    "DEFAULT_HOME",
    "HOME_ENV",
    "PreparedPart",
    "Workspace",
    "WorkspaceLayout",
    "resolve_home",
]

logger = logging.getLogger(__name__)

_warned = {"unencrypted": False}
DEFAULT_HOME = Path(".insitu")


PreparedPart: TypeAlias = Literal["train", "test"]
"""The two parts a site's records are prepared in for training: its own and held-out."""


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """The workspace home: ``home`` if given, else ``$INSITU_HOME``, else ``./.insitu``."""
    if home is not None:
        return Path(home).expanduser()
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else DEFAULT_HOME


@dataclass(frozen=True)
class WorkspaceLayout:
    """The paths of a workspace's home, drawn as a tree in :class:`Workspace`.

    Needs no config: it names the paths of a home that is not opened yet, or not a
    workspace yet (``Workspace.layout(home)``). Naming a path creates nothing.
    """

    home: Path

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

    # -- data ----------------------------------------------------------------------

    def prepared_dir(self, dataset: str) -> Path:
        """Where the sealed releases of ``dataset`` prepared at this site are."""
        return self.home / "prepared" / dataset

    def prepared_part(self, dataset: str, part: PreparedPart) -> Path:
        """The site's own (``train``) or held-out (``test``) records of ``dataset``."""
        return self.prepared_dir(dataset) / part

    # -- models and runs -----------------------------------------------------------

    @property
    def models_dir(self) -> Path:
        """The directory of the models trained here, one directory per run."""
        return self.home / "models"

    def model_dir(self, run_id: str) -> Path:
        """The model of run ``run_id``: its PyTorch state, ONNX export and features."""
        return self.models_dir / run_id

    def run_events_path(self, run_id: str) -> Path:
        """A site's DP-SGD event of run ``run_id``, fixed on the run's first round."""
        return self.home / "runs" / f"{run_id}.json"

    def finetune_weights_path(self, model: str, version: str) -> Path:
        """The weights of ``version`` of ``model``, fine-tuned on this device."""
        return self.home / "finetune" / model / f"{version}.npz"

    # -- federation ----------------------------------------------------------------

    @property
    def federation_dir(self) -> Path:
        """The state of a deployed federation (``insitu federate server|site``)."""
        return self.home / "federation"

    @property
    def site_setup_path(self) -> Path:
        """A site's set-up, read by every ClientApp its SuperNode starts."""
        return self.federation_dir / "site.json"

    @property
    def supernode_log_path(self) -> Path:
        """The output of a site's SuperNode."""
        return self.federation_dir / "supernode.log"

    @property
    def runs_done_dir(self) -> Path:
        """A site's markers of the runs it finished, one file named after each run."""
        return self.federation_dir / "done"

    def deployed_run_dir(self, run_id: str) -> Path:
        """The server's side of run ``run_id``: its plan, progress and result."""
        return self.federation_dir / "runs" / run_id

    @property
    def flower_app_dir(self) -> Path:
        """The Flower app a server ships to its sites."""
        return self.federation_dir / "app"

    @property
    def flower_home(self) -> Path:
        """``FLWR_HOME`` of the Flower processes this node starts."""
        return self.federation_dir / "flwr"

    @property
    def sites_dir(self) -> Path:
        """The workspaces of a simulation's sites, under its coordinator."""
        return self.home / "sites"

    def site_home(self, site: str) -> Path:
        """The home of the simulated site ``site``."""
        return self.sites_dir / site

    # -- operations ----------------------------------------------------------------

    @property
    def update_dir(self) -> Path:
        """The update client's state: trusted metadata, slots (``insitu update``)."""
        return self.home / "update"

    @property
    def privacy_dir(self) -> Path:
        """The evidence of the per-subject privacy budget."""
        return self.home / "privacy"

    @property
    def drift_dir(self) -> Path:
        """The drift monitor's saved counts, one file per model version."""
        return self.home / "drift"

    @property
    def reports_dir(self) -> Path:
        """The directory of reports written here."""
        return self.home / "reports"

    def report_dir(self, name: str) -> Path:
        """The report ``name`` (an audit's JSON, plot and evidence)."""
        return self.reports_dir / name


@dataclass(frozen=True)
class Workspace(WorkspaceLayout):
    """An opened workspace. Create with :meth:`init` or :meth:`open`.

    Its home, each path named by a property or method of the same name::

        <home>/
        ├── config.toml                   config_path: validated configuration
        ├── ledger.db                     ledger_path: the audit ledger (insitu.audit)
        ├── keys/                         keys_dir, 0700:
        │   ├── signing.key               Ed25519 private key, 0600, scrypt-encrypted
        │   ├── signing.pub.pem           its public half
        │   ├── encryption.key            X25519 private key bundles are sent to, 0600
        │   │                               (absent when it is a P-256 key in a token)
        │   ├── encryption.pub.pem        its public half (X25519, or P-256)
        │   ├── model-signing.key         ECDSA P-256 key of OpenSSF model signatures,
        │   │                               0600, made at the first bundle (ADR 0105)
        │   ├── model-signing.pub.pem     its public half (shipped in every bundle)
        │   ├── api-token                 bearer token of the localhost API, 0600
        │   ├── pseudonym.key             site secret: HMAC key of pseudonymization, 0600
        │   └── data.key                  site secret: AES-256-GCM key of caches, 0600
        ├── prepared/<dataset>/           prepared_dir: sealed releases (insitu.data)
        │   └── train/, test/             prepared_part: a site's own and held-out records
        ├── models/                       models_dir
        │   └── <run id>/                 model_dir: model.pt, model.onnx, features.json,
        │                                   record.json, optimized/
        ├── runs/<run id>.json            run_events_path: a site's DP-SGD event of a run
        ├── finetune/<model>/<v>.npz      finetune_weights_path: local fine-tuned weights
        ├── federation/                   federation_dir: a deployment (insitu.federated)
        │   ├── site.json                 site_setup_path
        │   ├── supernode.log             supernode_log_path
        │   ├── done/<run id>             runs_done_dir: runs the site finished
        │   ├── runs/<run id>/            deployed_run_dir: plan.json, progress, result
        │   ├── app/                      flower_app_dir: the app the server ships
        │   └── flwr/                     flower_home: FLWR_HOME of Flower's processes
        ├── sites/<site>/                 site_home: a simulation's site workspaces
        ├── update/                       update_dir: the update client (insitu.update)
        ├── privacy/                      privacy_dir: per-subject budget evidence
        ├── drift/                        drift_dir: the drift monitor's saved counts
        └── reports/<name>/               report_dir: audit reports

    What is inside ``update/``, ``privacy/``, ``drift/`` and a model's directory belongs
    to the package that writes there.
    """

    config: Config
    # The signing key once unlocked through this object (scrypt costs 0.1 s and 32 MiB
    # each time: a server's runtime, drift monitor and usage ledgers wrote with a key
    # unlocked three times). It lives as long as the object, as a ledger's key does.
    _unlocked: dict[str, Signer] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # The decryption key in a token, once opened (a PKCS#11 session of this object).
    _agreement: dict[str, TokenDecryptionKey | TokenRsaDecryptionKey] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # The site secrets once opened through this object (one ECDH or OAEP decryption in
    # the token each, or one scrypt, instead of one per caller), by name and passphrase:
    # another passphrase is checked again.
    _secrets: dict[tuple[str, str], bytes] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    # -- paths (the rest are WorkspaceLayout's) ------------------------------------

    @staticmethod
    def layout(home: str | os.PathLike[str]) -> WorkspaceLayout:
        """The paths of the workspace at ``home``, without opening it (it need not exist)."""
        return WorkspaceLayout(Path(home))

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
    def signing_public_key(self) -> SigningPublicKey:
        """The public key that verifies this node's ledger and bundles.

        Ed25519, or ECDSA P-256 when the key was made in a token without Ed25519 (a TPM).
        """
        key = self._public("signing.pub.pem")
        if isinstance(key, Ed25519PublicKey) or (
            isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
        ):
            return key
        raise KeyFileError(
            f"{self.keys_dir / 'signing.pub.pem'} is not an Ed25519 or ECDSA P-256 key"
        )

    @property
    def encryption_public_key(
        self,
    ) -> X25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        """The public key that bundles are encrypted to.

        X25519 (a file), or a key in a token: P-256 (ECDH there) or RSA of 2048 bits or
        more (OAEP there; a TPM).
        """
        key = self._public("encryption.pub.pem")
        if (
            isinstance(key, X25519PublicKey)
            or (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1")
            or (isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048)
        ):
            return key
        raise KeyFileError(
            f"{self.keys_dir / 'encryption.pub.pem'} is not an X25519, P-256 or RSA "
            "(2048 bits or more) key"
        )

    @property
    def decryption_algorithm(self) -> str:
        """The node's bundle recipient kind: ``x25519``, ``p256-ecdh``, ``rsa-oaep-sha256``."""
        key = self.encryption_public_key
        if isinstance(key, rsa.RSAPublicKey):
            return "rsa-oaep-sha256"
        return "p256-ecdh" if isinstance(key, ec.EllipticCurvePublicKey) else "x25519"

    @property
    def decryption_key_uri(self) -> str | None:
        """The PKCS#11 URI of the decryption key when it lives in a token, else ``None``."""
        uri = str(self.config.get("keys", "decryption"))
        return uri or None

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

    @property
    def signing_key_uri(self) -> str | None:
        """The PKCS#11 URI of the signing key when it lives in a token, else ``None``."""
        uri = str(self.config.get("keys", "signing"))
        return uri or None

    def signing_key(self, passphrase: str | None = None) -> Signer:
        """The Ed25519 signing key (passphrase from ``INSITU_PASSPHRASE`` by default).

        A key in a token (``keys.signing`` is a PKCS#11 URI) is opened there with the PIN
        in ``INSITU_PKCS11_PIN``; it signs inside the token. Unlocked once per
        :class:`Workspace` object when the secret comes from the environment; a
        passphrase given here is checked again each time.
        """
        if passphrase is None and "signing" in self._unlocked:
            return self._unlocked["signing"]
        key: Signer
        if self.signing_key_uri is not None:
            uri = TokenKeyUri.parse(
                self.signing_key_uri, module=str(self.config.get("keys", "pkcs11_module")) or None
            )
            key = open_token_key(uri, pin_from_env())
            where = str(uri)
        else:
            loaded = load_private_key(
                self.keys_dir / "signing.key", "ed25519", passphrase or passphrase_from_env()
            )
            assert isinstance(loaded, Ed25519PrivateKey)
            key, where = loaded, "keys/signing.key"
        if node_id_for(key.public_key()) != self.node_id:
            raise KeyFileError(f"{where} does not match keys/signing.pub.pem")
        if passphrase is None:
            self._unlocked["signing"] = key
        return key

    def encryption_key(
        self, passphrase: str | None = None
    ) -> X25519PrivateKey | TokenDecryptionKey | TokenRsaDecryptionKey:
        """The private key that decrypts bundles sent to this node.

        X25519 in ``keys/encryption.key``, or (``keys.decryption`` is a PKCS#11 URI) the
        P-256 or RSA key in the token, opened with the PIN in ``INSITU_PKCS11_PIN`` (once
        per :class:`Workspace` object): its ECDH or OAEP decryption happens in the token.

        Raises:
            TokenKeyNotFoundError: the token holds no such key (another machine's token).
            KeyFileError: the token's key is not the one of ``keys/encryption.pub.pem``.

        """
        if self.decryption_key_uri is not None:
            return self._token_decryption_key()
        key = load_private_key(
            self.keys_dir / "encryption.key", "x25519", passphrase or passphrase_from_env()
        )
        assert isinstance(key, X25519PrivateKey)
        return key

    def _token_decryption_key(self) -> TokenDecryptionKey | TokenRsaDecryptionKey:
        if "decryption" in self._agreement:
            return self._agreement["decryption"]
        uri = TokenKeyUri.parse(
            str(self.decryption_key_uri),
            module=str(self.config.get("keys", "pkcs11_module")) or None,
        )
        # The signing key's session when it is open and in the same token: one session
        # per token (the key itself is checked against keys/encryption.pub.pem below).
        signing = self._unlocked.get("signing")
        beside = signing if isinstance(signing, TokenKey) else None
        key = open_token_decryption_key(uri, pin_from_env(), beside=beside)
        if key.public_key() != self.encryption_public_key:
            raise KeyFileError(f"{uri} does not match keys/encryption.pub.pem")
        self._agreement["decryption"] = key
        return key

    def secret(self, name: Literal["pseudonym", "data"], passphrase: str | None = None) -> bytes:
        """A site secret (created on first use in workspaces older than it).

        When the decryption key is in a token (``keys.decryption``), a secret made there
        is sealed to it and opened in the token (``insitu.workspace._wrapped``): a copy
        of the workspace without the token cannot read it. Opened once per
        :class:`Workspace` object (and passphrase).

        Raises:
            KeyFileError: the file is missing, corrupt, or sealed to another token key.
            TokenKeyNotFoundError: the token holds no such key (another machine's token).

        """
        passphrase = passphrase or passphrase_from_env()
        if (name, passphrase or "") in self._secrets:
            return self._secrets[name, passphrase or ""]
        path = self.keys_dir / f"{name}.key"
        seal = TokenSeal(self._token_decryption_key) if self.decryption_key_uri else None
        if not path.exists() and create_secret(path, passphrase, seal):
            logger.info("created site secret %s", path)
        secret = self._secrets[name, passphrase or ""] = load_secret(path, passphrase, seal)
        return secret

    def model_signing_key(self, passphrase: str | None = None) -> ec.EllipticCurvePrivateKey:
        """The ECDSA P-256 key of the OpenSSF model signatures of bundles (ADR 0105).

        Created on first use, sealed like the other keys. When its public half is first
        written, ``workspace.model_signing_key`` records it and its fingerprint (SHA-256 of
        the PEM, the key hint ``model_signing`` puts in a signature) in the ledger.
        """
        path = self.keys_dir / "model-signing.key"
        passphrase = passphrase or passphrase_from_env()
        if not path.exists() and create_private_key(
            path, ec.generate_private_key(ec.SECP256R1()), passphrase
        ):
            logger.info("created the model-signing key %s", path)
        key = load_private_key(path, "ecdsa-p256", passphrase)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        public = self.keys_dir / "model-signing.pub.pem"
        if not public.exists():
            pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
            with self.ledger() as ledger:
                events.WORKSPACE_MODEL_SIGNING_KEY.record(
                    ledger,
                    node=self.node_id,
                    algorithm="ecdsa-p256-sha256",
                    fingerprint=hashlib.sha256(pem).hexdigest(),
                    public_key=pem.decode("ascii"),
                )
            save_public_key(public, key.public_key())
        return key

    def model_signing_public_pem(self) -> bytes:
        """The PEM of the model-signing public key (the key is made first if need be)."""
        path = self.keys_dir / "model-signing.pub.pem"
        if not path.exists():
            self.model_signing_key()
        try:
            return path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"cannot read {path} ({exc.strerror or exc})") from exc

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
        """Open this node's ledger. The private key is loaded at the first write only.

        The ledger ``init`` wrote must be there: a missing or emptied one is refused,
        never created anew, and its verification requires the ``workspace.init`` entry.

        Raises:
            MissingLedgerError: ``ledger.db`` is missing, empty, or holds no ledger.

        """
        return Ledger(
            self.ledger_path,
            log_id=self.node_id,
            public_key=self.signing_public_key,
            signing_key=self.signing_key,
            head_interval=int(self.config.get("ledger", "head_interval")),
            genesis=events.WORKSPACE_INIT.name,
        )

    # -- creation ------------------------------------------------------------------

    @classmethod
    def open(cls, home: str | os.PathLike[str] | None = None) -> Workspace:
        """Open an existing workspace.

        Raises:
            WorkspaceNotFoundError: no workspace at ``home``.
            ConfigError: its config is corrupt or invalid.

        """
        path = resolve_home(home)
        config_path = cls.layout(path).config_path
        if not config_path.is_file():
            raise WorkspaceNotFoundError(
                f"no insitu workspace at {path}: run 'insitu init' there first, or pass "
                f"--home (or set {HOME_ENV}) to the workspace you meant"
            )
        return cls(home=path, config=load_config(config_path))

    @classmethod
    def init(
        cls,
        home: str | os.PathLike[str] | None = None,
        *,
        name: str | None = None,
        passphrase: str | None = None,
        key_uri: str | None = None,
        pkcs11_module: str | None = None,
        pin: str | None = None,
        key_algorithm: str | None = None,
    ) -> tuple[Workspace, bool]:
        """Create a workspace, or open the existing one. Returns it and whether it is new.

        ``key_uri`` (``pkcs11:token=NAME;object=LABEL``) puts the signing key in that
        PKCS#11 token, generated there (``pin``, default ``INSITU_PKCS11_PIN``);
        ``pkcs11_module`` is the token's library. The key is Ed25519 when the token has
        it, else ECDSA P-256; ``key_algorithm`` (``ed25519`` or ``p256``) forces one.

        The passphrase (default: ``INSITU_PASSPHRASE``) encrypts the private keys; without
        one they are stored in the clear (0600) and a warning is logged.

        Raises:
            WorkspaceNotWritableError: ``home`` cannot be created.
            WorkspaceError: ``home`` exists, is not empty, and is not a workspace.

        """
        path = resolve_home(home)
        token = TokenKeyUri.parse(key_uri, module=pkcs11_module) if key_uri else None
        if key_algorithm is not None and key_algorithm not in KEY_ALGORITHMS:
            raise UsageError(
                f"--key-algorithm {key_algorithm!r} is not one insitu signs with; use "
                + " or ".join(KEY_ALGORITHMS)
            )
        if key_algorithm is not None and token is None:
            raise UsageError(
                "--key-algorithm chooses the algorithm of a key made in a token; give "
                "--key-uri too (a key in a file is Ed25519)"
            )
        if cls.layout(path).config_path.exists():
            if token is not None:
                raise WorkspaceError(
                    f"{path} is already a workspace with its keys; --key-uri applies to a new "
                    "one (choose another --home)"
                )
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
                staging,
                name=name or path.absolute().parent.name or "node",
                passphrase=passphrase,
                token=token,
                pin=pin,
                key_algorithm=key_algorithm,
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


def _populate(
    root: Path,
    *,
    name: str,
    passphrase: str | None,
    token: TokenKeyUri | None,
    pin: str | None = None,
    key_algorithm: str | None = None,
) -> None:
    """Write a complete workspace into the (temporary) directory ``root``.

    With ``token``, the signing key is generated in that PKCS#11 token (PIN from
    ``INSITU_PKCS11_PIN``), and so is the bundle decryption key (labelled as the signing
    key plus ``-decrypt``): P-256 when the token has ECDH, else RSA when it has RSA-OAEP
    (a TPM), else it stays an X25519 file. Only their public halves and URIs are written
    here. If the rest fails, both keys are destroyed in the token again.
    """
    keys = Workspace.layout(root).keys_dir
    keys.mkdir(mode=0o700)
    if token is None:
        signing = Ed25519PrivateKey.generate()
        save_private_key(keys / "signing.key", signing, passphrase)
        _populate_rest(root, name=name, passphrase=passphrase, signing=signing, token=None)
        return
    pin = pin or pin_from_env()
    in_token = generate_token_key(token, pin, algorithm=key_algorithm)
    decrypting: TokenDecryptionKey | TokenRsaDecryptionKey | None = None
    try:
        if in_token.offers("CKM_ECDH1_DERIVE"):
            uri = decryption_uri_for(token)
            decrypting = generate_token_decryption_key(uri, pin, beside=in_token)
        elif offers_rsa_oaep(in_token):  # a TPM through tpm2-pkcs11: no ECDH, RSA-OAEP
            in_token, decrypting = _rsa_beside(in_token, token, pin)
        else:
            logger.warning(
                "token %r has neither CKM_ECDH1_DERIVE nor CKM_RSA_PKCS_OAEP: the bundle "
                "decryption key stays a file (keys/encryption.key, X25519); workspace.init "
                "records it",
                token.token,
            )
        _populate_rest(
            root,
            name=name,
            passphrase=passphrase,
            signing=in_token,
            token=token,
            decryption=decrypting,
        )
    except BaseException:
        # A half-made workspace must not leave its keys in the token.
        if isinstance(decrypting, TokenRsaDecryptionKey):  # reopened: found by label
            _discard_token_keys((decrypting.uri, token), pin)
            raise
        in_token.destroy()
        if decrypting is not None:
            decrypting.destroy()
        raise


def _rsa_beside(
    signing: TokenKey, token: TokenKeyUri, pin: str | None
) -> tuple[TokenKey, TokenRsaDecryptionKey]:
    """The RSA decryption key generated beside ``signing``; both reopened in one session.

    A TPM without a resource manager (swtpm; a TPM reached without tpm2-abrmd or
    /dev/tpmrm0) holds three transient objects, and tpm2-pkcs11 keeps a key it made
    loaded until its session ends: generating a second key beside the first one runs
    out of object memory. So the signing key's session is closed (the token's last one:
    that logs out and unloads), the RSA key is made in a session of its own, which is
    closed too, and both keys are opened again in one new session (loaded, they fit).
    Whatever fails on the way leaves neither key in the token.
    """
    uri = decryption_uri_for(token)
    signing.close()
    try:
        generate_token_rsa_decryption_key(uri, pin).close()
        reopened = open_token_key(token, pin)
        decrypting = open_token_decryption_key(uri, pin, beside=reopened)
        assert isinstance(decrypting, TokenRsaDecryptionKey)  # made just above
    except BaseException:
        _discard_token_keys((uri, token), pin)
        raise
    return reopened, decrypting


def _discard_token_keys(uris: tuple[TokenKeyUri, ...], pin: str | None) -> None:
    """Delete the keys ``uris`` name, found again by label (their sessions were closed)."""
    for uri in uris:
        try:
            destroy_token_keys(uri, pin)
        except InsituError:
            logger.warning("could not delete %s from its token; delete it by hand", uri)


def _populate_rest(
    root: Path,
    *,
    name: str,
    passphrase: str | None,
    signing: Signer,
    token: TokenKeyUri | None,
    decryption: TokenDecryptionKey | TokenRsaDecryptionKey | None = None,
) -> None:
    """The public keys, the other keys, the configuration and the ledger's first entry.

    Without ``decryption`` (a key in a token) the decryption key is a new X25519 file.
    """
    layout = Workspace.layout(root)
    keys = layout.keys_dir
    save_public_key(keys / "signing.pub.pem", signing.public_key())
    if decryption is None:
        encryption = X25519PrivateKey.generate()
        save_private_key(keys / "encryption.key", encryption, passphrase)
        save_public_key(keys / "encryption.pub.pem", encryption.public_key())
    else:  # P-256 or RSA (SubjectPublicKeyInfo PEM, as save_public_key writes)
        pem = decryption.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        atomic_write_text(keys / "encryption.pub.pem", pem.decode("ascii"))
    atomic_write_text(keys / "api-token", secrets.token_urlsafe(32) + "\n", mode=0o600)
    # Sealed to the token's decryption key when there is one (insitu.workspace._wrapped).
    seal = None
    if decryption is not None:
        token_key = decryption
        seal = TokenSeal(lambda: token_key)
    create_secret(keys / "pseudonym.key", passphrase, seal)
    create_secret(keys / "data.key", passphrase, seal)
    node_id = node_id_for(signing.public_key())
    sections: dict[str, dict[str, Any]] = {
        "node": {"id": node_id, "name": name, "created": utc_now()},
        "ledger": {"head_interval": 256},
        "server": {"host": "127.0.0.1", "port": 8765},
    }
    if token is not None:
        sections["keys"] = {"signing": str(token), "pkcs11_module": token.module or ""}
        if decryption is not None:
            sections["keys"]["decryption"] = str(decryption.uri)
    save_config(layout.config_path, Config(sections))
    with Ledger(
        layout.ledger_path, log_id=node_id, public_key=signing.public_key(), signing_key=signing
    ) as ledger:
        events.WORKSPACE_INIT.record(
            ledger,
            node=node_id,
            name=name,
            insitu_version=insitu.__version__,
            keys_encrypted=bool(passphrase),
            signing_key_store="file" if token is None else "pkcs11",
            signing_algorithm=algorithm_of(signing.public_key()),
            **({} if token is None else {"signing_key_uri": str(token)}),
            **_decryption_fields(decryption),
        )
        ledger.sign_head()
    # Closing the last connection checkpoints the WAL into ledger.db and removes it, so
    # the directory is renamed with a self-contained database.


def _decryption_fields(
    decryption: TokenDecryptionKey | TokenRsaDecryptionKey | None,
) -> dict[str, str]:
    """What ``workspace.init`` says of the decryption key: where, and its key agreement."""
    if decryption is None:
        return {"decryption_key_store": "file", "decryption_algorithm": "x25519"}
    return {
        "decryption_key_store": "pkcs11",
        "decryption_key_uri": str(decryption.uri),
        "decryption_algorithm": decryption.algorithm,
    }


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
