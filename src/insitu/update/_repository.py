"""The update repository: TUF metadata (python-tuf) over bundles, deltas and channels.

Built on ``tuf.repository.Repository`` (python-tuf's own editing abstraction: ``edit``,
``do_snapshot``, ``do_timestamp``) and the Metadata API; insitu adds only what is
specific to models: what a target is, channels, deltas, and where files go.

Targets (all named by signed metadata, so all verified by the client)::

    targets role (what exists):
    bundles/<model>/<version>.insb          a signed, encrypted bundle
    deltas/<model>/<from>_to_<to>.delta     a bundle delta (see insitu.bundle._delta)

    "assignments" role, delegated by targets for channels/*/* and devices/*/* (who runs it):
    channels/<channel>/<model>.json         pointer: the version a channel runs
    devices/<device key id>/<model>.json    pointer for one device (Uptane's director idea)

A pointer is small canonical JSON ``{"name", "version", "bundle", "deltas": {from: path}}``.
Devices look up their device pointer first, then their channel's. The delegation gives
the two jobs different keys: the targets key vouches for artefacts and can stay offline
between releases; the assignments key only moves pointers (and can live on the
deployment host), and cannot introduce a bundle: a pointer to a bundle that targets does
not list leads nowhere.

Invariants:

* metadata uses consistent snapshots: ``N.root.json``, ``N.targets.json``,
  ``N.snapshot.json``, and targets stored as ``<sha256>.<name>``; ``timestamp.json`` is
  written last, so a client that reads during a publish sees the old state or the new
  one, never a mix;
* a version, once published, is never replaced, and a channel only moves forward: the
  way back to an old model is to publish it again as a new version (``--republishes``);
* the trusted publisher keys (who may sign bundles) are listed in root under
  ``x-insitu-publishers``, so devices learn them through TUF's root of trust and key
  rotation rather than from a separate file.

Expiry defaults (days): root 365, targets 90, snapshot 30, timestamp 1. A repository
whose timestamp is not re-signed (``insitu repo timestamp``, e.g. hourly from cron) is
refused by every device after a day: that is the freeze-attack protection.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from securesystemslib.signer import Signer
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer
from tuf.repository import Repository

from insitu._canonical import canonical_bytes
from insitu._signer import SigningPublicKey, public_key_from_text, public_key_text
from insitu.audit import Ledger, events
from insitu.bundle import Bundle, BundleVerifier, DeviceKey, SemVer, make_bundle_delta
from insitu.errors import BundleError, RepositoryError
from insitu.update._storage import Storage

__all__ = [
    "DEFAULT_EXPIRY_DAYS",
    "PUBLISHERS_FIELD",
    "UpdateRepository",
    "bundle_path",
    "channel_path",
    "delta_path",
    "device_path",
]

logger = logging.getLogger(__name__)

PUBLISHERS_FIELD = "x-insitu-publishers"
ASSIGNMENTS = "assignments"
ASSIGNMENT_PATHS = ["channels/*/*", "devices/*/*"]
DEFAULT_EXPIRY_DAYS: dict[str, int] = {
    Root.type: 365,
    Targets.type: 90,
    ASSIGNMENTS: 90,
    Snapshot.type: 30,
    Timestamp.type: 1,
}
_INIT: dict[str, Callable[[], Signed]] = {
    Root.type: Root,
    Targets.type: Targets,
    ASSIGNMENTS: Targets,
    Snapshot.type: Snapshot,
    Timestamp.type: Timestamp,
}
_TOP_LEVEL = (Root.type, Targets.type, Snapshot.type, Timestamp.type)


def bundle_path(name: str, version: str) -> str:
    """Target path of a bundle."""
    return f"bundles/{name}/{version}.insb"


def delta_path(name: str, old: str, new: str) -> str:
    """Target path of a delta from ``old`` to ``new``."""
    return f"deltas/{name}/{old}_to_{new}.delta"


def channel_path(channel: str, name: str) -> str:
    """Target path of a channel pointer."""
    return f"channels/{channel}/{name}.json"


def device_path(device_keyid: str, name: str) -> str:
    """Target path of a per-device pointer."""
    return f"devices/{device_keyid}/{name}.json"


def _insitu(target: TargetFile) -> dict[str, Any]:
    custom = target.custom if isinstance(target.custom, dict) else {}
    value = custom.get("insitu", {})
    return dict(value) if isinstance(value, dict) else {}


def _raw(key: SigningPublicKey) -> str:
    return public_key_text(key)  # Ed25519: the raw key's hex, as in older roots


class UpdateRepository(Repository):
    """A TUF repository of model bundles in a :class:`Storage`.

    ``signers`` maps each top-level role to the signers whose keys root lists for it;
    every metadata version is signed by all of them (a threshold of them must verify).
    """

    def __init__(
        self,
        storage: Storage,
        signers: Mapping[str, Sequence[Signer]],
        *,
        expiry_days: Mapping[str, int] | None = None,
    ) -> None:
        self.storage = storage
        self.signers = {role: list(signers.get(role, [])) for role in _INIT}
        self.expiry_days = dict(DEFAULT_EXPIRY_DAYS) | dict(expiry_days or {})

    # -- tuf.repository.Repository ---------------------------------------------------

    def open(self, role: str) -> Metadata[Any]:
        """The latest metadata of ``role``, or a fresh version 0 to be edited."""
        try:
            return Metadata.from_bytes(self.storage.read(f"metadata/{role}.json"))
        except FileNotFoundError:
            md: Metadata[Any] = Metadata(_INIT[role]())
            md.signed.version = 0  # close() bumps it to 1
            return md

    def close(self, role: str, md: Metadata[Any]) -> None:
        """Bump version and expiry, sign with every key of the role, write the files."""
        md.signed.version += 1
        md.signed.expires = datetime.now(UTC).replace(microsecond=0) + timedelta(
            days=self.expiry_days[role]
        )
        md.signatures.clear()
        if not self.signers[role]:
            raise RepositoryError(f"no signing key for the {role} role is loaded")
        for signer in self.signers[role]:
            md.sign(signer, append=True)
        data = md.to_bytes(JSONSerializer())
        if role != Timestamp.type:
            self.storage.write(f"metadata/{md.signed.version}.{role}.json", data)
        # The unversioned copy: clients fetch timestamp.json (and may fetch root.json
        # to bootstrap); for the other roles it is the repository's own bookmark.
        self.storage.write(f"metadata/{role}.json", data)

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        """Versions of the targets metadata (top-level and delegated), for snapshot."""
        return {
            "targets.json": MetaFile(self.targets().version),
            f"{ASSIGNMENTS}.json": MetaFile(self.targets(ASSIGNMENTS).version),
        }

    @property
    def snapshot_info(self) -> MetaFile:
        """Version of the snapshot metadata, for timestamp."""
        return MetaFile(self.snapshot().version)

    # -- creation ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        storage: Storage,
        signers: Mapping[str, Sequence[Signer]],
        *,
        publishers: Iterable[SigningPublicKey],
        threshold: int = 1,
        expiry_days: Mapping[str, int] | None = None,
    ) -> UpdateRepository:
        """Write version 1 of every role; ``publishers`` may sign bundles."""
        repo = cls(storage, signers, expiry_days=expiry_days)
        if storage.exists("metadata/root.json"):
            raise RepositoryError("a repository already exists here; open it instead")
        for role in _INIT:
            if len(repo.signers[role]) < threshold:
                raise RepositoryError(
                    f"the {role} role has {len(repo.signers[role])} keys, fewer than the "
                    f"threshold {threshold}"
                )
        with repo.edit_root() as root:
            root.consistent_snapshot = True
            for role in _TOP_LEVEL:
                for signer in repo.signers[role]:
                    root.add_key(signer.public_key, role)
                root.roles[role].threshold = threshold
            root.unrecognized_fields[PUBLISHERS_FIELD] = sorted(_raw(k) for k in publishers)
        with repo.edit_targets() as targets:
            targets.delegations = Delegations(
                keys={},
                roles={
                    ASSIGNMENTS: DelegatedRole(
                        ASSIGNMENTS, [], threshold, True, paths=ASSIGNMENT_PATHS
                    )
                },
            )
            for signer in repo.signers[ASSIGNMENTS]:
                targets.add_key(signer.public_key, ASSIGNMENTS)
        with repo.edit_targets(ASSIGNMENTS):
            pass
        repo.do_snapshot(force=True)
        repo.do_timestamp(force=True)
        return repo

    # -- queries -------------------------------------------------------------------

    @property
    def publishers(self) -> list[SigningPublicKey]:
        """The publisher keys root trusts to sign bundles."""
        raw = self.root().unrecognized_fields.get(PUBLISHERS_FIELD, [])
        return [public_key_from_text(k) for k in raw]

    def versions(self, name: str) -> list[str]:
        """Published versions of model ``name``, oldest first."""
        found = [
            _insitu(t)["version"]
            for t in self.targets().targets.values()
            if _insitu(t).get("kind") == "bundle" and _insitu(t).get("name") == name
        ]
        return sorted(found, key=SemVer.parse)

    def pointer(self, path: str) -> dict[str, Any] | None:
        """A channel or device pointer, if published."""
        target = self.targets(ASSIGNMENTS).targets.get(path)
        if target is None:
            return None
        data = self.storage.read(self._stored_path(path, target))
        pointer: dict[str, Any] = json.loads(data)
        return pointer

    def target_file(self, path: str) -> TargetFile:
        """The signed description of target ``path`` (listed by targets or assignments)."""
        target = self.targets().targets.get(path) or self.targets(ASSIGNMENTS).targets.get(path)
        if target is None:
            raise RepositoryError(f"no target {path} in this repository")
        return target

    def stored_path(self, path: str) -> str:
        """Where target ``path`` is stored (hash-prefixed, as clients fetch it)."""
        return self._stored_path(path, self.target_file(path))

    def read_target(self, path: str) -> bytes:
        """The stored bytes of target ``path``."""
        return self.storage.read(self.stored_path(path))

    @staticmethod
    def _stored_path(path: str, target: TargetFile) -> str:
        directory, _, base = path.rpartition("/")
        return f"targets/{directory}/{target.hashes['sha256']}.{base}"

    def status(self) -> dict[str, Any]:
        """Versions and expiry of each role, and the pointers (for ``repo status``)."""
        roles = {}
        for role in _INIT:
            signed = self.open(role).signed
            roles[role] = {"version": signed.version, "expires": signed.expires.isoformat()}
        pointers = {
            path: json.loads(self.read_target(path))["version"]
            for path in self.targets(ASSIGNMENTS).targets
        }
        return {"roles": roles, "pointers": pointers, "targets": len(self.targets().targets)}

    # -- publishing ----------------------------------------------------------------

    def _add_target(self, targets: Targets, path: str, data: bytes, custom: dict[str, Any]) -> None:
        target = TargetFile.from_data(path, data, ["sha256"])
        target.unrecognized_fields["custom"] = {"insitu": custom}
        self.storage.write(self._stored_path(path, target), data)
        targets.targets[path] = target

    def publish(
        self,
        bundle_bytes: bytes,
        *,
        channels: Sequence[str] = ("stable",),
        devices: Sequence[str] = (),
        publisher_key: DeviceKey | None = None,
        max_deltas: int = 2,
        ledger: Ledger | None = None,
    ) -> dict[str, Any]:
        """Publish a bundle, deltas from earlier versions, and move pointers to it.

        Raises:
            BundleError: the bundle is not signed by a publisher root trusts.
            RepositoryError: the version exists, or a pointer would move backwards.

        """
        try:
            return self._publish(
                bundle_bytes,
                channels=channels,
                devices=devices,
                publisher_key=publisher_key,
                max_deltas=max_deltas,
                ledger=ledger,
            )
        except (BundleError, RepositoryError) as exc:
            if ledger is not None:
                events.REPO_PUBLISH_REFUSED.record(ledger, reason=type(exc).__name__)
            raise

    def _publish(
        self,
        bundle_bytes: bytes,
        *,
        channels: Sequence[str],
        devices: Sequence[str],
        publisher_key: DeviceKey | None,
        max_deltas: int,
        ledger: Ledger | None,
    ) -> dict[str, Any]:
        bundle = Bundle.parse(bundle_bytes)
        BundleVerifier(self.publishers).verify(bundle)
        name, version = bundle.name, bundle.version
        new = SemVer.parse(version)
        path = bundle_path(name, version)
        if path in self.targets().targets:
            raise RepositoryError(
                f"{name} {version} is already published; versions are immutable, create "
                "the bundle again with a higher --version"
            )
        pointer_paths = [channel_path(c, name) for c in channels] + [
            device_path(d, name) for d in devices
        ]
        if not pointer_paths:
            raise RepositoryError("publish to at least one --channel or --device")
        for pointer_path in pointer_paths:
            current = self.pointer(pointer_path)
            if current is not None and SemVer.parse(current["version"]) >= new:
                raise RepositoryError(
                    f"{pointer_path} runs {current['version']}, not older than {version}: "
                    "a pointer only moves forward. To send the fleet back to an old model, "
                    "create its bundle again with a new --version and --republishes OLD"
                )
        deltas = self._make_deltas(bundle_bytes, name, new, publisher_key, max_deltas)
        with self.edit_targets() as targets:
            self._add_target(
                targets,
                path,
                bundle_bytes,
                {"kind": "bundle", "name": name, "version": version, "bundle_id": bundle.bundle_id},
            )
            for old, data in deltas.items():
                self._add_target(
                    targets,
                    delta_path(name, old, version),
                    data,
                    {"kind": "delta", "name": name, "from": old, "to": version},
                )
        pointer = {
            "name": name,
            "version": version,
            "bundle": path,
            "deltas": {old: delta_path(name, old, version) for old in deltas},
        }
        with self.edit_targets(ASSIGNMENTS) as assignments:
            for pointer_path in pointer_paths:
                self._add_target(
                    assignments, pointer_path, canonical_bytes(pointer), {"kind": "pointer"}
                )
        self.do_snapshot()
        self.do_timestamp()
        result = {
            "name": name,
            "version": version,
            "bundle": path,
            "bundle_sha256": self.targets().targets[path].hashes["sha256"],
            "bundle_length": len(bundle_bytes),
            "deltas": {
                old: {"path": delta_path(name, old, version), "length": len(data)}
                for old, data in deltas.items()
            },
            "pointers": pointer_paths,
            "targets_version": self.targets().version,
        }
        if ledger is not None:
            events.REPO_PUBLISHED.record(
                ledger,
                model=name,
                version=version,
                bundle_sha256=result["bundle_sha256"],
                bundle_length=len(bundle_bytes),
                deltas=sorted(deltas),
                pointers=pointer_paths,
                targets_version=result["targets_version"],
            )
        return result

    def _make_deltas(
        self,
        bundle_bytes: bytes,
        name: str,
        new: SemVer,
        publisher_key: DeviceKey | None,
        max_deltas: int,
    ) -> dict[str, bytes]:
        older = [v for v in self.versions(name) if SemVer.parse(v) < new][-max_deltas:]
        deltas: dict[str, bytes] = {}
        for old in older if max_deltas > 0 else []:
            try:
                deltas[old] = make_bundle_delta(
                    self.read_target(bundle_path(name, old)),
                    bundle_bytes,
                    publisher_key=publisher_key,
                )
            except BundleError as exc:
                logger.warning(
                    "no delta from %s %s to %s: %s (devices will download the full bundle; "
                    "include the publisher's own encryption key as a recipient to get deltas)",
                    name,
                    old,
                    new,
                    exc,
                )
        return deltas

    def set_publishers(
        self, publishers: Iterable[SigningPublicKey], *, ledger: Ledger | None = None
    ) -> int:
        """Sign a new root version listing exactly ``publishers``; returns its version.

        Devices load the new root on their next refresh (TUF root rotation: it must be
        signed by the old root's keys and its own) and from then on accept bundles only
        from these keys: this is how a stolen publisher key is revoked.
        """
        keys = sorted({_raw(k) for k in publishers})
        if not keys:
            raise RepositoryError("a repository needs at least one publisher key")
        with self.edit_root() as root:
            root.unrecognized_fields[PUBLISHERS_FIELD] = keys
        version = self.root().version
        if ledger is not None:
            events.REPO_PUBLISHERS_CHANGED.record(
                ledger, root_version=version, publishers=len(keys)
            )
        return version

    def rotate_keys(
        self, role: str, new_signers: Sequence[Signer], *, ledger: Ledger | None = None
    ) -> None:
        """Replace every key of ``role`` by ``new_signers`` (same threshold).

        Top-level roles are rotated by a new root version, the assignments role by a new
        targets version. A new root is signed by the old root keys *and* the new ones, as
        TUF requires of a root rotation, so devices that trust the old root accept it.
        The role's own metadata is then re-signed with the new keys.
        """
        if role not in _INIT:
            raise RepositoryError(f"unknown role {role!r}; roles: {', '.join(_INIT)}")
        old = self.signers[role]
        if len(new_signers) < len(old):
            raise RepositoryError(f"give at least {len(old)} new keys for {role} (its threshold)")
        if role == ASSIGNMENTS:
            with self.edit_targets() as targets:
                for signer in old:
                    targets.revoke_key(signer.public_key.keyid, ASSIGNMENTS)
                for signer in new_signers:
                    targets.add_key(signer.public_key, ASSIGNMENTS)
            self.signers[role] = list(new_signers)
            with self.edit_targets(ASSIGNMENTS):
                pass
        else:
            if role == Root.type:
                self.signers[role] = [*old, *new_signers]  # cross-signed rotation
            with self.edit_root() as root:
                for signer in old:
                    root.revoke_key(signer.public_key.keyid, role)
                for signer in new_signers:
                    root.add_key(signer.public_key, role)
            self.signers[role] = list(new_signers)
            if role == Targets.type:
                with self.edit_targets():
                    pass
        # Snapshot and timestamp are re-signed in every case: with their new keys when
        # they were rotated, and to publish the new targets versions otherwise.
        self.do_snapshot(force=True)
        self.do_timestamp(force=True)
        if ledger is not None:
            uris = [str(uri) for s in new_signers if (uri := getattr(s, "uri", None))]
            where = {"key_uris": uris} if uris else {}
            events.REPO_KEYS_ROTATED.record(ledger, role=role, keys=len(new_signers), **where)

    def refresh_timestamp(self, *, ledger: Ledger | None = None) -> int:
        """Sign a new timestamp (a fresh expiry); returns its version (recorded in ``ledger``)."""
        self.do_timestamp(force=True)
        version = self.timestamp().version
        if ledger is not None:
            events.REPO_TIMESTAMP.record(ledger, version=version)
        return version
