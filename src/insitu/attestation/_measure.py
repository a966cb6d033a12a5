"""What "the insitu build" is, as one SHA-256, and what extending it into a PCR gives.

:func:`build_digest` hashes the installed ``insitu`` package directory: every regular
file under it (``.py`` sources, ``py.typed``, templates and data files), in the order of
their relative POSIX paths, each as its path, its length and its bytes, so that renaming,
moving, adding, removing or changing one byte of any file changes the digest, and two
installs of the same build give the same digest wherever they live. Byte-code caches
(``__pycache__``, ``*.pyc``) are left out: the interpreter writes them at run time, and
they follow from the sources.

What it does **not** cover, unless asked: the Python interpreter, the standard library
and every third-party package (PyTorch, Flower, ONNX Runtime, cryptography ...). A
modified Flower is not seen by the default measurement. ``site_packages=True`` adds every
file of the environment's ``site-packages`` directory (slow: about a gigabyte for the
full install, and any package upgrade changes it), the closest this measurement comes to
"the whole environment". Neither covers the operating system, the kernel or the boot
chain: those are measured by firmware and the boot loader into PCRs 0-7 (and by the
kernel's IMA into PCR 10 where it is on), and an allow-list may name those PCRs too.

:func:`expected_pcr` is the value a freshly reset PCR holds after the digest is extended
into it once (``SHA-256(0^32 || digest)``): what an allow-list states for a build.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

__all__ = ["build_digest", "expected_pcr", "package_dir"]

_SKIPPED_DIRS = frozenset({"__pycache__"})
_SKIPPED_SUFFIXES = (".pyc", ".pyo")


def package_dir() -> Path:
    """The directory of the ``insitu`` package this process runs."""
    import insitu

    return Path(insitu.__file__).resolve().parent


def _files(root: Path) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        for name in filenames:
            path = Path(directory, name)
            if name.endswith(_SKIPPED_SUFFIXES) or not path.is_file() or path.is_symlink():
                continue
            found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _tree_digest(root: Path, label: str, sha: hashlib._Hash) -> None:
    sha.update(f"tree {label}\n".encode())
    for relative, path in _files(root):
        data = path.read_bytes()
        name = relative.encode("utf-8", "surrogateescape")
        sha.update(len(name).to_bytes(8, "big") + name + len(data).to_bytes(8, "big"))
        sha.update(data)


def build_digest(root: Path | None = None, *, site_packages: bool = False) -> str:
    """The SHA-256 (hex) of the insitu build at ``root`` (default: the one running).

    See the module docstring for what it covers. With ``site_packages``, every file of
    this environment's ``site-packages`` (``sysconfig``'s ``purelib``) is hashed after
    the package, so the interpreter's third-party packages are covered too.
    """
    sha = hashlib.sha256(b"insitu-build-v1\n")
    _tree_digest(root if root is not None else package_dir(), "insitu", sha)
    if site_packages:
        _tree_digest(Path(sysconfig.get_paths()["purelib"]), "site-packages", sha)
    return sha.hexdigest()


def expected_pcr(digest: str, *, initial: bytes = bytes(32)) -> str:
    """The SHA-256 PCR value (hex) after extending ``digest`` once into ``initial``."""
    return hashlib.sha256(initial + bytes.fromhex(digest)).hexdigest()
