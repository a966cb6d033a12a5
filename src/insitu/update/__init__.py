"""Model updates: a TUF repository of bundles (python-tuf) and the device's client.

Publisher side: :class:`UpdateRepository` (any :class:`Storage`; on disk through
:func:`init_directory_repository` / :func:`open_directory_repository`). Device side:
:class:`UpdateClient` (``ngclient.Updater``, A/B slots that are checked and repaired,
rollback, a version floor set at enrollment). A repository may require a fresh TPM quote
of every device it publishes for (:func:`set_device_attestation`).

Layer 7: imports ``insitu.bundle``, ``insitu.attestation``, ``insitu.workspace`` and
``insitu.audit``.
"""

from __future__ import annotations

from insitu.update._attest import DeviceAttestation, device_attestation, set_device_attestation
from insitu.update._client import ClientConfig, UpdateClient
from insitu.update._conformance import tuf_download, tuf_init, tuf_refresh
from insitu.update._repo_dir import (
    init_directory_repository,
    open_directory_repository,
    role_keys_in_token,
    rotate_directory_keys,
)
from insitu.update._repository import UpdateRepository
from insitu.update._serve import make_server
from insitu.update._slots import SlotInfo, SlotStore
from insitu.update._storage import DirectoryStorage, MemoryStorage, Storage

__all__ = [
    "ClientConfig",
    "DeviceAttestation",
    "DirectoryStorage",
    "MemoryStorage",
    "SlotInfo",
    "SlotStore",
    "Storage",
    "UpdateClient",
    "UpdateRepository",
    "device_attestation",
    "init_directory_repository",
    "make_server",
    "open_directory_repository",
    "role_keys_in_token",
    "rotate_directory_keys",
    "set_device_attestation",
    "tuf_download",
    "tuf_init",
    "tuf_refresh",
]
