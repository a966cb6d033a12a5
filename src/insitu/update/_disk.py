"""The device's update directory refusing a write: read-only, full, or not ours.

An update writes in three places of ``update/`` (TUF's trusted metadata, the download
area and the A/B slots), each through a temporary file and a rename, so a refused write
leaves no half-written file and the active slot untouched. What remains is to say so in
one line that names the directory and what to check (not an ``OSError`` and a path deep
inside it), and to record the failure in the ledger when the ledger can still be written.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from pathlib import Path

from insitu.audit import Ledger, events
from insitu.errors import InsituError, InstallError

__all__ = ["record_failure", "storage_failure"]

logger = logging.getLogger(__name__)

_CHECKS = {
    errno.EROFS: "that its file system is not mounted read-only",
    errno.ENOSPC: "the free space on its disk",
    errno.EDQUOT: "the disk quota of the user running insitu",
    errno.EACCES: "that the user running insitu may write it (and everything in it)",
    errno.EPERM: "that the user running insitu may write it (and everything in it)",
}


def _reason(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc) or type(exc).__name__
    return f"{name}: {text}" if name else text


def _where(directory: Path, exc: OSError) -> str:
    """The file the write was refused for, relative to ``directory`` ("" if elsewhere)."""
    if exc.filename is None:
        return ""
    try:
        return str(Path(str(exc.filename)).resolve().relative_to(directory.resolve()))
    except (ValueError, OSError):
        return ""


def storage_failure(directory: Path, exc: OSError, action: str) -> InstallError:
    """The one-line error for ``exc`` raised while ``action`` wrote ``directory``."""
    check = _CHECKS.get(exc.errno or 0, "its permissions and the free space on its disk")
    where = _where(directory, exc)
    at = f" at {where}" if where and where != "." else ""
    return InstallError(
        f"{action} failed: the update directory {directory} cannot be written "
        f"({_reason(exc)}{at}); check {check}, then run 'insitu {action}' again. The "
        "active model was not changed"
    )


def record_failure(
    ledger: Ledger | None, directory: Path, exc: OSError, *, model: str, action: str
) -> None:
    """Record ``update.failed`` if the ledger can still be written (it may not: same disk)."""
    if ledger is None:
        return
    try:
        events.UPDATE_FAILED.record(
            ledger,
            model=model,
            action=action,
            reason=_reason(exc),
            path=_where(directory, exc),
        )
    except (OSError, sqlite3.Error, InsituError) as failure:
        logger.warning("the failure could not be recorded in the ledger either (%s)", failure)
