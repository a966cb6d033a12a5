"""Data sets insitu carries, so that the quickstart and examples run on a fresh machine.

Layer 1: a leaf (imports ``insitu.errors`` only).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from insitu.errors import UsageError

__all__ = ["BUILTIN", "builtin_data", "builtin_schema"]

#: name -> (data file, schema file), inside this package.
BUILTIN = {"adult": ("adult.csv.gz", "adult.schema.toml")}


def _path(name: str, index: int) -> Path:
    if name not in BUILTIN:
        raise UsageError(f"no built-in data set {name!r}; available: {', '.join(BUILTIN)}")
    return Path(str(resources.files(__package__).joinpath(BUILTIN[name][index])))


def builtin_data(name: str = "adult") -> Path:
    """Path of a built-in data file (see datasets/README.md for sources and licenses)."""
    return _path(name, 0)


def builtin_schema(name: str = "adult") -> Path:
    """Path of a built-in data set's schema."""
    return _path(name, 1)
