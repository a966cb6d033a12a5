"""The data layer: schemas, minimization, pseudonymization, consent, sealed caches.

Raw data enters insitu only through :class:`SiteDataset` (or :func:`prepare`), which
applies a :class:`DataSchema`: undeclared and dropped columns never reach a model,
identifiers are pseudonymized with a site-held key, quasi-identifiers are generalized
and measured for k-anonymity, and records without consent are left out of each round.
See ``docs/data-protection.md``.

Layer 5: imports ``insitu.privacy`` (secret randomness), ``insitu.workspace``,
``insitu.audit`` and the leaves.
"""

from __future__ import annotations

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
    prepare,
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
    "infer_schema",
    "inspect_table",
    "load_prepared",
    "prepare",
    "read_table",
    "scan_column",
    "scan_frame",
    "subject_keys",
    "subject_tokens",
    "token_uniform",
    "write_prepared",
]
