"""The workspace: a node's home directory, its configuration, identity keys and ledger.

Layer 3: owns a node's home and its layout (the paths every package writes under,
:class:`Workspace`), keys and config; imports the ledger (``insitu.audit``) and the
leaves.
"""

from __future__ import annotations

from insitu.workspace._config import Config
from insitu.workspace._keys import (
    PASSPHRASE_ENV,
    load_private_key,
    passphrase_from_env,
    save_private_key,
)
from insitu.workspace._migrate import KeyMigration, migrate_keys
from insitu.workspace._pkcs11 import (
    PIN_ENV,
    TokenKey,
    TokenKeyUri,
    close_token_sessions,
    generate_token_key,
    open_token_key,
    open_token_sessions,
    pin_from_env,
)
from insitu.workspace._workspace import (
    DEFAULT_HOME,
    HOME_ENV,
    PreparedPart,
    Workspace,
    WorkspaceLayout,
    resolve_home,
)

__all__ = [
    "DEFAULT_HOME",
    "HOME_ENV",
    "PASSPHRASE_ENV",
    "PIN_ENV",
    "Config",
    "KeyMigration",
    "PreparedPart",
    "TokenKey",
    "TokenKeyUri",
    "Workspace",
    "WorkspaceLayout",
    "close_token_sessions",
    "generate_token_key",
    "load_private_key",
    "migrate_keys",
    "open_token_key",
    "open_token_sessions",
    "passphrase_from_env",
    "pin_from_env",
    "resolve_home",
    "save_private_key",
]
