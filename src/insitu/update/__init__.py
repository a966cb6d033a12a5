"""Model updates: a TUF repository of bundles (python-tuf) and the device's client.

Publisher side: :class:`UpdateRepository` (any :class:`Storage`; on disk through
:func:`init_directory_repository` / :func:`open_directory_repository`). Device side:
:class:`UpdateClient` (``ngclient.Updater``, A/B slots that are checked and repaired,
rollback, a version floor set at enrollment).

Layer 7: imports ``insitu.bundle``, ``insitu.workspace`` and ``insitu.audit``.
"""

from __future__ import annotations

from insitu.update._client import ClientConfig, UpdateClient
from insitu.update._conformance import tuf_download, tuf_init, tuf_refresh
from insitu.update._repo_dir import (
    init_directory_repository,
    open_directory_repository,
    rotate_directory_keys,
)
from insitu.update._repository import UpdateRepository
from insitu.update._serve import make_server
from insitu.update._slots import SlotInfo, SlotStore
from insitu.update._storage import DirectoryStorage, MemoryStorage, Storage

__all__ = [
    "ClientConfig",
    "DirectoryStorage",
    "MemoryStorage",
    "SlotInfo",
    "SlotStore",
    "Storage",
    "UpdateClient",
    "UpdateRepository",
    "init_directory_repository",
    "make_server",
    "open_directory_repository",
    "rotate_directory_keys",
    "tuf_download",
    "tuf_init",
    "tuf_refresh",
]
