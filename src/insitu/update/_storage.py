"""Where a repository keeps its files: a directory (production) or memory (tests).

A repository is a tree of static files (``metadata/...`` and ``targets/...``) that any
file server or CDN can serve; :class:`DirectoryStorage` writes each file atomically
(temporary file, fsync, rename), so a server never hands out half a file.
:class:`MemoryStorage` keeps every version ever written, which the repository simulator
of the tests uses to replay old metadata (rollback and freeze attacks).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Protocol

from insitu._atomic import atomic_write_bytes

__all__ = ["DirectoryStorage", "MemoryStorage", "Storage"]


def _safe(path: str) -> str:
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise ValueError(f"unsafe repository path {path!r}")
    return str(pure)


class Storage(Protocol):
    """Files of a repository, by relative POSIX path."""

    def read(self, path: str) -> bytes:
        """The bytes at ``path``; ``FileNotFoundError`` if there are none."""
        ...

    def write(self, path: str, data: bytes) -> None:
        """Store ``data`` at ``path`` atomically, replacing what was there."""
        ...

    def exists(self, path: str) -> bool:
        """Whether ``path`` holds a file."""
        ...


class DirectoryStorage:
    """A repository in a directory on disk."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def read(self, path: str) -> bytes:
        """See :class:`Storage`."""
        return (self.root / _safe(path)).read_bytes()

    def write(self, path: str, data: bytes) -> None:
        """See :class:`Storage`."""
        target = self.root / _safe(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)

    def exists(self, path: str) -> bool:
        """See :class:`Storage`."""
        return (self.root / _safe(path)).is_file()


class MemoryStorage:
    """A repository in memory; ``history[path]`` keeps every version written."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.history: dict[str, list[bytes]] = {}

    def read(self, path: str) -> bytes:
        """See :class:`Storage`."""
        try:
            return self.files[_safe(path)]
        except KeyError:
            raise FileNotFoundError(path) from None

    def write(self, path: str, data: bytes) -> None:
        """See :class:`Storage`."""
        path = _safe(path)
        self.files[path] = bytes(data)
        self.history.setdefault(path, []).append(bytes(data))

    def exists(self, path: str) -> bool:
        """See :class:`Storage`."""
        return _safe(path) in self.files
