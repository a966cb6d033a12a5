"""Applying a schema: minimization, pseudonymization, generalization, k-anonymity.

:func:`prepare` is the only way raw data becomes something insitu trains on. What it
guarantees about the frame it returns (each a test):

* it holds exactly the columns of :attr:`DataSchema.released`, then
  :data:`SUBJECT_COLUMN` — no dropped column, no direct identifier in the clear, no
  column the schema does not declare;
* :data:`SUBJECT_COLUMN` names the data subject of each row with a site-keyed token:
  the pseudonym of the schema's subject column or, without one, a keyed fingerprint of
  the row's content (:func:`subject_tokens`). Privacy budgets are charged to these
  subjects, so renaming the file or the data set, reordering rows or passing a frame
  through the Python API leaves them unchanged;
* pseudonymized columns hold ``p_`` tokens keyed by the site secret, never raw values;
* numeric features are numbers and the label has no missing value;
* its quasi-identifiers are k-anonymous for the requested k, or rows of smaller classes
  were suppressed (and counted), or the caller forced a release below k (and that is
  recorded).

:func:`write_prepared` seals the release with the site's data key; the only plaintext
written beside it is ``manifest.json``, which holds counts and column names, no values.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from insitu._atomic import atomic_write_text
from insitu._sealed import purge_stale_temporaries, read_sealed, write_sealed
from insitu.data._detect import ColumnFinding, scan_frame
from insitu.data._generalize import apply_rule
from insitu.data._kanon import KAnonymity, measure, suppress_below
from insitu.data._pseudonym import Pseudonymizer
from insitu.data._schema import DataSchema
from insitu.errors import DataFormatError, KAnonymityError

__all__ = [
    "SUBJECT_COLUMN",
    "InspectReport",
    "PrepareReport",
    "PreparedData",
    "inspect_table",
    "load_prepared",
    "out_of_range",
    "out_of_range_warnings",
    "prepare",
    "release_sha256",
    "subject_keys",
    "subject_tokens",
    "token_uniform",
    "write_prepared",
]

logger = logging.getLogger(__name__)

SEALED_NAME = "prepared.sealed"
MANIFEST_NAME = "manifest.json"
CONTEXT = "prepared-data"
FORMAT = "insitu-prepared/2"

#: The column of a prepared frame that names each row's data subject (a keyed token).
SUBJECT_COLUMN = "_subject"
_ROW_CONTEXT = "insitu/row-fingerprint/v1\x1e"


def _canonical_value(value: object) -> str:
    """One cell as text that a CSV read and an in-memory frame agree on (39, 39.0, '39')."""
    if value is None or (isinstance(value, float) and value != value):  # noqa: PLR0124 -- NaN
        return ""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    if number != number or number in (float("inf"), float("-inf")):  # noqa: PLR0124
        return text
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return repr(number)


def subject_tokens(
    frame: pd.DataFrame, pseudonymizer: Pseudonymizer, *, subject: str | None
) -> pd.Series:
    """The data subject of each row of a *raw* frame, as a site-keyed ``p_`` token.

    With a ``subject`` column (the schema's ``dataset.subject``), its pseudonym. Without
    one, each row is its own subject, named by a keyed fingerprint of its content: the
    multiset of its values (column names and order play no part, so a renamed or reordered column
    changes nothing) and how many identical rows came before it (two identical rows are
    two records; shuffling them changes nothing). Editing a row's values makes it a new
    record: declare a subject column where that matters.
    """
    if subject is not None:
        return pseudonymizer.series(frame[subject].astype(str)).reset_index(drop=True)
    cells = frame.to_numpy(dtype=object)
    contents = pd.Series(
        ["\x1f".join(sorted(_canonical_value(v) for v in row)) for row in cells], dtype=object
    )
    occurrence = contents.groupby(contents).cumcount()
    return pd.Series(
        [
            pseudonymizer.token(f"{_ROW_CONTEXT}{content}\x1e{nth}")
            for content, nth in zip(contents, occurrence, strict=True)
        ],
        dtype=object,
    )


def subject_keys(tokens: pd.Series) -> np.ndarray:
    """The 64-bit budget keys of subject tokens (the first 64 bits of each ``p_`` token)."""
    return np.array([int(t[2:18], 16) for t in tokens], dtype=np.uint64)


def token_uniform(tokens: pd.Series, *, part: int) -> np.ndarray:
    """A number in [0, 1) per subject token, fixed by the token (bits 64-95 or 96-127).

    Splits drawn from it (held-out records, simulated sites) follow the subject, not the
    row's position: reordering or renaming changes none of them, and two parts are
    independent of each other and of the budget key.
    """
    if part not in (0, 1):
        raise ValueError("part is 0 or 1")
    start = 18 + 8 * part
    return np.array([int(t[start : start + 8], 16) for t in tokens], dtype=np.float64) / 2.0**32


@dataclass(frozen=True)
class InspectReport:
    """What a schema would do to a table, and which columns look like identifiers."""

    rows: int
    features: list[str]
    label: str
    pseudonymized: list[str]
    generalized: dict[str, str]
    kept: list[str]
    dropped: list[str]
    undeclared: list[str]
    findings: dict[str, ColumnFinding]
    warnings: list[str]
    #: Numeric feature -> values outside its declared range (the encoder clips them).
    out_of_range: dict[str, int] = field(default_factory=dict)


def out_of_range(frame: pd.DataFrame, schema: DataSchema) -> dict[str, int]:
    """Numeric features with values outside their declared range -> how many.

    The encoder clips such values to the range (a model never sees a value beyond it);
    this count is how a user learns that a declared range is too narrow, at ``inspect``,
    ``prepare`` (``data.prepared``) and training (``federation.site_round``). Columns
    with none are left out; non-numbers are not counted here (``prepare`` refuses them).
    """
    counts: dict[str, int] = {}
    for column, (low, high) in schema.ranges.items():
        if column not in schema.numeric or column not in frame.columns:
            continue
        values = pd.to_numeric(frame[column], errors="coerce")
        outside = int(((values < low) | (values > high)).sum())
        if outside:
            counts[column] = outside
    return counts


def out_of_range_warnings(counts: dict[str, int], schema: DataSchema, rows: int) -> list[str]:
    """One line per column of :func:`out_of_range`, naming the range and the fix."""
    lines = []
    for column, count in counts.items():
        low, high = schema.ranges[column]
        lines.append(
            f"column {column!r}: {count} of {rows} values ({100 * count / max(rows, 1):.1f}%) lie "
            f"outside its declared range [{low:g}, {high:g}] and are clipped to it: widen "
            f"features.ranges.{column} or correct the data"
        )
    return lines


def inspect_table(frame: pd.DataFrame, schema: DataSchema, *, source: str) -> InspectReport:
    """Describe what :func:`prepare` would do, and warn about identifier-like features."""
    schema.check_columns(frame.columns, source=source)
    findings = scan_frame(frame)
    warnings: list[str] = []
    treated = set(schema.drop) | set(schema.pseudonymize)
    for column, finding in findings.items():
        travels = column in schema.features or column in schema.keep
        if finding.suspicious and travels and column not in treated:
            role = "a feature" if column in schema.features else "kept"
            warnings.append(
                f"column {column!r} is declared {role} but holds {finding.describe()}: "
                "declare it an identifier (drop or pseudonymize) or clean it"
            )
    outside = out_of_range(frame, schema)
    warnings += out_of_range_warnings(outside, schema, len(frame))
    return InspectReport(
        rows=len(frame),
        features=list(schema.features),
        label=schema.label,
        pseudonymized=list(schema.pseudonymize),
        generalized={c: str(r) for c, r in schema.generalize.items()},
        kept=list(schema.keep),
        dropped=[c for c in schema.drop if c in frame.columns],
        undeclared=[c for c in frame.columns if c not in schema.declared],
        findings={c: f for c, f in findings.items() if f.suspicious},
        warnings=warnings,
        out_of_range=outside,
    )


@dataclass(frozen=True)
class PrepareReport:
    """Figures of one preparation; safe to show, log and record (no values)."""

    dataset: str
    schema_sha256: str
    rows_in: int
    rows_out: int
    columns: list[str]
    dropped: list[str]
    undeclared: list[str]
    pseudonymized: list[str]
    generalized: dict[str, str]
    k_anonymity: dict[str, Any]
    rows_suppressed: int
    forced_below_k: bool
    #: Numeric feature -> released values outside its declared range (clipped when encoded).
    out_of_range: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON (the manifest's body)."""
        return asdict(self)


@dataclass(frozen=True)
class PreparedData:
    """A prepared release: the frame and how it was made."""

    frame: pd.DataFrame = field(repr=False)
    schema: DataSchema
    report: PrepareReport


def prepare(
    frame: pd.DataFrame,
    schema: DataSchema,
    pseudonymizer: Pseudonymizer,
    *,
    source: str,
    k: int | None = None,
    suppress: bool = False,
    force: bool = False,
) -> PreparedData:
    """Apply ``schema`` to a raw table; see the module docstring for the guarantees.

    Args:
        frame: the raw table (never modified).
        schema: the data schema.
        pseudonymizer: keyed with this site's secret.
        source: the table's name, for error messages.
        k: requested k-anonymity (default: the schema's ``privacy.k``).
        suppress: remove rows of classes smaller than k instead of refusing.
        force: release below k anyway (recorded as such).

    Raises:
        SchemaError: the schema names a column the table lacks.
        DataFormatError: a numeric feature with a non-number, a missing label.
        KAnonymityError: below k, and neither ``suppress`` nor ``force``.

    """
    schema.check_columns(frame.columns, source=source)
    k = schema.k if k is None else k
    released = schema.released
    subjects = subject_tokens(frame, pseudonymizer, subject=schema.subject)
    # Minimization first: from here on, nothing undeclared or dropped exists.
    out = frame.loc[:, list(released)].copy()
    for column in schema.pseudonymize:
        out[column] = pseudonymizer.series(out[column].astype(str))
    for column, rule in schema.generalize.items():
        out[column] = apply_rule(rule, out[column])
    for column in schema.numeric:
        numbers = pd.to_numeric(out[column], errors="coerce")
        if numbers.isna().any():
            example = out[column][numbers.isna()].iloc[0]
            raise DataFormatError(
                f"{source}: numeric feature {column!r} holds {int(numbers.isna().sum())} "
                f"missing or non-numeric values (e.g. {example!r}); clean them or declare "
                "the column categorical"
            )
        out[column] = numbers.astype("float64")
    for column in schema.categorical:
        out[column] = out[column].astype(str)
    if out[schema.label].isna().any():
        raise DataFormatError(
            f"{source}: the label {schema.label!r} is missing in "
            f"{int(out[schema.label].isna().sum())} rows; drop those rows first"
        )

    columns = list(out.columns)
    out[SUBJECT_COLUMN] = subjects.to_numpy()
    quasi = schema.released_quasi
    before = measure(out, quasi, k)
    suppressed = 0
    if not before.satisfied:
        if suppress:
            out = suppress_below(out, quasi, k)
            suppressed = before.rows - len(out)
        elif not force:
            raise KAnonymityError(
                f"{source}: the release is {before.smallest_class}-anonymous over "
                f"{', '.join(quasi)}, below the requested k={k} ({before.rows_below_k} rows "
                f"in {before.classes_below_k} classes); generalize more, pass --suppress to "
                "remove those rows, or --force to release anyway"
            )
        else:
            logger.warning(
                "releasing below k=%d (smallest class %d) because it was forced",
                k,
                before.smallest_class,
            )
    after = measure(out, quasi, k)
    report = PrepareReport(
        dataset=schema.name,
        schema_sha256=schema.digest(),
        rows_in=len(frame),
        rows_out=len(out),
        columns=columns,
        dropped=[c for c in schema.drop if c in frame.columns],
        undeclared=[c for c in frame.columns if c not in schema.declared],
        pseudonymized=list(schema.pseudonymize),
        generalized={c: str(r) for c, r in schema.generalize.items()},
        k_anonymity=_kanon_json(after, before),
        rows_suppressed=suppressed,
        forced_below_k=force and not after.satisfied,
        out_of_range=out_of_range(out, schema),
    )
    return PreparedData(frame=out.reset_index(drop=True), schema=schema, report=report)


def _kanon_json(after: KAnonymity, before: KAnonymity) -> dict[str, Any]:
    return {
        "quasi_identifiers": list(after.quasi),
        "k_requested": after.k,
        "smallest_class": after.smallest_class,
        "classes": after.classes,
        "rows_below_k": after.rows_below_k,
        "smallest_class_before_suppression": before.smallest_class,
        "satisfied": after.satisfied,
    }


def write_prepared(directory: Path, prepared: PreparedData, data_key: bytes) -> Path:
    """Seal a release into ``directory`` (created if needed); returns the manifest path.

    The sealed data is written first and the manifest last, both atomically: a
    directory with a manifest holds a complete release.
    """
    directory.mkdir(parents=True, exist_ok=True)
    purge_stale_temporaries(directory)
    buffer = io.BytesIO()
    prepared.frame.to_parquet(buffer, index=False)
    write_sealed(directory / SEALED_NAME, buffer.getvalue(), data_key, context=CONTEXT)
    manifest = {
        "format": FORMAT,
        "schema": prepared.schema.source,
        "report": prepared.report.to_json(),
    }
    atomic_write_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return directory / MANIFEST_NAME


def release_sha256(directory: Path) -> str | None:
    """The SHA-256 of the sealed release in ``directory``, or None when it holds none.

    Sealed under a fresh nonce, so two preparations of the same records differ: the
    digest names one release. ``data.prepared`` records it, and a run's rounds name the
    releases they used by it, so a report counts the records of that run's releases only.
    """
    try:
        return hashlib.sha256((directory / SEALED_NAME).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def load_prepared(directory: Path, data_key: bytes) -> PreparedData:
    """Open a sealed release written by :func:`write_prepared` (decrypted in memory only).

    Raises:
        DataFormatError: no complete release in ``directory``.
        SealedFileError: sealed with another site's key, or altered.

    """
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise DataFormatError(
                f"{directory} was prepared by an older insitu (format "
                f"{manifest.get('format')!r}, without subject keys for privacy budgets); "
                "prepare the data again"
            )
        schema = DataSchema.from_dict(manifest["schema"])
        report = PrepareReport(**manifest["report"])
    except FileNotFoundError:
        raise DataFormatError(
            f"{directory} holds no prepared data; run 'insitu data prepare' first"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataFormatError(f"{directory / MANIFEST_NAME} is damaged ({exc})") from exc
    plaintext = read_sealed(directory / SEALED_NAME, data_key, context=CONTEXT)
    frame = pd.read_parquet(io.BytesIO(plaintext))
    if list(frame.columns) != [*schema.released, SUBJECT_COLUMN]:
        raise DataFormatError(f"{directory}: the sealed data does not match its manifest")
    return PreparedData(frame=frame, schema=schema, report=report)
