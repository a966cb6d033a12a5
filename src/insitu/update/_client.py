"""The device's update client: python-tuf's ``ngclient.Updater``, then insitu's checks.

One :meth:`UpdateClient.update` is, in order (each step refuses rather than guesses):

1. ``Updater.refresh()``: root -> timestamp -> snapshot -> targets, with TUF's checks
   (signatures and thresholds, expiry, version rollback, snapshot consistency);
2. the device pointer ``devices/<key id>/<model>.json``, else the channel pointer, both
   downloaded through the Updater (length and hash from signed metadata);
3. a version equal to the installed one is "up to date", one rolled back from on this
   device is "held" (not reinstalled); an *older* one is a
   :class:`~insitu.errors.RollbackError`, even though it is validly signed;
4. the delta from the installed version, when the pointer offers one, is downloaded and
   applied; the rebuilt bundle must have the length and SHA-256 that signed metadata
   gives for the *full* bundle, else the delta is refused (recorded) and the full
   bundle is downloaded instead;
5. the bundle's own signature is checked against the publisher keys listed in the
   trusted root, it is decrypted with this device's key and the model digest checked;
6. A/B install (:mod:`insitu.update._slots`), then the ledger records it.

Every download, install, refusal and rollback is recorded in the ledger (figures and
ids only). Nothing is written to the trusted metadata or the slots unless every check
before it passed; tests assert that for each attack.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from insitu._atomic import atomic_write_bytes
from insitu._canonical import canonical_bytes
from insitu._clock import utc_now
from insitu.audit import Ledger, events
from insitu.bundle import (
    Bundle,
    BundleVerifier,
    OpenedBundle,
    SemVer,
    apply_bundle_delta,
    device_key_id,
    load_session,
)
from insitu.errors import (
    BundleError,
    InstallError,
    MixAndMatchError,
    NotEnrolledError,
    RepositoryError,
    RollbackError,
    UpdateError,
    UpdateInProgressError,
    UsageError,
)
from insitu.update._refusals import tuf_refusals
from insitu.update._repository import PUBLISHERS_FIELD, bundle_path, channel_path, device_path
from insitu.update._slots import SlotInfo, SlotStore

__all__ = ["ClientConfig", "UpdateClient", "is_local_version"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientConfig:
    """Where the device updates from and what it runs."""

    metadata_url: str
    targets_url: str
    model: str
    channel: str

    def to_json(self) -> dict[str, str]:
        """As stored in ``config.json``."""
        return {
            "metadata_url": self.metadata_url,
            "targets_url": self.targets_url,
            "model": self.model,
            "channel": self.channel,
        }


def is_local_version(version: str) -> bool:
    """A version made on this device (``MAJOR.MINOR.PATCH-local.N``, ``insitu finetune``)."""
    return SemVer.parse(version).prerelease[:1] == ("local",)


class UpdateClient:
    """Updates, rolls back and loads the model of one device.

    ``directory`` holds ``config.json``, the enrolled ``root.json`` (the trust anchor),
    ``metadata/`` (TUF's trusted metadata), ``slots/`` and ``downloads/``. ``fetcher``
    replaces HTTP (the tests' in-memory repository simulator).
    """

    def __init__(
        self,
        directory: Path,
        *,
        device_key: X25519PrivateKey,
        ledger: Ledger | None = None,
        fetcher: FetcherInterface | None = None,
        local_publisher: Ed25519PublicKey | None = None,
    ) -> None:
        self.directory = Path(directory)
        # The device's own signing key, trusted for *local* versions only (fine-tuned
        # here, ``insitu finetune``): see ADR 0603. Repository downloads never use it.
        self.local_publisher = local_publisher
        self.device_key = device_key
        self.ledger = ledger
        self.fetcher = fetcher
        if not (self.directory / "config.json").is_file():
            raise NotEnrolledError(
                f"this device is not enrolled for updates ({self.directory / 'config.json'} "
                "is missing); run 'insitu update enroll --root ROOT.json --url URL --model NAME'"
            )
        doc = json.loads((self.directory / "config.json").read_text(encoding="utf-8"))
        self.config = ClientConfig(**doc)
        self.slots = SlotStore(self.directory / "slots")

    # -- enrollment ----------------------------------------------------------------

    @classmethod
    def enroll(
        cls,
        directory: Path,
        *,
        root: bytes,
        url: str,
        model: str,
        channel: str = "stable",
        metadata_url: str | None = None,
        targets_url: str | None = None,
        ledger: Ledger | None = None,
        device_key_id: str | None = None,
    ) -> ClientConfig:
        """Trust ``root`` (obtained out of band) and remember where to update from.

        With ``ledger``, the enrolment is recorded there (``update.enrolled``, with the
        device's key id).

        Raises:
            RepositoryError: ``root`` is not valid TUF root metadata.

        """
        directory = Path(directory)
        try:
            md = Metadata[Root].from_bytes(root)
            if not isinstance(md.signed, Root):
                raise TypeError("not root metadata")
            md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
        except (ValueError, TypeError, KeyError, tuf_exc.RepositoryError) as exc:
            raise RepositoryError(
                f"the root file is not valid, self-signed TUF root metadata ({exc}); use the "
                "public/metadata/1.root.json of the repository"
            ) from exc
        base = url.rstrip("/")
        config = ClientConfig(
            metadata_url=metadata_url or f"{base}/metadata/",
            targets_url=targets_url or f"{base}/targets/",
            model=model,
            channel=channel,
        )
        (directory / "metadata").mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / "root.json", root)
        atomic_write_bytes(directory / "config.json", canonical_bytes(config.to_json()) + b"\n")
        if ledger is not None:
            events.UPDATE_ENROLLED.record(
                ledger, model=model, channel=channel, device_key_id=device_key_id or ""
            )
        return config

    # -- helpers -------------------------------------------------------------------

    @property
    def metadata_dir(self) -> Path:
        """TUF's trusted metadata."""
        return self.directory / "metadata"

    def _updater(self) -> Updater:
        downloads = self.directory / "downloads"
        downloads.mkdir(exist_ok=True)
        for stale in downloads.iterdir():
            with contextlib.suppress(OSError):
                stale.unlink()
        return Updater(
            str(self.metadata_dir),
            self.config.metadata_url,
            str(downloads),
            self.config.targets_url,
            fetcher=self.fetcher,
            bootstrap=(self.directory / "root.json").read_bytes(),
        )

    def _record(self, event: events.Event, **payload: Any) -> None:
        if self.ledger is not None:
            event.record(self.ledger, **payload)

    def _publishers(self) -> list[Ed25519PublicKey]:
        # root.json in the metadata directory is written by the Updater only after it
        # verified it (chain of signatures from the enrolled root), so it is trusted.
        md = Metadata[Root].from_bytes((self.metadata_dir / "root.json").read_bytes())
        raw = md.signed.unrecognized_fields.get(PUBLISHERS_FIELD, [])
        keys = [Ed25519PublicKey.from_public_bytes(bytes.fromhex(k)) for k in raw]
        if not keys:
            raise RepositoryError(
                "the repository's root lists no publisher key; recreate it with "
                "'insitu repo init' from the publisher's workspace"
            )
        return keys

    def verifier(self) -> BundleVerifier:
        """A verifier for bundles from the publishers the trusted root lists."""
        return BundleVerifier(self._publishers())

    def slot_verifier(self, info: SlotInfo) -> BundleVerifier:
        """The verifier of an installed slot: the device's own key for a local version."""
        if self.local_publisher is not None and is_local_version(info.version):
            return BundleVerifier([self.local_publisher])
        return self.verifier()

    def _download(self, updater: Updater, info: TargetFile, kind: str) -> bytes:
        part = self.directory / "downloads" / f"{uuid.uuid4().hex}.part"
        with tuf_refusals(f"download of {info.path}"):
            updater.download_target(info, filepath=str(part))
        try:
            return part.read_bytes()
        finally:
            part.unlink()
            # Pointers are fetched at every check (e.g. hourly): recording them would
            # bury the downloads that matter, bundles and deltas.
            if kind != "pointer":
                self._record(
                    events.UPDATE_DOWNLOADED,
                    model=self.config.model,
                    target=info.path,
                    kind=kind,
                    length=info.length,
                )

    @contextlib.contextmanager
    def _recording_refusals(self, action: str) -> Iterator[None]:
        try:
            yield
        except (UpdateError, BundleError) as exc:
            self._record(
                events.UPDATE_REFUSED,
                model=self.config.model,
                action=action,
                reason=type(exc).__name__,
            )
            raise

    # -- the update ----------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        # python-tuf's Updater supports one instance per metadata directory, and two
        # installs must not race for the inactive slot: one process at a time.
        with (self.directory / ".lock").open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UpdateInProgressError(
                    f"another update or rollback of {self.directory} is running; wait for it "
                    "to finish and try again"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def update(self, *, channel: str | None = None, check_only: bool = False) -> dict[str, Any]:
        """Refresh, download (delta or full), verify, install. See the module docstring.

        ``check_only`` stops after the pointer: status ``"available"`` names the version
        that an update would install (the metadata refresh is still a full TUF refresh).
        """
        with self._exclusive(), self._recording_refusals("update"):
            return self._update(channel or self.config.channel, check_only=check_only)

    def _pointer(self, updater: Updater, channel: str) -> tuple[str, dict[str, Any]]:
        model = self.config.model
        device = device_path(device_key_id(self.device_key.public_key()), model)
        with tuf_refusals("metadata refresh"):
            updater.refresh()
            info = updater.get_targetinfo(device)
            path = device
            if info is None:
                path = channel_path(channel, model)
                info = updater.get_targetinfo(path)
        if info is None:
            raise RepositoryError(
                f"the repository publishes no model {model!r} on channel {channel!r}; check "
                "--channel and the model name given at enrollment"
            )
        try:
            pointer = json.loads(self._download(updater, info, "pointer"))
            if not isinstance(pointer, dict):
                raise TypeError("not an object")
            for key in ("version", "bundle"):
                if not isinstance(pointer.get(key), str):
                    raise TypeError(f"{key} is missing")
            if not isinstance(pointer.get("deltas", {}), dict):
                raise TypeError("deltas is not an object")
            SemVer.parse(pointer["version"])
            # A pointer may name only the bundle of its own model and version.
            if pointer["bundle"] != bundle_path(model, pointer["version"]):
                raise ValueError(f"it names {pointer['bundle']} for {model} {pointer['version']}")
        except (ValueError, TypeError, UsageError) as exc:
            raise RepositoryError(
                f"{path} is not a valid pointer ({exc}); the repository is misconfigured"
            ) from exc
        return path, pointer

    def _update(self, channel: str, *, check_only: bool = False) -> dict[str, Any]:
        updater = self._updater()
        pointer_path, pointer = self._pointer(updater, channel)
        installed = self.slots.active()
        version = str(pointer["version"])
        if is_local_version(version):
            # "-local.N" names versions made on a device (insitu finetune), which its own
            # key verifies; a repository never serves one.
            raise RepositoryError(
                f"{pointer_path} offers {version}, a device-local version name; the "
                "publisher must release it under a plain version"
            )
        result: dict[str, Any] = {
            "model": self.config.model,
            "pointer": pointer_path,
            "available": version,
            "installed_before": installed.version if installed else None,
        }
        if version in self.slots.held():
            return result | {
                "status": "held",
                "installed": installed.version if installed else None,
            }
        if installed is not None:
            if SemVer.parse(version) == SemVer.parse(installed.version):
                return result | {"status": "up-to-date", "installed": installed.version}
            if SemVer.parse(version) < SemVer.parse(installed.version):
                if is_local_version(installed.version):
                    # A local fine-tune of the offered release (or of a later one):
                    # nothing to install until the repository offers a newer release.
                    return result | {"status": "local", "installed": installed.version}
                raise RollbackError(
                    f"{pointer_path} offers {version}, older than the installed "
                    f"{installed.version}; downgrades are refused (the operator publishes "
                    "the old model again as a new version)"
                )
        if check_only:
            return result | {
                "status": "available",
                "installed": installed.version if installed else None,
            }
        with tuf_refusals("metadata refresh"):
            bundle_info = updater.get_targetinfo(str(pointer["bundle"]))
        if bundle_info is None:
            raise RepositoryError(f"the pointer names {pointer['bundle']}, which is not published")
        data, method = None, "full"
        deltas = pointer.get("deltas") or {}
        if installed is not None and installed.version in deltas:
            data = self._via_delta(updater, installed, str(deltas[installed.version]), bundle_info)
            method = "delta" if data is not None else "full"
        if data is None:
            data = self._download(updater, bundle_info, "bundle")
        opened = self.verifier().open(Bundle.parse(data), self.device_key)
        if opened.bundle.name != self.config.model or opened.bundle.version != version:
            raise MixAndMatchError(
                f"{pointer_path} names {self.config.model} {version} but the bundle is "
                f"{opened.bundle.name} {opened.bundle.version}; refused"
            )
        if not opened.bundle.encrypted:
            logger.warning(
                "installing %s %s, which is NOT encrypted: the model is stored in the clear "
                "on this device; ask the publisher to encrypt it for this device's key",
                opened.bundle.name,
                opened.bundle.version,
            )
        info = self._install(data, opened)
        return result | {
            "status": "installed",
            "installed": info.version,
            "method": method,
            "slot": info.slot,
        }

    def _via_delta(
        self, updater: Updater, installed: SlotInfo, path: str, bundle_info: TargetFile
    ) -> bytes | None:
        with tuf_refusals("metadata refresh"):
            delta_info = updater.get_targetinfo(path)
        if delta_info is None:
            return None
        try:
            delta = self._download(updater, delta_info, "delta")
            old_bundle = self.slots.read(installed)
            old = self.verifier().open(Bundle.parse(old_bundle), self.device_key)
            rebuilt = apply_bundle_delta(old_bundle, old.model, delta, self.device_key)
            with tuf_refusals(f"delta {path}"):
                bundle_info.verify_length_and_hashes(rebuilt)
        except Exception as exc:  # noqa: BLE001 -- any failure of the optional delta path
            # falls back to the full bundle, which is verified from scratch.
            logger.warning("delta %s refused (%s); downloading the full bundle", path, exc)
            self._record(
                events.UPDATE_DELTA_REFUSED,
                model=self.config.model,
                target=path,
                reason=type(exc).__name__,
            )
            return None
        return rebuilt

    def _install(self, data: bytes, opened: OpenedBundle) -> SlotInfo:
        before = self.slots.active()
        try:
            info = self.slots.install(
                data,
                name=opened.bundle.name,
                version=opened.bundle.version,
                bundle_id=opened.bundle.bundle_id,
                now=utc_now(),
            )
        except OSError as exc:
            raise InstallError(f"cannot write the install slot ({exc}); check disk space") from exc
        self._record(
            events.UPDATE_INSTALLED,
            model=info.name,
            version=info.version,
            previous=before.version if before else None,
            slot=info.slot,
            bundle_sha256=info.sha256,
            republishes=opened.card.republishes,
        )
        return info

    # -- rollback and loading ------------------------------------------------------

    def rollback(self) -> dict[str, Any]:
        """Return to the previous slot (local, no network)."""
        with self._exclusive(), self._recording_refusals("rollback"):
            now, was = self.slots.rollback()
        self._record(
            events.UPDATE_ROLLED_BACK,
            model=now.name,
            version=now.version,
            from_version=was.version,
            slot=now.slot,
        )
        return {"model": now.name, "active": now.version, "was": was.version, "slot": now.slot}

    def load(self) -> OpenedBundle:
        """The active bundle, verified and decrypted (in memory only)."""
        info = self.slots.active()
        if info is None:
            raise InstallError("no model is installed on this device; run 'insitu update'")
        data = self.slots.read(info)
        # The slot digest was checked; the AEAD tags and the signed model digest bind
        # the rest, so the ciphertext digest is not computed a second time.
        return self.slot_verifier(info).open(
            Bundle.parse(data), self.device_key, check_payload=False
        )

    def session(
        self, *, intra_op_threads: int | None = None, spinning: bool = True
    ) -> tuple[Bundle, Any]:
        """The active bundle, verified, and an ONNX Runtime session of its model."""
        info = self.slots.active()
        if info is None:
            raise InstallError("no model is installed on this device; run 'insitu update'")
        # The signature and the model digest are checked while loading; the bundle id
        # check makes sure the slot still holds the bundle that was installed (and not
        # another validly signed one, e.g. an older version copied over it).
        bundle, session = load_session(
            self.slots.slot_path(info.slot),
            self.slot_verifier(info),
            self.device_key,
            intra_op_threads=intra_op_threads,
            spinning=spinning,
        )
        if bundle.bundle_id != info.bundle_id:
            raise InstallError(
                f"slot {info.slot} no longer holds {info.name} {info.version} (bundle id "
                "differs); reinstall with 'insitu update'"
            )
        return bundle, session

    def status(self) -> dict[str, Any]:
        """The configuration and the two slots."""
        active, previous = self.slots.active(), self.slots.previous()
        return {
            "config": self.config.to_json(),
            "active": active.to_json() | {"slot": active.slot} if active else None,
            "previous": previous.to_json() | {"slot": previous.slot} if previous else None,
            "device_key_id": device_key_id(self.device_key.public_key()),
        }
