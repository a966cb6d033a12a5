"""Data sets insitu carries, so that the quickstart and examples run on a fresh machine.

Layer 1: a leaf (imports ``insitu.errors`` only).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from insitu.errors import UsageError

__all__ = ["BUILTIN", "DIGITS_SCHEMA", "builtin_data", "builtin_schema", "write_digits"]

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


#: The array schema of :func:`write_digits`' file (see insitu.data's array schemas).
DIGITS_SCHEMA = """\
[dataset]
name = "digits"
kind = "images"
label = "y"

[arrays]
x = "x"
shape = [1, 8, 8]
value_range = [0, 16]
label_names = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]

[consent]
required = false
legal_basis = "public data set (scikit-learn's copy of the UCI optical digits)"
"""


def write_digits(directory: Path) -> tuple[Path, Path]:
    """Write scikit-learn's digits as ``digits.npz`` and its schema; their paths.

    1,797 real 8x8 handwritten digits (UCI optical recognition of handwritten digits,
    as scikit-learn ships them: no download): ``x`` (1797, 1, 8, 8) uint8 in [0, 16] and
    ``y`` the digit. Nothing is shipped by insitu: scikit-learn (the audit extra) is read.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn comes with the audit extra
        raise UsageError("the digits need scikit-learn: pip install 'insitu[audit]'") from exc
    import numpy as np

    digits = load_digits()
    directory.mkdir(parents=True, exist_ok=True)
    data, schema = directory / "digits.npz", directory / "digits.schema.toml"
    images = digits.images.astype(np.uint8)[:, None, :, :]
    with data.open("wb") as handle:
        np.savez_compressed(handle, x=images, y=digits.target.astype(np.int64))
    schema.write_text(DIGITS_SCHEMA, encoding="utf-8")
    return data, schema
