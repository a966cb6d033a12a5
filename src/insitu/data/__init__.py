"""The data layer: schemas, minimization, pseudonymization, consent, sealed caches.

Raw data enters insitu only through :class:`SiteDataset` (or :func:`prepare`), which
applies a :class:`DataSchema`: undeclared and dropped columns never reach a model,
identifiers are pseudonymized with a site-held key, quasi-identifiers are generalized
and measured for k-anonymity, and records without consent are left out of each round.
See ``docs/data-protection.md``.

Layer 5: imports ``insitu.privacy`` (secret randomness), ``insitu.workspace``,
``insitu.audit`` and the leaves.

pandas is imported only by what reads or writes tables: a device install, which has no
pandas, still reads schemas and encodes records (``DataSchema``, ``FeatureEncoder``).
The names below are loaded on first use (PEP 562), so importing the package costs
nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from insitu.data._arrays import (
        ArraySchema,
        ArrayTable,
        array_table,
        is_array_data,
        load_schema,
        read_arrays,
    )
    from insitu.data._consent import ConsentChange, ConsentRegistry, Status
    from insitu.data._detect import ColumnFinding, scan_column, scan_frame
    from insitu.data._encode import FeatureEncoder
    from insitu.data._infer import InferredSchema, infer_schema
    from insitu.data._io import read_table
    from insitu.data._kanon import KAnonymity
    from insitu.data._prepare import (
        SUBJECT_COLUMN,
        InspectReport,
        PreparedData,
        PrepareReport,
        inspect_table,
        load_prepared,
        out_of_range,
        out_of_range_warnings,
        prepare,
        release_sha256,
        subject_keys,
        subject_tokens,
        token_uniform,
        write_prepared,
    )
    from insitu.data._pseudonym import Pseudonymizer
    from insitu.data._schema import DataSchema
    from insitu.data._site import SiteDataset, TrainingData

__all__ = [
    "SUBJECT_COLUMN",
    "ArraySchema",
    "ArrayTable",
    "ColumnFinding",
    "ConsentChange",
    "ConsentRegistry",
    "DataSchema",
    "FeatureEncoder",
    "InferredSchema",
    "InspectReport",
    "KAnonymity",
    "PrepareReport",
    "PreparedData",
    "Pseudonymizer",
    "SiteDataset",
    "Status",
    "TrainingData",
    "array_table",
    "infer_schema",
    "inspect_table",
    "is_array_data",
    "load_prepared",
    "load_schema",
    "out_of_range",
    "out_of_range_warnings",
    "prepare",
    "read_arrays",
    "read_table",
    "release_sha256",
    "scan_column",
    "scan_frame",
    "subject_keys",
    "subject_tokens",
    "token_uniform",
    "write_prepared",
]

# Where each public name lives, so that importing the package costs nothing.
_HOMES: dict[str, str] = {
    "ArraySchema": "_arrays",
    "ArrayTable": "_arrays",
    "array_table": "_arrays",
    "is_array_data": "_arrays",
    "load_schema": "_arrays",
    "read_arrays": "_arrays",
    "ColumnFinding": "_detect",
    "ConsentChange": "_consent",
    "ConsentRegistry": "_consent",
    "DataSchema": "_schema",
    "FeatureEncoder": "_encode",
    "InferredSchema": "_infer",
    "InspectReport": "_prepare",
    "KAnonymity": "_kanon",
    "PrepareReport": "_prepare",
    "PreparedData": "_prepare",
    "Pseudonymizer": "_pseudonym",
    "SUBJECT_COLUMN": "_prepare",
    "SiteDataset": "_site",
    "Status": "_consent",
    "TrainingData": "_site",
    "infer_schema": "_infer",
    "inspect_table": "_prepare",
    "load_prepared": "_prepare",
    "out_of_range": "_prepare",
    "out_of_range_warnings": "_prepare",
    "prepare": "_prepare",
    "read_table": "_io",
    "release_sha256": "_prepare",
    "scan_column": "_detect",
    "scan_frame": "_detect",
    "subject_keys": "_prepare",
    "subject_tokens": "_prepare",
    "token_uniform": "_prepare",
    "write_prepared": "_prepare",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
