"""The device's update client: python-tuf's ``ngclient.Updater``, then insitu's checks.

One :meth:`UpdateClient.update` is, in order (each step refuses rather than guesses):

1. ``Updater.refresh()``: root -> timestamp -> snapshot -> targets, with TUF's checks
   (signatures and thresholds, expiry, version rollback, snapshot consistency);
2. the device pointer ``devices/<key id>/<model>.json``, else the channel pointer, both
   downloaded through the Updater (length and hash from signed metadata);
3. the active slot is checked (:mod:`insitu.update._health`): a damaged or swapped slot
   is reinstalled from the repository's full bundle of its own version (``repaired``),
   before anything else is decided;
4. a version below the device's *floor* (the version its channel offered when it
   enrolled, or ``--min-version``) is a :class:`~insitu.errors.RollbackError`; a
   version equal to the installed one is "up to date", one rolled back from on this
   device is "held" (not reinstalled); an *older* one is a
   :class:`~insitu.errors.RollbackError`, even though it is validly signed;
5. the delta from the installed version, when the pointer offers one, is downloaded and
   applied; the rebuilt bundle must have the length and SHA-256 that signed metadata
   gives for the *full* bundle, else the delta is refused (recorded) and the full
   bundle is downloaded instead;
6. the bundle's own signature is checked against the publisher keys listed in the
   trusted root, it is decrypted with this device's key and the model digest checked;
7. A/B install (:mod:`insitu.update._slots`), then the ledger records it.

Every download, install, repair, refusal and rollback is recorded in the ledger (figures
and ids only). Nothing is written to the trusted metadata or the slots unless every check
before it passed; tests assert that for each attack. An update directory that refuses a
write (read-only, full) is one :class:`~insitu.errors.InstallError` naming it and an
``update.failed`` entry (:mod:`insitu.update._disk`); every write goes through a
temporary file, so nothing half-written remains.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from insitu._atomic import atomic_write_bytes, open_no_follow
from insitu._canonical import canonical_bytes
from insitu._clock import utc_now
from insitu._signer import SigningPublicKey, public_key_from_text
from insitu.audit import Ledger, events
from insitu.bundle import (
    Bundle,
    BundleVerifier,
    DeviceKey,
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
from insitu.update._disk import record_failure, storage_failure
from insitu.update._health import SlotDamage, inspect_slot, signed_sha256
from insitu.update._refusals import tuf_refusals
from insitu.update._repository import PUBLISHERS_FIELD, bundle_path, channel_path, device_path
from insitu.update._slots import SlotInfo, SlotStore

__all__ = ["ClientConfig", "UpdateClient", "enrolled_publishers", "is_local_version"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientConfig:
    """Where the device updates from and what it runs."""

    metadata_url: str
    targets_url: str
    model: str
    channel: str
    #: The lowest version this device accepts: what its channel offered at enrollment
    #: (or ``--min-version``), so a channel pointed back cannot give it an older model.
    floor: str | None = None

    def to_json(self) -> dict[str, str | None]:
        """As stored in ``config.json``."""
        return {
            "metadata_url": self.metadata_url,
            "targets_url": self.targets_url,
            "model": self.model,
            "channel": self.channel,
            "floor": self.floor,
        }


def is_local_version(version: str) -> bool:
    """A version made on this device (``MAJOR.MINOR.PATCH-local.N``, ``insitu finetune``)."""
    return SemVer.parse(version).prerelease[:1] == ("local",)


def enrolled_publishers(directory: Path) -> list[SigningPublicKey]:
    """The publisher keys a device enrolled in ``directory`` trusts (none if not enrolled).

    They are listed in the repository's root (``x-insitu-publishers``): the newest root
    the device verified (``metadata/root.json``, written by the Updater only after it
    verified the chain of signatures from the enrolled root), else the enrolled root
    itself (obtained out of band, checked at enrollment).
    """
    for path in (directory / "metadata" / "root.json", directory / "root.json"):
        try:
            md = Metadata[Root].from_bytes(path.read_bytes())
        except FileNotFoundError:
            continue
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise RepositoryError(
                f"{path} is unreadable ({exc}); enroll again with 'insitu update enroll'"
            ) from exc
        raw = md.signed.unrecognized_fields.get(PUBLISHERS_FIELD, [])
        return [public_key_from_text(k) for k in raw]
    return []


def _make_updater(
    directory: Path, config: ClientConfig, root: bytes, fetcher: FetcherInterface | None
) -> Updater:
    downloads = directory / "downloads"
    downloads.mkdir(exist_ok=True)
    for stale in downloads.iterdir():
        with contextlib.suppress(OSError):
            stale.unlink()
    return Updater(
        str(directory / "metadata"),
        config.metadata_url,
        str(downloads),
        config.targets_url,
        fetcher=fetcher,
        bootstrap=root,
    )


def _fetch(updater: Updater, downloads: Path, info: TargetFile) -> bytes:
    """Download ``info`` (verified by TUF) and return its bytes; no file is left behind."""
    part = downloads / f"{uuid.uuid4().hex}.part"
    try:
        with tuf_refusals(f"download of {info.path}"):
            updater.download_target(info, filepath=str(part))
        return part.read_bytes()
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()


def _pointer_target(
    updater: Updater, keyid: str | None, model: str, channel: str
) -> tuple[str, TargetFile | None]:
    """The device pointer of ``keyid`` if published, else the channel's (after a refresh)."""
    with tuf_refusals("metadata refresh"):
        updater.refresh()
        if keyid:
            info = updater.get_targetinfo(device_path(keyid, model))
            if info is not None:
                return info.path, info
        path = channel_path(channel, model)
        return path, updater.get_targetinfo(path)


def _parse_pointer(data: bytes, path: str, model: str) -> dict[str, Any]:
    try:
        pointer = json.loads(data)
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
    return pointer


def _floor(version: str) -> str:
    """``version`` checked as a floor (``--min-version``)."""
    SemVer.parse(version)
    if is_local_version(version):
        raise UsageError(f"--min-version {version} is a device-local version; give a published one")
    return version


def _check_root(root: bytes) -> None:
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


def _offered_version(
    directory: Path,
    config: ClientConfig,
    root: bytes,
    keyid: str | None,
    fetcher: FetcherInterface | None,
) -> str | None:
    """The version the repository offers this device now (``None``: nothing published)."""
    updater = _make_updater(directory, config, root, fetcher)
    path, info = _pointer_target(updater, keyid, config.model, config.channel)
    if info is None:
        return None
    pointer = _parse_pointer(_fetch(updater, directory / "downloads", info), path, config.model)
    return str(pointer["version"])


def _earlier_floor(directory: Path, model: str) -> str | None:
    """The floor of an earlier enrollment of ``directory`` for ``model``, if any."""
    try:
        doc = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    floor = doc.get("floor") if isinstance(doc, dict) and doc.get("model") == model else None
    return floor if isinstance(floor, str) else None


def _higher(a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a or b
    return a if SemVer.parse(b) < SemVer.parse(a) else b


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
        device_key: DeviceKey,
        ledger: Ledger | None = None,
        fetcher: FetcherInterface | None = None,
        local_publisher: SigningPublicKey | None = None,
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
        min_version: str | None = None,
        learn_floor: bool = False,
        fetcher: FetcherInterface | None = None,
    ) -> ClientConfig:
        """Trust ``root`` (obtained out of band) and remember where to update from.

        The device's *floor*, the lowest version it will install, is ``min_version``
        if given, else (with ``learn_floor``) the version the repository offers this
        device at this moment (its device pointer, else its channel's; a full TUF
        refresh through ``fetcher``). A floor of an earlier enrollment for the same
        model is kept if higher: a floor never moves down. With ``ledger``, the
        enrolment is recorded there (``update.enrolled``, with the device's key id and
        the floor). ``config.json`` is written last: if any step fails, the device is
        not enrolled (or stays enrolled as it was).

        Raises:
            RepositoryError: ``root`` is not valid TUF root metadata.
            UpdateError: with ``learn_floor``, the repository refused or cannot be reached.
            InstallError: the update directory cannot be written.

        """
        directory = Path(directory)
        _check_root(root)
        base = url.rstrip("/")
        config = ClientConfig(
            metadata_url=metadata_url or f"{base}/metadata/",
            targets_url=targets_url or f"{base}/targets/",
            model=model,
            channel=channel,
        )
        try:
            (directory / "metadata").mkdir(parents=True, exist_ok=True)
            floor = _floor(min_version) if min_version is not None else None
            if floor is None and learn_floor:
                floor = _offered_version(directory, config, root, device_key_id, fetcher)
            floor = _higher(floor, _earlier_floor(directory, model))
            config = replace(config, floor=floor)
            atomic_write_bytes(directory / "root.json", root)
            atomic_write_bytes(directory / "config.json", canonical_bytes(config.to_json()) + b"\n")
        except OSError as exc:
            raise storage_failure(directory, exc, "update enroll") from exc
        if ledger is not None:
            events.UPDATE_ENROLLED.record(
                ledger, model=model, channel=channel, device_key_id=device_key_id or "", floor=floor
            )
        return config

    @staticmethod
    def enrolled_publishers(directory: Path) -> list[SigningPublicKey]:
        """The publisher keys a device enrolled in ``directory`` trusts (see the function)."""
        return enrolled_publishers(Path(directory))

    # -- helpers -------------------------------------------------------------------

    @property
    def metadata_dir(self) -> Path:
        """TUF's trusted metadata."""
        return self.directory / "metadata"

    def _updater(self) -> Updater:
        return _make_updater(
            self.directory, self.config, (self.directory / "root.json").read_bytes(), self.fetcher
        )

    def _record(self, event: events.Event, **payload: Any) -> None:
        if self.ledger is not None:
            event.record(self.ledger, **payload)

    def _publishers(self) -> list[SigningPublicKey]:
        keys = enrolled_publishers(self.directory)
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

    def slot_damage(self, info: SlotInfo) -> SlotDamage | None:
        """What is wrong with ``info``'s slot, ``None`` if it holds what was installed.

        Offline: the slot against its install record, the signed target (trusted
        metadata on the device) and the bundle's signature (:mod:`insitu.update._health`).
        """
        signed = None
        if not is_local_version(info.version):
            signed = signed_sha256(self.metadata_dir, bundle_path(info.name, info.version))
        return inspect_slot(self.slots, info, self._known_verifier, signed=signed)

    def _known_verifier(self, info: SlotInfo) -> BundleVerifier | None:
        # A local version's signer is the device's own key, which a client made without
        # it (local_publisher=None) cannot check.
        if is_local_version(info.version) and self.local_publisher is None:
            return None
        return self.slot_verifier(info)

    def _download(self, updater: Updater, info: TargetFile, kind: str) -> bytes:
        data = _fetch(updater, self.directory / "downloads", info)
        # Pointers are fetched at every check (e.g. hourly): recording them would bury
        # the downloads that matter, bundles and deltas.
        if kind != "pointer":
            self._record(
                events.UPDATE_DOWNLOADED,
                model=self.config.model,
                target=info.path,
                kind=kind,
                length=info.length,
            )
        return data

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

    @contextlib.contextmanager
    def _disk_failures(self, action: str) -> Iterator[None]:
        # A refused write (read-only, full disk) is the machine's, not an attack: one
        # line naming the update directory, and update.failed rather than update.refused.
        try:
            yield
        except OSError as exc:
            record_failure(self.ledger, self.directory, exc, model=self.config.model, action=action)
            raise storage_failure(self.directory, exc, action) from exc

    # -- the update ----------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        # python-tuf's Updater supports one instance per metadata directory, and two
        # installs must not race for the inactive slot: one process at a time.
        with open_no_follow(self.directory / ".lock", append=True) as handle:
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
        """Refresh, repair, download (delta or full), verify, install. See the module docstring.

        ``check_only`` stops after the pointer: status ``"available"`` names the version
        that an update would install (the metadata refresh is still a full TUF refresh),
        ``"damaged"`` says the active slot needs a repair. Otherwise ``"repaired"`` is
        a repair of the active slot and nothing newer; the result's ``repaired`` names
        what a repair found (``None`` when the active slot was sound).
        """
        with (
            self._disk_failures("update"),
            self._exclusive(),
            self._recording_refusals("update"),
        ):
            return self._update(channel or self.config.channel, check_only=check_only)

    def _pointer(self, updater: Updater, channel: str) -> tuple[str, dict[str, Any]]:
        model = self.config.model
        keyid = device_key_id(self.device_key.public_key())
        path, info = _pointer_target(updater, keyid, model, channel)
        if info is None:
            raise RepositoryError(
                f"the repository publishes no model {model!r} on channel {channel!r}; check "
                "--channel and the model name given at enrollment"
            )
        return path, _parse_pointer(self._download(updater, info, "pointer"), path, model)

    def _update(self, channel: str, *, check_only: bool = False) -> dict[str, Any]:
        updater = self._updater()
        pointer_path, pointer = self._pointer(updater, channel)
        version = str(pointer["version"])
        if is_local_version(version):
            # "-local.N" names versions made on a device (insitu finetune), which its own
            # key verifies; a repository never serves one.
            raise RepositoryError(
                f"{pointer_path} offers {version}, a device-local version name; the "
                "publisher must release it under a plain version"
            )
        installed = self.slots.active()
        damage = self.slot_damage(installed) if installed is not None else None
        result: dict[str, Any] = {
            "model": self.config.model,
            "pointer": pointer_path,
            "available": version,
            "installed_before": installed.version if installed else None,
            "repaired": None,
        }
        if damage is not None and installed is not None:
            if check_only:
                return result | {
                    "status": "damaged",
                    "installed": installed.version,
                    "damage": damage.to_json(),
                }
            repaired = self._repair(updater, installed, damage)
            if repaired is not None:
                result["repaired"] = {"version": repaired.version, "slot": repaired.slot}
                result["repaired"] |= damage.to_json()
                installed, damage = repaired, None
        self._check_floor(pointer_path, version)
        settled = self._settled(pointer_path, version, installed, damage)
        if settled is not None:
            status = "repaired" if result["repaired"] and settled == "up-to-date" else settled
            return result | {
                "status": status,
                "installed": installed.version if installed else None,
            }
        if check_only:
            return result | {
                "status": "available",
                "installed": installed.version if installed else None,
            }
        # No delta from a slot that is still damaged: the full bundle is verified afresh.
        base = installed if damage is None else None
        return result | self._install_offered(updater, pointer_path, pointer, base)

    def _check_floor(self, pointer_path: str, version: str) -> None:
        floor = self.config.floor
        if floor is not None and SemVer.parse(version) < SemVer.parse(floor):
            raise RollbackError(
                f"{pointer_path} offers {version}, below this device's floor {floor} (the "
                "version offered when it enrolled); refused: the operator publishes the old "
                "model again as a new version"
            )

    def _settled(
        self,
        pointer_path: str,
        version: str,
        installed: SlotInfo | None,
        damage: SlotDamage | None,
    ) -> str | None:
        """Why nothing is installed (``held``, ``up-to-date``, ``local``), else ``None``.

        Raises:
            RollbackError: ``version`` is older than the installed (release) version.
            InstallError: the active slot is damaged, could not be repaired, and the
                offer does not replace it.

        """
        offered = SemVer.parse(version)
        newer = installed is None or SemVer.parse(installed.version) < offered
        if (
            damage is not None
            and installed is not None
            and (not newer or version in self.slots.held())
        ):
            why = (
                "it was made on this device"
                if is_local_version(installed.version)
                else "the repository no longer lists its bundle"
            )
            raise InstallError(
                f"{damage.detail}, and it cannot be reinstalled ({why}); run 'insitu "
                "rollback' to return to the previous version, or publish a newer one"
            )
        if version in self.slots.held():
            return "held"
        if installed is None or newer:
            return None
        if offered == SemVer.parse(installed.version):
            return "up-to-date"
        if is_local_version(installed.version):
            # A local fine-tune of the offered release (or of a later one): nothing to
            # install until the repository offers a newer release.
            return "local"
        raise RollbackError(
            f"{pointer_path} offers {version}, older than the installed "
            f"{installed.version}; downgrades are refused (the operator publishes "
            "the old model again as a new version)"
        )

    def _open_checked(self, data: bytes, version: str, source: str) -> OpenedBundle:
        """Verify and decrypt ``data``, which ``source`` says is this model's ``version``."""
        opened = self.verifier().open(Bundle.parse(data), self.device_key)
        if opened.bundle.name != self.config.model or opened.bundle.version != version:
            raise MixAndMatchError(
                f"{source} names {self.config.model} {version} but the bundle is "
                f"{opened.bundle.name} {opened.bundle.version}; refused"
            )
        return opened

    def _repair(self, updater: Updater, info: SlotInfo, damage: SlotDamage) -> SlotInfo | None:
        """Reinstall ``info``'s version (full bundle) into its slot; ``None`` if not offered."""
        if is_local_version(info.version):
            return None
        path = bundle_path(info.name, info.version)
        with tuf_refusals("metadata refresh"):
            target = updater.get_targetinfo(path)
        if target is None:
            return None
        data = self._download(updater, target, "bundle")
        opened = self._open_checked(data, info.version, path)
        repaired = self.slots.repair(info, data, bundle_id=opened.bundle.bundle_id, now=utc_now())
        logger.info("%s; reinstalled from the repository", damage.detail)
        self._record(
            events.UPDATE_REPAIRED,
            model=info.name,
            version=info.version,
            slot=info.slot,
            damage=damage.kind,
            bundle_sha256=repaired.sha256,
        )
        return repaired

    def _install_offered(
        self,
        updater: Updater,
        pointer_path: str,
        pointer: dict[str, Any],
        installed: SlotInfo | None,
    ) -> dict[str, Any]:
        """Download (delta from ``installed`` or full), verify and install the offer."""
        version = str(pointer["version"])
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
        opened = self._open_checked(data, version, pointer_path)
        if not opened.bundle.encrypted:
            logger.warning(
                "installing %s %s, which is NOT encrypted: the model is stored in the clear "
                "on this device; ask the publisher to encrypt it for this device's key",
                opened.bundle.name,
                opened.bundle.version,
            )
        info = self._install(data, opened)
        return {
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
        info = self.slots.install(
            data,
            name=opened.bundle.name,
            version=opened.bundle.version,
            bundle_id=opened.bundle.bundle_id,
            now=utc_now(),
        )
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
        """Return to the previous slot (local, no network).

        Raises:
            NothingToRollBackError: no other version is installed.
            InstallError: the previous slot is damaged or swapped (it is not switched to).

        """
        with (
            self._disk_failures("rollback"),
            self._exclusive(),
            self._recording_refusals("rollback"),
        ):
            previous, active = self.slots.previous(), self.slots.active()
            damage = self.slot_damage(previous) if previous is not None else None
            if damage is not None and active is not None:
                raise InstallError(
                    f"cannot roll back: the previous {damage.detail}; {active.name} "
                    f"{active.version} stays active (to run {previous.version if previous else ''} "
                    "again, publish it again as a new version)"
                )
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
        """The configuration and the two slots, each checked (``damage``: ``None`` if sound)."""
        return {
            "config": self.config.to_json(),
            "active": self._slot_status(self.slots.active()),
            "previous": self._slot_status(self.slots.previous()),
            "device_key_id": device_key_id(self.device_key.public_key()),
        }

    def _slot_status(self, info: SlotInfo | None) -> dict[str, Any] | None:
        if info is None:
            return None
        damage = self.slot_damage(info)
        return info.to_json() | {
            "slot": info.slot,
            "damage": damage.to_json() if damage is not None else None,
        }
