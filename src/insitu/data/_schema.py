"""The data schema: what each column of a data set is, and what happens to it.

One schema per data set, in TOML (documented in ``docs/data-protection.md``)::

    [dataset]
    name = "adult-income"
    label = "income"
    positive = ">50K"                 # binary label: this value is 1, all others 0
    classes = ["<=50K", ">50K"]       # optional: the label's classes, in the model's order
    subject = "record_id"             # optional; always pseudonymized; consent is keyed by it

    [features]                        # the ONLY columns a model ever receives
    numeric = ["age", "hours_per_week"]
    categorical = ["sex", "occupation"]

    [features.categories]             # fixed vocabularies: every site encodes alike
    sex = ["Female", "Male"]          # without sharing any statistic

    [features.ranges]                 # numeric scaling from declared ranges, not from data
    age = [17, 90]
    capital_gain = [0, 99999]

    [features.transforms]             # optional: "log" scales log(1 + x) over the range,
    capital_gain = "log"              # for heavy-tailed amounts (needs a range from 0)

    [features.bins]                   # optional: also one-hot the value's interval among
    age = [25, 35, 45, 55, 65]        # these public edges (a model sees non-linear effects)

    [identifiers]
    direct = ["name", "email"]        # must be dropped or pseudonymized
    quasi = ["age", "sex", "zip"]     # k-anonymity is measured over these

    [treatment]
    drop = ["name", "fnlwgt"]
    pseudonymize = ["email"]
    generalize = { age = "band:10", zip = "prefix:3", birth_date = "year" }
    keep = ["zip"]                    # carried into the prepared data, never a feature

    [consent]
    required = true                   # default: true when dataset.subject is set
    purpose = "training"
    legal_basis = ""                  # required when consent is not required

    [privacy]
    k = 5                             # refuse a release whose smallest class is below k

    [groups]                          # performance per group of persons (AI Act Annex IV 3)
    sensitive = ["sex", "race"]       # categorical features with declared categories
    min_size = 100                    # a smaller group is reported as suppressed (default 100)
    max_gap = 0.05                    # a gap in accuracy beyond it is flagged (default 0.05)

Invariants a valid :class:`DataSchema` holds (checked in :meth:`DataSchema.from_dict`,
each violation an error naming the column):

* exactly one label, which is not a feature and not treated;
* every column has at most one treatment (``drop``, ``pseudonymize``, ``keep``) and a
  feature is never dropped or pseudonymized;
* every direct identifier, and the subject column, is dropped or pseudonymized and is
  never a feature;
* every quasi-identifier has a declared fate (a feature, kept, generalized or dropped);
* generalization rules are well formed and apply to kept or feature columns;
* every sensitive attribute (``groups.sensitive``) is a categorical feature whose
  categories are declared: its groups are then public, the same at every site, and a
  count per group can be released without revealing which values occur.

Columns of the data that the schema does not declare never reach a model or a prepared
release: minimization by construction. :meth:`DataSchema.check_columns` refuses a schema
that names a column the data does not have.
"""

from __future__ import annotations

import hashlib
import itertools
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from insitu._canonical import canonical_bytes
from insitu.data._generalize import Rule, parse_rule
from insitu.errors import SchemaError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["GROUP_MAX_GAP", "GROUP_MIN_SIZE", "DataSchema"]

_SECTIONS: dict[str, set[str]] = {
    "dataset": {"name", "label", "positive", "subject", "classes"},
    "features": {"numeric", "categorical", "categories", "ranges", "transforms", "bins"},
    "identifiers": {"direct", "quasi"},
    "treatment": {"drop", "pseudonymize", "generalize", "keep"},
    "consent": {"required", "purpose", "legal_basis"},
    "privacy": {"k"},
    "groups": {"sensitive", "min_size", "max_gap"},
}

#: Defaults of ``[groups]``: the smallest group reported as figures (its noisy count of
#: subjects), and the gap in accuracy between two groups beyond which it is flagged.
GROUP_MIN_SIZE = 100
GROUP_MAX_GAP = 0.05


def _str_list(doc: dict[str, Any], section: str, key: str) -> list[str]:
    value = doc.get(section, {}).get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SchemaError(f"{section}.{key} must be a list of column names")
    duplicates = {v for v in value if value.count(v) > 1}
    if duplicates:
        raise SchemaError(f"{section}.{key} lists column {sorted(duplicates)[0]!r} twice")
    return list(value)


def read_schema_toml(path: Path) -> dict[str, Any]:
    """The TOML document of a schema file (tables' and arrays' alike).

    Raises:
        SchemaError: missing, unreadable, or not TOML.

    """
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SchemaError(f"schema file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaError(f"cannot read schema {path} ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SchemaError(f"schema {path} is not valid TOML ({exc})") from exc


@dataclass(frozen=True)
class DataSchema:
    """A validated data schema; see the module docstring."""

    name: str
    label: str
    positive: str | None
    subject: str | None
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    categories: dict[str, tuple[str, ...]]
    ranges: dict[str, tuple[float, float]]
    direct: tuple[str, ...]
    quasi: tuple[str, ...]
    drop: tuple[str, ...]
    pseudonymize: tuple[str, ...]
    keep: tuple[str, ...]
    generalize: dict[str, Rule]
    consent_required: bool
    consent_purpose: str
    legal_basis: str
    k: int
    source: dict[str, Any] = field(repr=False, compare=False)
    transforms: dict[str, str] = field(default_factory=dict)
    bins: dict[str, tuple[float, ...]] = field(default_factory=dict)
    #: Sensitive attributes: performance is measured per group of each (``[groups]``).
    sensitive: tuple[str, ...] = ()
    group_min_size: int = GROUP_MIN_SIZE
    group_max_gap: float = GROUP_MAX_GAP
    #: The label's classes, in the order of the model's outputs (``dataset.classes``):
    #: every site numbers the labels by them, whichever classes its own records hold.
    classes: tuple[str, ...] = ()

    # -- loading -------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path | str) -> DataSchema:
        """Read and validate a schema file.

        Raises:
            SchemaError: unreadable, not TOML, or not a valid schema.

        """
        path = Path(path)
        doc = read_schema_toml(path)
        try:
            return cls.from_dict(doc)
        except SchemaError as exc:
            raise SchemaError(f"schema {path}: {exc}") from None

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> DataSchema:
        """Validate a parsed schema document (see the module docstring for the rules).

        The sections are read in the order below; the first rule broken is raised.
        """
        _check_sections(doc)
        dataset = _Dataset.read(doc)
        columns = _Columns.read(doc)
        _check_label(columns, dataset.label)
        _check_treatments(columns)
        _check_subject(columns, dataset.subject)
        _check_direct(columns)
        generalize = _generalize(doc, columns)
        _check_quasi(columns)
        categories = _categories(doc, columns.categorical)
        ranges = _ranges(doc, columns.numeric)
        transforms = _transforms(doc, columns.numeric, ranges)
        bins = _bins(doc, columns.numeric)
        required, purpose, legal_basis = _consent(doc, subject=dataset.subject)
        k = _k(doc)
        sensitive, min_size, max_gap = _groups(doc, columns.categorical, categories)
        return cls(
            name=dataset.name,
            label=dataset.label,
            positive=dataset.positive,
            subject=dataset.subject,
            numeric=tuple(columns.numeric),
            categorical=tuple(columns.categorical),
            categories=categories,
            ranges=ranges,
            direct=tuple(columns.direct),
            quasi=tuple(columns.quasi),
            drop=tuple(columns.drop),
            pseudonymize=tuple(columns.pseudonymize),
            keep=tuple(columns.keep),
            generalize=generalize,
            consent_required=required,
            consent_purpose=purpose,
            legal_basis=legal_basis,
            k=k,
            source=doc,
            transforms=transforms,
            bins=bins,
            sensitive=sensitive,
            group_min_size=min_size,
            group_max_gap=max_gap,
            classes=dataset.classes,
        )

    @classmethod
    def infer(cls, frame: pd.DataFrame, *, label: str, name: str = "dataset") -> DataSchema:
        """A schema guessed from a table that is already public (NOT private: see below).

        This is the non-private variant of :func:`insitu.data.infer_schema`, kept for
        callers that hold public data (a published benchmark such as the built-in Adult
        table): it publishes the exact observed range of every numeric column and every
        category seen, even one held by a single record. For any other table use
        :func:`insitu.data.infer_schema`, which releases vocabularies and ranges under
        differential privacy and reports what the release cost.

        Identifier-looking columns (e-mail addresses, card numbers, a value unique to
        its row...; :func:`insitu.data._detect.identifier_columns`) are never features
        here either: they are declared direct identifiers and dropped, with a logged
        warning. Columns whose values are all numbers become numeric features with
        their observed range; the others categorical features with their observed
        categories. No subject is assumed, so consent cannot be applied, and the legal
        basis says so.
        """
        import logging

        import pandas as pd

        from insitu.data._detect import identifier_columns

        if label not in frame.columns:
            raise SchemaError(
                f"label column {label!r} is not in the data (its columns: "
                f"{', '.join(map(str, frame.columns))})"
            )
        dropped = identifier_columns(frame, label=label)
        for column, why in dropped.items():
            logging.getLogger(__name__).warning(
                "column %r looks like an identifier (%s): dropped from the inferred schema; "
                "write a schema (insitu data inspect FILE) and declare it an identifier",
                column,
                why,
            )
        numeric: list[str] = []
        categorical: list[str] = []
        ranges: dict[str, list[float]] = {}
        categories: dict[str, list[str]] = {}
        for column in frame.columns:
            if column == label or column in dropped:
                continue
            values = pd.to_numeric(frame[column], errors="coerce")
            if values.notna().all():
                numeric.append(str(column))
                low, high = float(values.min()), float(values.max())
                ranges[str(column)] = [low, high if high > low else low + 1.0]
            else:
                categorical.append(str(column))
                categories[str(column)] = sorted(frame[column].astype(str).unique().tolist())
        labels = sorted(frame[label].astype(str).unique().tolist())
        doc: dict[str, Any] = {
            "dataset": {"name": name, "label": label},
            "features": {
                "numeric": numeric,
                "categorical": categorical,
                "ranges": ranges,
                "categories": categories,
            },
            "consent": {
                "required": False,
                "legal_basis": "simulation on one machine (schema inferred, no real subjects)",
            },
        }
        if dropped:
            doc["identifiers"] = {"direct": list(dropped)}
            doc["treatment"] = {"drop": list(dropped)}
        if len(labels) == 2:
            doc["dataset"]["positive"] = labels[1]
        return cls.from_dict(doc)

    # -- derived views ---------------------------------------------------------------

    @property
    def features(self) -> tuple[str, ...]:
        """The columns a model receives, numeric first."""
        return self.numeric + self.categorical

    @property
    def declared(self) -> set[str]:
        """Every column the schema names."""
        return {
            self.label,
            *self.features,
            *self.direct,
            *self.quasi,
            *self.drop,
            *self.pseudonymize,
            *self.keep,
            *self.generalize,
            *([self.subject] if self.subject else []),
        }

    @property
    def released(self) -> tuple[str, ...]:
        """Columns of a prepared release: pseudonyms, kept columns, features, label."""
        ordered: list[str] = []
        for column in (*self.pseudonymize, *self.keep, *self.features, self.label):
            if column not in ordered:
                ordered.append(column)
        return tuple(ordered)

    @property
    def released_quasi(self) -> tuple[str, ...]:
        """Quasi-identifiers that remain in a release (k-anonymity is measured over them)."""
        return tuple(c for c in self.quasi if c not in self.drop)

    def digest(self) -> str:
        """SHA-256 of the canonical schema: ties a model to the schema it was trained on."""
        return hashlib.sha256(canonical_bytes(self.source)).hexdigest()

    def check_columns(self, columns: Iterable[str], *, source: str) -> None:
        """Refuse a schema that names a column ``source`` does not have."""
        present = set(columns)
        for column in sorted(self.declared):
            if column not in present:
                raise SchemaError(
                    f"column {column!r} is declared in the schema but is not in {source} "
                    f"(its columns: {', '.join(sorted(present))})"
                )


# -- the steps of DataSchema.from_dict, in order ---------------------------------------


def _check_sections(doc: dict[str, Any]) -> None:
    """Only known sections, each a table of known keys."""
    for section, value in doc.items():
        if section not in _SECTIONS:
            raise SchemaError(f"unknown section [{section}]; known: {', '.join(_SECTIONS)}")
        if not isinstance(value, dict):
            raise SchemaError(f"[{section}] must be a table")
        unknown = set(value) - _SECTIONS[section]
        if unknown:
            raise SchemaError(
                f"unknown key {section}.{sorted(unknown)[0]}; "
                f"known keys: {', '.join(sorted(_SECTIONS[section]))}"
            )


@dataclass(frozen=True)
class _Dataset:
    """``[dataset]``: the data set's name, its label column and its subject column."""

    name: str
    label: str
    positive: str | None
    subject: str | None
    classes: tuple[str, ...] = ()

    @classmethod
    def read(cls, doc: dict[str, Any]) -> _Dataset:
        dataset = doc.get("dataset", {})
        label = dataset.get("label")
        if not isinstance(label, str) or not label:
            raise SchemaError("no label column: set dataset.label to the column to predict")
        name = dataset.get("name", "dataset")
        positive = dataset.get("positive")
        subject = dataset.get("subject")
        for key, value in (("name", name), ("positive", positive), ("subject", subject)):
            if value is not None and not isinstance(value, str):
                raise SchemaError(f"dataset.{key} must be a string")
        classes = dataset.get("classes", [])
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise SchemaError('dataset.classes lists the label\'s classes, e.g. ["no", "yes"]')
        if classes and (len(classes) < 2 or len(set(classes)) != len(classes)):
            raise SchemaError("dataset.classes lists at least 2 classes, each once")
        if classes and positive is not None and positive not in classes:
            raise SchemaError(f"dataset.positive {positive!r} is not one of dataset.classes")
        return cls(
            name=name, label=label, positive=positive, subject=subject, classes=tuple(classes)
        )


@dataclass(frozen=True)
class _Columns:
    """The column lists of ``[features]``, ``[identifiers]`` and ``[treatment]``.

    ``pseudonymize`` gains the subject column (:func:`_check_subject`).
    """

    numeric: list[str]
    categorical: list[str]
    direct: list[str]
    quasi: list[str]
    drop: list[str]
    pseudonymize: list[str]
    keep: list[str]

    @classmethod
    def read(cls, doc: dict[str, Any]) -> _Columns:
        return cls(
            numeric=_str_list(doc, "features", "numeric"),
            categorical=_str_list(doc, "features", "categorical"),
            direct=_str_list(doc, "identifiers", "direct"),
            quasi=_str_list(doc, "identifiers", "quasi"),
            drop=_str_list(doc, "treatment", "drop"),
            pseudonymize=_str_list(doc, "treatment", "pseudonymize"),
            keep=_str_list(doc, "treatment", "keep"),
        )

    @property
    def features(self) -> list[str]:
        return self.numeric + self.categorical


def _check_label(columns: _Columns, label: str) -> None:
    """Features are numeric or categorical, not both; the label is neither, nor treated."""
    both = set(columns.numeric) & set(columns.categorical)
    if both:
        raise SchemaError(f"column {sorted(both)[0]!r} is both numeric and categorical")
    if label in columns.features:
        raise SchemaError(f"column {label!r} is the label and also a feature")
    if label in columns.drop + columns.pseudonymize + columns.keep + columns.direct:
        raise SchemaError(f"column {label!r} is the label; it cannot be treated or an identifier")


def _check_treatments(columns: _Columns) -> None:
    """At most one treatment per column; a feature is never dropped or pseudonymized."""
    treatments = {
        "dropped": columns.drop,
        "pseudonymized": columns.pseudonymize,
        "kept": columns.keep,
    }
    names = list(treatments)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            clash = set(treatments[first]) & set(treatments[second])
            if clash:
                raise SchemaError(f"column {sorted(clash)[0]!r} is both {first} and {second}")
    for column in columns.features:
        if column in columns.drop or column in columns.pseudonymize:
            what = "dropped" if column in columns.drop else "pseudonymized"
            raise SchemaError(
                f"column {column!r} is a feature and {what}: a model never receives "
                "dropped or pseudonymized columns; remove it from one list"
            )


def _check_subject(columns: _Columns, subject: str | None) -> None:
    """The subject column is neither a feature, kept nor dropped; it is pseudonymized."""
    if subject is None:
        return
    if subject in columns.features or subject in columns.keep:
        raise SchemaError(
            f"column {subject!r} is the subject identifier; it is always "
            "pseudonymized and can never be a feature or kept"
        )
    if subject in columns.drop:
        raise SchemaError(
            f"column {subject!r} is the subject identifier: consent is keyed by its "
            "pseudonym, so it cannot be dropped; remove it from treatment.drop"
        )
    if subject not in columns.pseudonymize:
        columns.pseudonymize.append(subject)


def _check_direct(columns: _Columns) -> None:
    """Every direct identifier is dropped or pseudonymized, never a feature or kept."""
    for column in columns.direct:
        if column in columns.features or column in columns.keep:
            raise SchemaError(
                f"column {column!r} is a direct identifier and cannot be a feature or kept"
            )
        if column not in columns.drop and column not in columns.pseudonymize:
            raise SchemaError(
                f"direct identifier {column!r} must be dropped or pseudonymized "
                "(treatment.drop or treatment.pseudonymize)"
            )


def _generalize(doc: dict[str, Any], columns: _Columns) -> dict[str, Rule]:
    """``treatment.generalize``: well-formed rules, for feature or kept columns."""
    raw_rules = doc.get("treatment", {}).get("generalize", {})
    if not isinstance(raw_rules, dict):
        raise SchemaError('treatment.generalize must be a table of column = "rule"')
    generalize: dict[str, Rule] = {}
    for column, text in raw_rules.items():
        if column not in columns.features and column not in columns.keep:
            raise SchemaError(f"column {column!r} is generalized but is neither a feature nor kept")
        if not isinstance(text, str):
            raise SchemaError(f"generalization of {column!r} must be a string rule")
        generalize[column] = parse_rule(column, text)
    return generalize


def _check_quasi(columns: _Columns) -> None:
    """Every quasi-identifier has a fate: a feature, kept (either maybe generalized) or dropped."""
    for column in columns.quasi:
        if column not in columns.features + columns.keep + columns.drop:
            raise SchemaError(
                f"quasi-identifier {column!r} has no declared fate: make it a feature, "
                "keep, generalize or drop it"
            )


def _consent(doc: dict[str, Any], *, subject: str | None) -> tuple[bool, str, str]:
    """``[consent]``: (required, purpose, legal basis); required by default with a subject."""
    consent = doc.get("consent", {})
    required = consent.get("required", subject is not None)
    purpose = consent.get("purpose", "training")
    legal_basis = consent.get("legal_basis", "")
    if (
        not isinstance(required, bool)
        or not isinstance(purpose, str)
        or not isinstance(legal_basis, str)
    ):
        raise SchemaError("consent.required is true/false; purpose and legal_basis are strings")
    if required and subject is None:
        raise SchemaError("consent.required needs dataset.subject: consent is recorded per subject")
    if not required and not legal_basis:
        raise SchemaError(
            "consent is not required: state the legal basis in consent.legal_basis "
            "(e.g. 'GDPR art. 9(2)(j), research')"
        )
    return required, purpose, legal_basis


def _groups(
    doc: dict[str, Any], categorical: list[str], categories: dict[str, tuple[str, ...]]
) -> tuple[tuple[str, ...], int, float]:
    """``[groups]``: (sensitive attributes, minimum group size, gap threshold)."""
    sensitive = _str_list(doc, "groups", "sensitive")
    for column in sensitive:
        if column not in categorical or column not in categories:
            raise SchemaError(
                f"groups.sensitive names {column!r}, which is not a categorical feature with "
                f"declared categories: declare it in features.categorical and "
                f"features.categories.{column}"
            )
    groups = doc.get("groups", {})
    min_size = groups.get("min_size", GROUP_MIN_SIZE)
    if not isinstance(min_size, int) or isinstance(min_size, bool) or min_size < 1:
        raise SchemaError("groups.min_size must be a whole number of at least 1 (e.g. 100)")
    max_gap = groups.get("max_gap", GROUP_MAX_GAP)
    ok = isinstance(max_gap, int | float) and not isinstance(max_gap, bool)
    if not ok or not 0 < max_gap <= 1:
        raise SchemaError(
            "groups.max_gap must be a number above 0 and at most 1 (a gap in accuracy, e.g. 0.05)"
        )
    return tuple(sensitive), min_size, float(max_gap)


def _k(doc: dict[str, Any]) -> int:
    k = doc.get("privacy", {}).get("k", 1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise SchemaError("privacy.k must be a whole number of at least 1")
    return k


def _categories(doc: dict[str, Any], categorical: list[str]) -> dict[str, tuple[str, ...]]:
    raw = doc.get("features", {}).get("categories", {})
    if not isinstance(raw, dict):
        raise SchemaError("features.categories must be a table of column = [values]")
    result: dict[str, tuple[str, ...]] = {}
    for column, values in raw.items():
        if column not in categorical:
            raise SchemaError(f"features.categories names {column!r}, which is not categorical")
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, str) for v in values)
        ):
            raise SchemaError(f"features.categories.{column} must be a non-empty list of strings")
        result[column] = tuple(values)
    return result


def _ranges(doc: dict[str, Any], numeric: list[str]) -> dict[str, tuple[float, float]]:
    raw = doc.get("features", {}).get("ranges", {})
    if not isinstance(raw, dict):
        raise SchemaError("features.ranges must be a table of column = [min, max]")
    result: dict[str, tuple[float, float]] = {}
    for column, bounds in raw.items():
        if column not in numeric:
            raise SchemaError(f"features.ranges names {column!r}, which is not numeric")
        ok = (
            isinstance(bounds, list)
            and len(bounds) == 2
            and all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
            and bounds[0] < bounds[1]
        )
        if not ok:
            raise SchemaError(f"features.ranges.{column} must be [min, max] with min < max")
        result[column] = (float(bounds[0]), float(bounds[1]))
    return result


_TRANSFORMS = ("log",)


def _transforms(
    doc: dict[str, Any], numeric: list[str], ranges: dict[str, tuple[float, float]]
) -> dict[str, str]:
    raw = doc.get("features", {}).get("transforms", {})
    if not isinstance(raw, dict):
        raise SchemaError('features.transforms must be a table of column = "log"')
    result: dict[str, str] = {}
    for column, name in raw.items():
        if column not in numeric:
            raise SchemaError(f"features.transforms names {column!r}, which is not numeric")
        if name not in _TRANSFORMS:
            raise SchemaError(
                f"features.transforms.{column} = {name!r} is unknown; use one of {_TRANSFORMS}"
            )
        if column not in ranges or ranges[column][0] < 0:
            raise SchemaError(
                f"features.transforms.{column} = 'log' needs features.ranges.{column} "
                "with a minimum of 0 or more"
            )
        result[column] = name
    return result


def _bins(doc: dict[str, Any], numeric: list[str]) -> dict[str, tuple[float, ...]]:
    raw = doc.get("features", {}).get("bins", {})
    if not isinstance(raw, dict):
        raise SchemaError("features.bins must be a table of column = [edge, edge, ...]")
    result: dict[str, tuple[float, ...]] = {}
    for column, edges in raw.items():
        if column not in numeric:
            raise SchemaError(f"features.bins names {column!r}, which is not numeric")
        ok = (
            isinstance(edges, list)
            and len(edges) >= 1
            and all(isinstance(e, int | float) and not isinstance(e, bool) for e in edges)
            and all(a < b for a, b in itertools.pairwise(edges))
        )
        if not ok:
            raise SchemaError(
                f"features.bins.{column} must be a non-empty list of strictly increasing numbers"
            )
        result[column] = tuple(float(e) for e in edges)
    return result
