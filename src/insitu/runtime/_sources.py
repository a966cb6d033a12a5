"""Where a runtime's models come from: the device's installed slot, or a bundle file.

A source answers two questions: *what is installed now* (:meth:`ModelSource.current`, a
cheap token read at every watch tick, so that a new install is noticed) and *load it*
(:meth:`ModelSource.load`: verify the signature, decrypt into memory, build a session).
Loading always goes through :func:`insitu.bundle.load_session`, so the signature and the
model digest are checked on every load and the plaintext model exists only in an
anonymous memory file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from insitu.errors import InstallError, ModelNotFoundError

if TYPE_CHECKING:
    from insitu._signer import SigningPublicKey

    # insitu.bundle loads sessions through insitu.runtime: imported where used.
    from insitu.bundle import Bundle, BundleVerifier, DeviceKey

__all__ = ["BundleFile", "InstalledModel", "ModelSource"]


class ModelSource(Protocol):
    """A named model that can be (re)loaded."""

    @property
    def name(self) -> str:
        """The model's name (the card's)."""
        ...

    def current(self) -> str | None:
        """A token naming what is installed now (changes when a new version is)."""
        ...

    def load(self, *, intra_op_threads: int | None, spinning: bool = True) -> tuple[Bundle, Any]:
        """The verified header and a session of what is installed now."""
        ...


class InstalledModel:
    """The model ``insitu update`` installed into a device's A/B slots."""

    def __init__(
        self,
        update_dir: str | os.PathLike[str],
        *,
        device_key: DeviceKey,
        local_publisher: SigningPublicKey | None = None,
    ) -> None:
        """The model in ``update_dir``, decrypted with ``device_key``.

        ``local_publisher`` is the device's own signing key, which signs the versions
        ``insitu finetune`` installs here (trusted for local versions only, as by
        ``insitu update``); without it a local version is refused.
        """
        from insitu.update import UpdateClient

        self._client = UpdateClient(
            Path(update_dir), device_key=device_key, local_publisher=local_publisher
        )
        self._name = self._client.config.model

    @property
    def name(self) -> str:
        """The model the device is enrolled for."""
        return self._name

    def current(self) -> str | None:
        """The active slot's bundle id (``state.json`` is replaced atomically)."""
        try:
            state = json.loads(self._client.slots.state_path.read_text(encoding="utf-8"))
            active = state.get("active")
            return str(state["slots"][active]["bundle_id"]) if active else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def load(self, *, intra_op_threads: int | None, spinning: bool = True) -> tuple[Bundle, Any]:
        """See :class:`ModelSource`; the slot's bundle id is checked as well."""
        # A slot whose bytes changed after install raises its BundleError as it is (the
        # caller may tell tampering from absence); 'insitu update' repairs the slot.
        try:
            return self._client.session(intra_op_threads=intra_op_threads, spinning=spinning)
        except InstallError as exc:
            raise ModelNotFoundError(f"model {self._name!r}: {exc}") from exc


class BundleFile:
    """A bundle file on disk, trusted through a verifier (tests, benchmarks, labs)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        verifier: BundleVerifier,
        device_key: DeviceKey | None,
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        self._verifier = verifier
        self._device_key = device_key
        if name is None:
            from insitu.bundle import Bundle

            name = Bundle.parse(self.path.read_bytes()).name
        self._name = name

    @property
    def name(self) -> str:
        """The bundle's model name."""
        return self._name

    def current(self) -> str | None:
        """The file's identity and modification time (a rename replaces it)."""
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return f"{stat.st_ino}:{stat.st_mtime_ns}:{stat.st_size}"

    def load(self, *, intra_op_threads: int | None, spinning: bool = True) -> tuple[Bundle, Any]:
        """See :class:`ModelSource`."""
        from insitu.bundle import load_session

        return load_session(
            self.path,
            self._verifier,
            self._device_key,
            intra_op_threads=intra_op_threads,
            spinning=spinning,
        )
