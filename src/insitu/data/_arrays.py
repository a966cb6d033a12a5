"""Array data sets: images and fixed-length signals, under a schema as tables are.

An array data set is an ``.npz`` file (named arrays: the records, of shape (N, C, H, W)
for images or (N, C, L) for signals; their labels; optionally each record's subject) or
a folder of images with one subfolder per class (PNG or JPEG, read with Pillow). An
:class:`ArraySchema` declares it, in TOML::

    [dataset]
    name = "digits"
    kind = "images"                   # or "signals"
    label = "y"                       # the array of labels (--label y names it)
    subject = "patient"               # optional: the array of each record's subject

    [arrays]
    x = "x"                           # the array of records (default "x")
    shape = [1, 8, 8]                 # one record: (C, H, W) images, (C, L) signals
    value_range = [0, 16]             # the values' declared range (the model scales by it)
    label_names = ["0", "1", "2"]     # the classes, in the order of the model's outputs

    [consent]                         # as for tables (required by default with a subject)
    required = false
    legal_basis = "GDPR art. 6(1)(e), public task"

Why a table underneath: :func:`array_table` turns the declared arrays into a frame whose
columns are the record's values (``x_0``, ``x_1``... in C order), its label (the class
index, zero-padded so that text order is class order) and its subject, with the table
schema :meth:`ArraySchema.table_schema` (each value a numeric feature whose range is the
declared value range). Every guarantee of the table path then holds unchanged:
minimization (only the declared arrays are read from the file; the others are named in
:attr:`ArrayTable.undeclared` and never loaded), pseudonymized subjects, consent by
subject, per-subject budgets, sealed releases and DP-SGD by subject.

Refused, each in one line naming the fix: records whose shape is not the declared one,
labels outside the declared classes, arrays of different lengths. Values outside the
declared range are counted and reported (:attr:`ArrayTable.outside_range`), not hidden.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from insitu._canonical import canonical_bytes
from insitu.data._schema import DataSchema, read_schema_toml
from insitu.errors import DataFormatError, MissingDependencyError, SchemaError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ArraySchema",
    "ArrayTable",
    "array_table",
    "is_array_data",
    "load_schema",
    "read_arrays",
]

logger = logging.getLogger(__name__)

KINDS = {"images": 3, "signals": 2}
_SECTIONS: dict[str, set[str]] = {
    "dataset": {"name", "kind", "label", "subject"},
    "arrays": {"x", "shape", "value_range", "label_names"},
    "consent": {"required", "purpose", "legal_basis"},
}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class ArraySchema:
    """A validated array schema; see the module docstring."""

    name: str
    kind: str
    label: str
    subject: str | None
    x: str
    shape: tuple[int, ...]
    value_range: tuple[float, float]
    label_names: tuple[str, ...]
    source: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def load(cls, path: Path | str) -> ArraySchema:
        """Read and validate an array schema file.

        Raises:
            SchemaError: unreadable, not TOML, or not a valid array schema.

        """
        path = Path(path)
        doc = read_schema_toml(path)
        try:
            return cls.from_dict(doc)
        except SchemaError as exc:
            raise SchemaError(f"schema {path}: {exc}") from None

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ArraySchema:
        """Validate a parsed array schema document."""
        for section, value in doc.items():
            if section not in _SECTIONS or not isinstance(value, dict):
                raise SchemaError(
                    f"unknown section [{section}] in an array schema; known: {', '.join(_SECTIONS)}"
                )
            unknown = set(value) - _SECTIONS[section]
            if unknown:
                raise SchemaError(
                    f"unknown key {section}.{sorted(unknown)[0]}; known keys: "
                    f"{', '.join(sorted(_SECTIONS[section]))}"
                )
        dataset, arrays = doc.get("dataset", {}), doc.get("arrays", {})
        kind = dataset.get("kind")
        if kind not in KINDS:
            raise SchemaError("dataset.kind must be 'images' or 'signals'")
        label, x = dataset.get("label", "y"), arrays.get("x", "x")
        subject = dataset.get("subject")
        for key, value in (("dataset.label", label), ("arrays.x", x)):
            if not isinstance(value, str) or not value:
                raise SchemaError(f"{key} must name an array")
        if subject is not None and (not isinstance(subject, str) or subject in (label, x)):
            raise SchemaError(
                "dataset.subject must name an array other than the records and labels"
            )
        if label == x:
            raise SchemaError(f"array {x!r} cannot be both the records and the labels")
        schema = cls(
            name=str(dataset.get("name", "dataset")),
            kind=kind,
            label=label,
            subject=subject,
            x=x,
            shape=_shape(arrays.get("shape"), kind),
            value_range=_value_range(arrays.get("value_range")),
            label_names=_label_names(arrays.get("label_names")),
            source=doc,
        )
        schema.table_schema()  # the consent section is validated as for tables
        return schema

    @property
    def features(self) -> int:
        """Values per record: the product of the shape."""
        return math.prod(self.shape)

    @property
    def channels(self) -> int:
        """Channels of a record (the first axis of the shape)."""
        return self.shape[0]

    def column_names(self) -> list[str]:
        """The table columns of a record's values, in C order."""
        return [f"{self.x}_{i}" for i in range(self.features)]

    def label_code(self, index: int) -> str:
        """The table's label value of class ``index`` (zero-padded: text order is class order)."""
        return f"{index:0{len(str(len(self.label_names) - 1))}d}"

    def table_schema(self) -> DataSchema:
        """The table schema records become (see the module docstring)."""
        names = self.column_names()
        low, high = self.value_range
        dataset: dict[str, Any] = {
            "name": self.name,
            "label": self.label,
            # Every site numbers the labels by the declared classes, not by those it holds.
            "classes": [self.label_code(i) for i in range(len(self.label_names))],
        }
        if self.subject is not None:
            dataset["subject"] = self.subject
        if len(self.label_names) == 2:
            dataset["positive"] = self.label_code(1)
        doc: dict[str, Any] = {
            "dataset": dataset,
            "features": {"numeric": names, "ranges": {n: [low, high] for n in names}},
        }
        if "consent" in self.source:
            doc["consent"] = dict(self.source["consent"])
        return DataSchema.from_dict(doc)

    def digest(self) -> str:
        """SHA-256 of the canonical schema."""
        return hashlib.sha256(canonical_bytes(self.source)).hexdigest()

    def input_json(self) -> dict[str, Any]:
        """What a model trained on it takes: recorded beside the model (``features.json``)."""
        return {
            "kind": self.kind,
            "shape": list(self.shape),
            "value_range": list(self.value_range),
            "label_names": list(self.label_names),
        }


def _shape(value: Any, kind: str) -> tuple[int, ...]:
    axes = KINDS[kind]
    example = "[1, 8, 8] (C, H, W)" if kind == "images" else "[1, 187] (C, L)"
    ok = isinstance(value, list) and len(value) == axes
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise SchemaError(
            f"arrays.shape of {kind} is {axes} positive whole numbers, e.g. {example}"
        )
    return tuple(value)


def _value_range(value: Any) -> tuple[float, float]:
    numbers = isinstance(value, list) and len(value) == 2
    if not numbers or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        raise SchemaError("arrays.value_range is [low, high], e.g. [0, 255] for 8-bit images")
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise SchemaError(f"arrays.value_range [{low:g}, {high:g}]: low must be below high")
    return low, high


def _label_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) for v in value):
        raise SchemaError('arrays.label_names lists the classes (at least 2), e.g. ["cat", "dog"]')
    if len(set(value)) != len(value):
        raise SchemaError("arrays.label_names lists a class twice")
    return tuple(value)


def load_schema(path: Path | str) -> DataSchema | ArraySchema:
    """A schema file of either kind: an array schema has ``dataset.kind``, a table's not."""
    doc = read_schema_toml(Path(path))
    if "kind" in doc.get("dataset", {}) or "arrays" in doc:
        return ArraySchema.load(path)
    return DataSchema.load(path)


def is_array_data(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is array data (an ``.npz`` file or a folder) rather than a table."""
    path = Path(path)
    return path.is_dir() or path.name.lower().endswith(".npz")


def read_arrays(
    path: Path, names: list[str], *, schema: ArraySchema | None = None
) -> dict[str, np.ndarray]:
    """The arrays ``names`` of an ``.npz`` file, or ``x``/``y`` of a folder of images.

    Only the arrays named are loaded (an ``.npz`` member is read when asked for).

    Raises:
        DataFormatError: the file or folder is missing, unreadable, or lacks an array.
        MissingDependencyError: a folder of images without Pillow installed.

    """
    if path.is_dir():
        return _read_image_folder(path, schema)
    if not path.is_file():
        raise DataFormatError(f"data file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [n for n in names if n not in npz.files]
            if missing:
                raise DataFormatError(
                    f"{path.name} has no array {missing[0]!r} (its arrays: "
                    f"{', '.join(npz.files)}): fix the schema's names or the file"
                )
            return {name: npz[name] for name in names}
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"cannot read {path} as .npz ({exc})") from exc


def _npz_members(path: Path) -> list[str]:
    if path.is_dir():
        return ["x", "y"]
    try:
        with np.load(path, allow_pickle=False) as npz:
            return list(npz.files)
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"cannot read {path} as .npz ({exc})") from exc


def _read_image_folder(path: Path, schema: ArraySchema | None) -> dict[str, np.ndarray]:
    """Images of ``path/<class>/*.png``: ``x`` (N, C, H, W) uint8 and ``y`` (class names)."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow comes with the data extra
        raise MissingDependencyError(
            "reading a folder of images needs Pillow: pip install 'insitu[data]', or "
            "give the images as an .npz"
        ) from exc
    mode = "L" if schema is None or schema.channels == 1 else "RGB"
    images: list[np.ndarray] = []
    labels: list[str] = []
    classes = sorted(p for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataFormatError(
            f"{path} holds no class folders: put each class's images in a subfolder"
        )
    for folder in classes:
        for file in sorted(folder.iterdir()):
            if not file.name.lower().endswith(_IMAGE_SUFFIXES):
                continue
            try:
                with Image.open(file) as image:
                    pixels = np.asarray(image.convert(mode), dtype=np.uint8)
            except OSError as exc:
                raise DataFormatError(f"cannot read image {file} ({exc})") from exc
            images.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
            labels.append(folder.name)
    if not images:
        raise DataFormatError(f"{path} holds no PNG or JPEG images in its class folders")
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        raise DataFormatError(
            f"{path}: images of different sizes ({', '.join(map(str, sorted(sizes)))}): "
            "resize them to one size first"
        )
    return {"x": np.stack(images), "y": np.asarray(labels)}


@dataclass(frozen=True)
class ArrayTable:
    """Array data as the table every later step reads (see the module docstring)."""

    frame: pd.DataFrame = field(repr=False)
    schema: DataSchema
    arrays: ArraySchema
    source: str
    #: Arrays of the file the schema does not declare: never loaded.
    undeclared: list[str]
    #: How many values fall outside the declared range (the encoder clips them).
    outside_range: int


def array_table(
    path: str | os.PathLike[str],
    schema: ArraySchema | None = None,
    *,
    label: str | None = None,
) -> ArrayTable:
    """Read array data under ``schema`` (or one inferred: see :func:`infer_array_schema`).

    Raises:
        SchemaError: the records' shape, the labels or the lengths do not fit the schema.
        DataFormatError: the file cannot be read or lacks a declared array.

    """
    import pandas as pd

    path = Path(path)
    if schema is None:
        schema = infer_array_schema(path, label=label)
    elif label is not None and label != schema.label:
        raise SchemaError(f"--label {label!r} differs from the schema's label {schema.label!r}")
    names = [schema.x, schema.label, *([schema.subject] if schema.subject else [])]
    undeclared = [n for n in _npz_members(path) if n not in names]
    arrays = read_arrays(path, names, schema=schema)
    x = _check_records(arrays[schema.x], schema, source=path.name)
    codes = _label_codes(arrays[schema.label], schema, rows=len(x), source=path.name)
    low, high = schema.value_range
    outside = int(np.count_nonzero((x < low) | (x > high)))
    if outside:
        logger.warning(
            "%s: %d values lie outside the declared range [%g, %g] and will be clipped to it: "
            "widen arrays.value_range or correct the data",
            path.name,
            outside,
            low,
            high,
        )
    frame = pd.DataFrame(x.reshape(len(x), -1), columns=schema.column_names())
    frame[schema.label] = codes
    if schema.subject is not None:
        subjects = np.asarray(arrays[schema.subject])
        if subjects.shape != (len(x),):
            raise SchemaError(
                f"{path.name}: the subject array {schema.subject!r} has shape {subjects.shape}, "
                f"not one subject per record ({len(x)},)"
            )
        frame[schema.subject] = subjects.astype(str)
    return ArrayTable(frame, schema.table_schema(), schema, path.name, undeclared, outside)


def _check_records(x: np.ndarray, schema: ArraySchema, *, source: str) -> np.ndarray:
    if x.ndim < 1 or tuple(x.shape[1:]) != schema.shape:
        got = tuple(x.shape[1:]) if x.ndim else ()
        raise SchemaError(
            f"{source}: the records {schema.x!r} have shape {got}, the schema declares "
            f"{schema.shape} ({'C, H, W' if schema.kind == 'images' else 'C, L'}): fix "
            "arrays.shape or reshape the data"
        )
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataFormatError(
            f"{source}: the records {schema.x!r} are not real numbers ({x.dtype})"
        )
    values = x.astype(np.float64)
    if not np.isfinite(values).all():
        raise DataFormatError(
            f"{source}: the records {schema.x!r} hold {int((~np.isfinite(values)).sum())} "
            "missing or infinite values; clean them first"
        )
    if len(values) == 0:
        raise DataFormatError(f"{source} holds no records")
    return values


def _label_codes(y: np.ndarray, schema: ArraySchema, *, rows: int, source: str) -> np.ndarray:
    """Each record's class as the table's label value; refuses an undeclared class."""
    y = np.asarray(y)
    if y.shape != (rows,):
        raise SchemaError(
            f"{source}: the labels {schema.label!r} have shape {y.shape}, not one per "
            f"record ({rows},)"
        )
    position = {name: i for i, name in enumerate(schema.label_names)}
    if np.issubdtype(y.dtype, np.integer):
        index = y.astype(np.int64)
        bad = (index < 0) | (index >= len(schema.label_names))
    else:
        text = y.astype(str)
        index = np.array([position.get(t, -1) for t in text], dtype=np.int64)
        bad = index < 0
    if bad.any():
        raise SchemaError(
            f"{source}: {int(bad.sum())} labels are not among the {len(schema.label_names)} "
            f"declared classes (e.g. {y[bad][0]!r}): declare them in arrays.label_names"
        )
    codes = [schema.label_code(i) for i in range(len(schema.label_names))]
    return np.asarray(codes, dtype=object)[index]


def infer_array_schema(path: Path, *, label: str | None) -> ArraySchema:
    """A schema read from the data's *form* only: shapes, the values' type, the classes.

    The value range comes from the type (8-bit: [0, 255]); other types need a schema.
    The classes are the distinct labels found (simulation only: they are not released
    under DP, so declare them in a schema for real sites).
    """
    label = label or "y"
    members = _npz_members(path)
    x_name = "x"
    if x_name not in members or label not in members:
        raise SchemaError(
            f"{path.name} needs the arrays 'x' (records) and {label!r} (labels) to be read "
            f"without a schema (it has: {', '.join(members)}); or give --schema"
        )
    arrays = read_arrays(path, [x_name, label])
    x, y = arrays[x_name], np.asarray(arrays[label])
    if x.dtype != np.uint8:
        raise SchemaError(
            f"{path.name}: the records are {x.dtype}, so their range is not known from their "
            "type: write an array schema with arrays.value_range (and give --schema)"
        )
    kind = {4: "images", 3: "signals"}.get(x.ndim)
    if kind is None:
        raise SchemaError(
            f"{path.name}: the records have shape {x.shape[1:]}; use (N, C, H, W) images or "
            "(N, C, L) signals"
        )
    if np.issubdtype(y.dtype, np.integer) and len(y) and y.min() >= 0:
        classes = [str(i) for i in range(int(y.max()) + 1)]  # integer labels index classes
    else:
        classes = sorted({str(v) for v in y.tolist()})
    logger.warning(
        "%s: the %d classes were read from the labels (not under DP: simulation only); "
        "declare them in arrays.label_names of a schema for real sites",
        path.name,
        len(classes),
    )
    return ArraySchema.from_dict(
        {
            "dataset": {"name": path.stem, "kind": kind, "label": label},
            "arrays": {
                "x": x_name,
                "shape": list(x.shape[1:]),
                "value_range": [0, 255],
                "label_names": classes,
            },
            "consent": {
                "required": False,
                "legal_basis": "simulation on one machine (schema inferred, no real subjects)",
            },
        }
    )
