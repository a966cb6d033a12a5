"""Atomic file writes that an attacker on the machine cannot redirect.

Every file insitu writes (exports, reports, keys, config, sealed caches) goes through
here: a temporary file in the target's directory, fsync, rename over the target, fsync
of the directory. A crash at any point leaves either the old file or the new one, never
half of either.

The same steps hold against someone who can create files next to the target:

* the temporary file has an unpredictable name and is created with ``O_CREAT|O_EXCL``
  (``tempfile.mkstemp``, which adds ``O_NOFOLLOW``): a file or symbolic link planted
  at any name makes the creation pick another name, and is never opened, followed or
  truncated;
* a target that *is* a symbolic link is refused (``OSError`` ``ELOOP``, the error
  ``O_NOFOLLOW`` gives): insitu writes neither through a link (to the file it points
  to) nor over it (the user named a path, not what a link there points to). A link
  planted between the check and the rename is replaced by the rename, which never
  follows links: the file it pointed to is untouched either way;
* the file is created with its final permission bits (``mode``, 0600 for secrets)
  before any byte is written, so a secret is never readable by others, not even for
  the instant between write and chmod.

Files written in place (a log a child process writes to, a lock file) are opened with
:func:`open_no_follow`, which refuses a symbolic link the same way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "atomic_create_bytes",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_writer",
    "fsync_dir",
    "open_no_follow",
    "refuse_symlink",
]

_LINK_REFUSED = "it is a symbolic link, and insitu never writes through or over one"


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or a new file) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def refuse_symlink(path: Path) -> None:
    """Raise ``OSError(ELOOP)`` naming ``path`` if it is a symbolic link (even dangling)."""
    if Path(path).is_symlink():
        raise OSError(errno.ELOOP, _LINK_REFUSED, str(path))


@contextlib.contextmanager
def _temporary(path: Path, mode: int) -> Iterator[tuple[BinaryIO, Path]]:
    """A new, unpredictably named file next to ``path``, fsynced on exit, removed on error."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            yield handle, tmp
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_writer(path: Path, *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Stream bytes into ``path`` atomically: the file appears whole when the block ends.

    Raises:
        OSError: ``ELOOP`` if ``path`` is a symbolic link (nothing is written), or what
            the file system refused.

    """
    path = Path(path)
    refuse_symlink(path)
    with _temporary(path, mode) as (handle, tmp):
        yield handle
    try:
        tmp.replace(path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically, with permission bits ``mode``.

    Raises:
        OSError: ``ELOOP`` if ``path`` is a symbolic link (nothing is written), or what
            the file system refused.

    """
    with atomic_writer(path, mode=mode) as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str, *, mode: int = 0o644) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_create_bytes(path: Path, data: bytes, *, mode: int = 0o600) -> bool:
    """Create ``path`` holding ``data`` unless something exists there; True if created.

    Never overwrites: the complete file is linked into place, which fails if anything
    (a file, a link, another process's copy) is already there; the loser keeps the
    winner's file.
    """
    path = Path(path)
    with _temporary(path, mode) as (handle, tmp):
        handle.write(data)
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def open_no_follow(path: Path, *, append: bool = False, mode: int = 0o600) -> BinaryIO:
    """Open ``path`` for writing in place (truncated, or for ``append``), never via a link.

    For files a child process writes to or that are only locked; everything else is
    written with :func:`atomic_writer`.

    Raises:
        OSError: ``ELOOP`` if ``path`` is a symbolic link, or what the file system refused.

    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_APPEND if append else os.O_TRUNC
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, _LINK_REFUSED, str(path)) from None
        raise
    return os.fdopen(fd, "ab" if append else "wb")
