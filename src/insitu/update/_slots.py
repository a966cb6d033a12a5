"""A/B install slots: a new version is written beside the running one, then switched to.

Layout (in the device's ``update/`` directory)::

    slots/a.insb   slots/b.insb    two verified bundles (one may be absent)
    slots/state.json               {"active": "a", "slots": {"a": {...}, "b": {...}}}

Invariants:

* the active slot is never written: :meth:`SlotStore.install` writes the *other* slot
  (temporary file, fsync, rename, fsync of the directory), and only then replaces
  ``state.json`` the same way. ``state.json``'s rename is the commit point: a crash
  (even SIGKILL) before it leaves the old version active and intact, after it the new
  one; never a mix;
* ``state.json`` records the SHA-256 of each slot's bundle, and :meth:`active` refuses a
  slot whose bytes no longer match it;
* leftover temporary files of an interrupted install are removed when the store opens;
* a version rolled back from is *held*: listed in ``state.json`` so that the next update
  does not reinstall it; a newer version is installed as usual;
* the one write to the active slot is :meth:`SlotStore.repair`, of a slot already found
  damaged (so not loadable) with the verified bundle of the *same* version: the same
  atomic write, so a crash leaves the damaged file or the repaired one, and the other
  slot (the version to roll back to) is not touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from insitu._atomic import atomic_write_bytes
from insitu._canonical import canonical_bytes
from insitu.errors import InstallError, NothingToRollBackError

__all__ = ["SlotInfo", "SlotStore"]

_SLOTS = ("a", "b")


@dataclass(frozen=True)
class SlotInfo:
    """What a slot holds."""

    slot: str
    name: str
    version: str
    sha256: str
    bundle_id: str
    installed: str

    def to_json(self) -> dict[str, Any]:
        """As stored in ``state.json``."""
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "bundle_id": self.bundle_id,
            "installed": self.installed,
        }


class SlotStore:
    """The two install slots of one device and the pointer to the active one."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()

    @property
    def state_path(self) -> Path:
        """``state.json``."""
        return self.directory / "state.json"

    def slot_path(self, slot: str) -> Path:
        """The bundle file of ``slot``."""
        return self.directory / f"{slot}.insb"

    def _state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"active": None, "slots": {}}
        except (OSError, ValueError) as exc:
            raise InstallError(
                f"{self.state_path} is unreadable ({exc}); reinstall with 'insitu update'"
            ) from exc
        return state

    def _info(self, state: dict[str, Any], slot: str | None) -> SlotInfo | None:
        if slot is None or slot not in state.get("slots", {}):
            return None
        return SlotInfo(slot=slot, **state["slots"][slot])

    def active(self) -> SlotInfo | None:
        """The active slot, or ``None`` when nothing is installed."""
        state = self._state()
        return self._info(state, state.get("active"))

    def previous(self) -> SlotInfo | None:
        """The other slot, if it holds a version to roll back to."""
        state = self._state()
        active = state.get("active")
        return self._info(state, next((s for s in _SLOTS if s != active), None))

    def read(self, info: SlotInfo) -> bytes:
        """The bundle bytes of ``info``'s slot, checked against the recorded digest."""
        try:
            data = self.slot_path(info.slot).read_bytes()
        except OSError as exc:
            raise InstallError(
                f"slot {info.slot} ({info.name} {info.version}) cannot be read ({exc}); "
                "reinstall with 'insitu update'"
            ) from exc
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise InstallError(
                f"slot {info.slot} ({info.name} {info.version}) was changed on disk; "
                "reinstall with 'insitu update'"
            )
        return data

    def install(
        self, data: bytes, *, name: str, version: str, bundle_id: str, now: str
    ) -> SlotInfo:
        """Write ``data`` into the inactive slot, then make it active (atomically)."""
        state = self._state()
        active = state.get("active")
        target = next(s for s in _SLOTS if s != active)
        atomic_write_bytes(self.slot_path(target), data)
        info = SlotInfo(
            slot=target,
            name=name,
            version=version,
            sha256=hashlib.sha256(data).hexdigest(),
            bundle_id=bundle_id,
            installed=now,
        )
        slots = dict(state.get("slots", {}))
        slots[target] = info.to_json()
        self._commit({"active": target, "slots": slots, "held": state.get("held", [])})
        return info

    def repair(self, info: SlotInfo, data: bytes, *, bundle_id: str, now: str) -> SlotInfo:
        """Rewrite ``info``'s slot with ``data``, a verified bundle of its own version.

        The slot stays what it was (active or not); ``state.json`` records the new digest.
        """
        state = self._state()
        if info.slot not in state.get("slots", {}):
            raise InstallError(f"slot {info.slot} holds nothing to repair")
        atomic_write_bytes(self.slot_path(info.slot), data)
        repaired = SlotInfo(
            slot=info.slot,
            name=info.name,
            version=info.version,
            sha256=hashlib.sha256(data).hexdigest(),
            bundle_id=bundle_id,
            installed=now,
        )
        slots = dict(state["slots"])
        slots[info.slot] = repaired.to_json()
        self._commit(state | {"slots": slots})
        return repaired

    def held(self) -> list[str]:
        """Versions rolled back from, which updates do not reinstall."""
        return list(self._state().get("held", []))

    def rollback(self) -> tuple[SlotInfo, SlotInfo]:
        """Make the other slot active; returns (now active, was active).

        Raises:
            NothingToRollBackError: there is no other installed version.

        """
        state = self._state()
        current, previous = self._info(state, state.get("active")), self.previous()
        if current is None or previous is None:
            raise NothingToRollBackError(
                "there is no previous version to roll back to on this device; install one "
                "with 'insitu update'"
            )
        self.read(previous)  # refuse to switch to a slot that was damaged
        held = sorted({*state.get("held", []), current.version})
        self._commit({"active": previous.slot, "slots": state["slots"], "held": held})
        return previous, current

    def _commit(self, state: dict[str, Any]) -> None:
        atomic_write_bytes(self.state_path, canonical_bytes(state) + b"\n")
