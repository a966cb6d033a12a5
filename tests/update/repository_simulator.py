"""An update repository served from memory, in the style of python-tuf's own tests.

``RepositorySimulator`` is a real :class:`~insitu.update.UpdateRepository` over a
:class:`~insitu.update.MemoryStorage`, and a ``FetcherInterface``: an ``UpdateClient``
given it as its fetcher "downloads" from memory, with no network and no files. Attacks
are staged by serving other bytes for a path (``serve``), typically an older, validly
signed version from ``storage.history``; ``fetched`` lists what the client asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlparse

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient.fetcher import FetcherInterface

from insitu.update import MemoryStorage, UpdateRepository

BASE_URL = "https://repo.invalid"
ROLES = ("root", "targets", "assignments", "snapshot", "timestamp")


class RepositorySimulator(FetcherInterface):
    def __init__(self, publishers: list[Ed25519PublicKey], *, threshold: int = 1) -> None:
        self.storage = MemoryStorage()
        self.role_keys = {
            role: [Ed25519PrivateKey.generate() for _ in range(threshold)] for role in ROLES
        }
        signers = {role: [CryptoSigner(k) for k in keys] for role, keys in self.role_keys.items()}
        self.repo = UpdateRepository.create(
            self.storage, signers, publishers=publishers, threshold=threshold
        )
        self.overrides: dict[str, bytes] = {}
        self.fetched: list[str] = []

    @property
    def root_bytes(self) -> bytes:
        return self.storage.read("metadata/1.root.json")

    def serve(self, path: str, data: bytes) -> None:
        """Serve ``data`` for ``path`` from now on (an attacker controlling the mirror)."""
        self.overrides[path] = data

    def stored_target_path(self, target_path: str) -> str:
        return self.repo.stored_path(target_path)

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = urlparse(url).path.lstrip("/")
        self.fetched.append(path)
        if path in self.overrides:
            data = self.overrides[path]
        elif self.storage.exists(path):
            data = self.storage.read(path)
        else:
            raise DownloadHTTPError(f"{path} not found", 404)
        for start in range(0, max(len(data), 1), 1 << 16):
            yield data[start : start + (1 << 16)]
