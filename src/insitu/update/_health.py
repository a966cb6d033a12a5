"""Is an install slot still what was installed? The check behind status, repair and rollback.

A slot can be damaged after its install: a flipped bit on an SD card, a file truncated by
a full disk, or the bundle file replaced by another one (another version's, or the other
slot's: *swapped*). Loading refuses such a slot; this module says *what* is wrong, so
that ``insitu update status`` can show it, ``insitu update`` can reinstall the version
from the repository, and ``insitu rollback`` can refuse to switch to it.

A slot is healthy when, in order:

1. its bundle file can be read;
2. its SHA-256 is the one ``state.json`` recorded at install (what was installed);
3. for a repository version, that digest is the one the trusted, signed targets
   metadata gives for the bundle (the signed target), when the device holds it;
4. the bundle's signature verifies and it names the recorded model, version and bundle
   id (a ``state.json`` edited to match another file is caught here).

When step 2 fails, a bundle that still verifies is reported as *swapped* (naming what
the slot holds now); anything else as *changed*.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from insitu.bundle import Bundle, BundleVerifier
from insitu.errors import BundleError, UntrustedPublisherError
from insitu.update._slots import SlotInfo, SlotStore

__all__ = ["SlotDamage", "inspect_slot", "signed_sha256"]


@dataclass(frozen=True)
class SlotDamage:
    """What is wrong with a slot: a kind (for the ledger) and one line (for people).

    ``kind`` is one of ``missing``, ``unreadable``, ``changed``, ``swapped``,
    ``unsigned`` (digest as recorded, but the bundle does not verify or names another
    version) and ``unlike-signed`` (digest as recorded, but not the signed target's).
    """

    kind: str
    #: Which slot: ``slot b (triage 2.0.0)``.
    where: str
    #: What is wrong with it, without the slot's name.
    reason: str

    @property
    def detail(self) -> str:
        """The slot and what is wrong with it, in one line."""
        return f"{self.where}: {self.reason}"

    def to_json(self) -> dict[str, str]:
        """As shown by ``insitu update status --json``."""
        return {"kind": self.kind, "reason": self.reason, "detail": self.detail}


def signed_sha256(metadata_dir: Path, target: str) -> str | None:
    """The SHA-256 the trusted targets metadata gives for ``target``, if it lists it.

    ``targets.json`` in the metadata directory is written by python-tuf's Updater only
    after it verified it, so it is trusted (as ``root.json`` is for the publisher keys).
    ``None`` when the device holds no targets metadata yet or it does not list ``target``.
    """
    try:
        doc = json.loads((metadata_dir / "targets.json").read_bytes())
        digest = doc["signed"]["targets"][target]["hashes"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return digest if isinstance(digest, str) else None


def inspect_slot(
    slots: SlotStore,
    info: SlotInfo,
    verifier: Callable[[SlotInfo], BundleVerifier | None],
    *,
    signed: str | None = None,
) -> SlotDamage | None:
    """What is wrong with ``info``'s slot, or ``None`` if it holds what was installed.

    ``verifier`` gives the verifier of a slot (the device's own key for a local
    version; ``None`` when that key is not at hand: the signature is then not checked);
    ``signed`` is the signed target's SHA-256 (:func:`signed_sha256`).
    """
    where = f"slot {info.slot} ({info.name} {info.version})"
    data = _read(slots, info, where)
    if isinstance(data, SlotDamage):
        return data
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.sha256:
        return _changed(data, info, verifier(info), where)
    if signed is not None and signed != digest:
        return SlotDamage(
            "unlike-signed",
            where,
            "its SHA-256 is not the one the signed targets metadata gives for it",
        )
    trusted = verifier(info)
    if trusted is None:
        return None
    held = _verified(data, trusted, check_payload=False)
    recorded = {"name": info.name, "version": info.version, "bundle_id": info.bundle_id}
    if held != recorded:
        return SlotDamage(
            "unsigned",
            where,
            "its bundle does not verify or is not the one recorded at install "
            "(state.json was changed)",
        )
    return None


def _read(slots: SlotStore, info: SlotInfo, where: str) -> bytes | SlotDamage:
    try:
        return slots.slot_path(info.slot).read_bytes()
    except FileNotFoundError:
        return SlotDamage("missing", where, "its bundle file is missing")
    except OSError as exc:
        return SlotDamage("unreadable", where, f"its bundle file cannot be read ({exc.strerror})")


def _changed(
    data: bytes, info: SlotInfo, verifier: BundleVerifier | None, where: str
) -> SlotDamage:
    """A slot whose digest is not the install's: swapped for another bundle, or changed."""
    held = _verified(data, verifier, check_payload=True) if verifier is not None else {}
    if held and held["bundle_id"] != info.bundle_id:
        return SlotDamage(
            "swapped",
            where,
            f"its file was swapped for another bundle ({held['name']} "
            f"{held['version']}, bundle {held['bundle_id'][:12]})",
        )
    return SlotDamage(
        "changed", where, "its bytes changed on disk (SHA-256 differs from the install's)"
    )


def _verified(data: bytes, verifier: BundleVerifier, *, check_payload: bool) -> dict[str, Any]:
    """Name, version and bundle id of a bundle that verifies; empty if it does not.

    A bundle signed by a publisher key the repository has since revoked is intact: it is
    not a damage of the slot (loading refuses it on its own terms, and an update
    replaces it), so its identity is returned.
    """
    try:
        bundle = Bundle.parse(data)
        verifier.verify(bundle, check_payload=check_payload)
    except UntrustedPublisherError:
        pass
    except BundleError:
        return {}
    return {"name": bundle.name, "version": bundle.version, "bundle_id": bundle.bundle_id}
