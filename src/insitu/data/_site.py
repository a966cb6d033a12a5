"""A data set at one site, ready for rounds of training: the one door data goes through.

:class:`SiteDataset` ties the pieces together and records what it did in the ledger:
``data.prepared`` when a release is made, ``data.consent_applied`` each time a round
takes its records (how many were excluded for lack of consent: a count, never who).
Training code (federated rounds, on-device fine-tuning) asks :meth:`SiteDataset.for_round`
for its inputs and receives only encoded features and labels: no identifier, no
pseudonym, no undeclared column reaches it. With them come the 64-bit *subject keys* of
the rows (site-keyed, see ``insitu.data._prepare.subject_tokens``): the privacy budget
charges subjects, not rows, and DP-SGD clips and samples each subject's rows together
(:attr:`TrainingData.groups`), so a subject with several records is protected as one.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from insitu._clock import utc_now
from insitu.audit import events
from insitu.data._consent import ConsentRegistry
from insitu.data._encode import FeatureEncoder
from insitu.data._io import read_table
from insitu.data._prepare import (
    SUBJECT_COLUMN,
    PreparedData,
    load_prepared,
    prepare,
    release_sha256,
    subject_keys,
    write_prepared,
)
from insitu.data._pseudonym import Pseudonymizer
from insitu.data._schema import DataSchema
from insitu.workspace import Workspace

__all__ = ["SiteDataset", "TrainingData"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingData:
    """What training code receives: features, labels, subject keys, figures of the selection."""

    features: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    feature_names: list[str]
    rows: int
    excluded_without_consent: int
    purpose: str
    at: str
    subject_keys: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.uint64))
    excluded_over_budget: int = 0

    @property
    def groups(self) -> np.ndarray:
        """Each row's subject as an index 0..subjects-1 (DP-SGD's unit of privacy)."""
        return np.unique(self.subject_keys, return_inverse=True)[1].astype(np.int64)

    @property
    def subjects(self) -> int:
        """How many distinct subjects the rows belong to."""
        return len(np.unique(self.subject_keys))

    def admitted(self, mask: np.ndarray) -> TrainingData:
        """The rows of ``mask`` (of the subjects a budget admitted); counts the subjects left."""
        return dataclasses.replace(
            self,
            features=self.features[mask],
            labels=self.labels[mask],
            subject_keys=self.subject_keys[mask],
            rows=int(mask.sum()),
            excluded_over_budget=len(np.unique(self.subject_keys[~mask])),
        )


class SiteDataset:
    """A prepared data set of one site (see the module docstring)."""

    def __init__(self, workspace: Workspace, prepared: PreparedData) -> None:
        self.workspace = workspace
        self.prepared = prepared
        self.schema = prepared.schema
        self.encoder = FeatureEncoder.for_schema(self.schema, prepared.frame)

    @classmethod
    def from_file(
        cls,
        workspace: Workspace,
        path: Path,
        schema: DataSchema,
        *,
        k: int | None = None,
        suppress: bool = False,
        force: bool = False,
        out: Path | None = None,
    ) -> SiteDataset:
        """Read and prepare a raw file; seal the release into ``out`` when given."""
        return cls.from_frame(
            workspace,
            read_table(path),
            schema,
            source=path.name,
            k=k,
            suppress=suppress,
            force=force,
            out=out,
        )

    @classmethod
    def from_frame(
        cls,
        workspace: Workspace,
        frame: pd.DataFrame,
        schema: DataSchema,
        *,
        source: str,
        k: int | None = None,
        suppress: bool = False,
        force: bool = False,
        out: Path | None = None,
    ) -> SiteDataset:
        """Prepare a raw table held in memory; seal the release into ``out`` when given."""
        prepared = prepare(
            frame,
            schema,
            Pseudonymizer(workspace.secret("pseudonym")),
            source=source,
            k=k,
            suppress=suppress,
            force=force,
        )
        release: dict[str, str] = {}
        if out is not None:
            write_prepared(out, prepared, workspace.secret("data"))
            digest = release_sha256(out)
            release = {"release_sha256": digest} if digest else {}
        report = prepared.report
        with workspace.ledger() as ledger:
            events.DATA_PREPARED.record(
                ledger,
                dataset=report.dataset,
                schema_sha256=report.schema_sha256,
                rows_in=report.rows_in,
                rows_out=report.rows_out,
                columns=report.columns,
                dropped=report.dropped,
                undeclared=report.undeclared,
                pseudonymized=report.pseudonymized,
                k_requested=report.k_anonymity["k_requested"],
                smallest_class=report.k_anonymity["smallest_class"],
                rows_suppressed=report.rows_suppressed,
                forced_below_k=report.forced_below_k,
                sealed=out is not None,
                out_of_range=report.out_of_range,
                **release,
            )
        return cls(workspace, prepared)

    @classmethod
    def open(cls, workspace: Workspace, directory: Path) -> SiteDataset:
        """Open a sealed release written by :meth:`from_file` with ``out``."""
        return cls(workspace, load_prepared(directory, workspace.secret("data")))

    def for_round(
        self, *, round_number: int | None = None, at: str | None = None, role: str = "training"
    ) -> TrainingData:
        """The records a training round may use at time ``at`` (default: now).

        When the schema requires consent, records whose subject has no valid consent for
        the schema's purpose at ``at`` are left out, and their number is recorded.
        """
        at = at or utc_now()
        frame = self.prepared.frame
        excluded = 0
        purpose = self.schema.consent_purpose
        with self.workspace.ledger() as ledger:
            if self.schema.consent_required and self.schema.subject:
                registry = ConsentRegistry(
                    ledger, Pseudonymizer(self.workspace.secret("pseudonym"))
                )
                allowed = registry.consented(purpose, at=at)
                mask = frame[self.schema.subject].isin(allowed)
                excluded = int((~mask).sum())
                frame = frame[mask]
            events.DATA_CONSENT_APPLIED.record(
                ledger,
                dataset=self.schema.name,
                purpose=purpose,
                round=round_number,
                role=role,
                at=at,
                rows=len(frame),
                excluded_without_consent=excluded,
                consent_required=self.schema.consent_required,
                legal_basis=self.schema.legal_basis or None,
            )
        return TrainingData(
            features=self.encoder.encode(frame),
            labels=self.encoder.labels(frame),
            feature_names=self.encoder.names,
            rows=len(frame),
            excluded_without_consent=excluded,
            purpose=purpose,
            at=at,
            subject_keys=subject_keys(frame[SUBJECT_COLUMN]),
        )
