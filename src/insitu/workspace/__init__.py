"""The workspace: a node's home directory, its configuration, identity keys and ledger."""

from __future__ import annotations

from insitu.workspace._config import Config
from insitu.workspace._keys import PASSPHRASE_ENV
from insitu.workspace._workspace import DEFAULT_HOME, HOME_ENV, Workspace, resolve_home

__all__ = ["DEFAULT_HOME", "HOME_ENV", "PASSPHRASE_ENV", "Config", "Workspace", "resolve_home"]
