"""The consent registry of a site: derived from the ledger, never stored beside it.

Every consent change is a ``consent.changed`` entry in the site's ledger, holding the
*pseudonym* of the subject (never the raw id), the purpose and the new status. The
registry is the fold of those entries: the state of a subject for a purpose at a time
is the status of its latest change recorded at or before that time. Keeping the
registry *in* the ledger means one source of truth, tamper-evident like every other
event, and no window in which a withdrawal is logged but not yet effective (or the
reverse), since there is nothing else to update.

Consent is opt-in: a subject with no recorded grant has no consent.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from insitu._clock import utc_now
from insitu.audit import Ledger, events
from insitu.data._pseudonym import Pseudonymizer
from insitu.errors import ConsentError

__all__ = ["ConsentChange", "ConsentRegistry"]

logger = logging.getLogger(__name__)

Status = Literal["granted", "withdrawn"]
_STATUSES = {"granted", "withdrawn"}
EVENT = events.CONSENT_CHANGED.name


@dataclass(frozen=True, slots=True)
class ConsentChange:
    """One recorded change: a subject's pseudonym, a purpose, a status, and when."""

    subject: str
    purpose: str
    status: Status
    time: str


def _check_purpose(purpose: str) -> str:
    purpose = purpose.strip()
    if not purpose or len(purpose) > 64 or not all(c.isalnum() or c in "-_." for c in purpose):
        raise ConsentError(
            f"purpose {purpose!r} is not a short name (letters, digits, '-', '_', '.'), "
            "e.g. 'training' or 'inference-logging'"
        )
    return purpose


class ConsentRegistry:
    """A site's consent registry over its ledger, keyed by subject pseudonyms."""

    def __init__(self, ledger: Ledger, pseudonymizer: Pseudonymizer) -> None:
        self._ledger = ledger
        self._pseudonymizer = pseudonymizer

    def token(self, subject: str) -> str:
        """The pseudonym a raw subject id has at this site."""
        return self._pseudonymizer.token(subject)

    # -- changes ---------------------------------------------------------------------

    def change(
        self, subject: str, purpose: str, status: Status, *, source: str = "cli"
    ) -> ConsentChange:
        """Record one change for a raw subject id (pseudonymized before anything is written)."""
        return self.change_many([(subject, purpose, status)], source=source)[0]

    def change_many(
        self, changes: list[tuple[str, str, Status]], *, source: str = "import"
    ) -> list[ConsentChange]:
        """Record several changes in one ledger transaction: all of them, or none."""
        entries_to_record = []
        for subject, purpose, status in changes:
            if status not in _STATUSES:
                raise ConsentError(f"consent status {status!r} is not 'granted' or 'withdrawn'")
            if not str(subject).strip():
                raise ConsentError("a consent change names no subject")
            entries_to_record.append(
                events.CONSENT_CHANGED.entry(
                    subject=self.token(subject),
                    purpose=_check_purpose(purpose),
                    status=status,
                    source=source,
                )
            )
        entries = self._ledger.record_many(entries_to_record)
        return [
            ConsentChange(e.payload["subject"], e.payload["purpose"], e.payload["status"], e.time)
            for e in entries
        ]

    def import_csv(self, path: Path) -> Counter[str]:
        """Import a CSV with columns ``subject,purpose,status``; returns counts by status.

        Raises:
            ConsentError: missing columns, an unknown status, an empty subject (nothing
                is recorded then).

        """
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                fields = {f.strip() for f in reader.fieldnames or []}
                missing = {"subject", "purpose", "status"} - fields
                if missing:
                    raise ConsentError(
                        f"{path}: missing column(s) {', '.join(sorted(missing))}; a consent "
                        "file has the columns subject,purpose,status"
                    )
                rows = [{k.strip(): (v or "").strip() for k, v in row.items()} for row in reader]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ConsentError(f"cannot read consent file {path}: {exc}") from exc
        changes: list[tuple[str, str, Status]] = []
        for line, row in enumerate(rows, start=2):
            status = row["status"].lower()
            if status not in _STATUSES:
                raise ConsentError(
                    f"{path}, line {line}: status {row['status']!r} is not 'granted' or 'withdrawn'"
                )
            if not row["subject"]:
                raise ConsentError(f"{path}, line {line}: empty subject")
            changes.append((row["subject"], row["purpose"], status))  # type: ignore[arg-type]
        recorded = self.change_many(changes, source="import")
        return Counter(c.status for c in recorded)

    # -- state -----------------------------------------------------------------------

    def changes(self, *, until: str | None = None) -> list[ConsentChange]:
        """Every recorded change, oldest first (optionally up to a UTC time, inclusive)."""
        result = []
        for entry in self._ledger.entries(event_type=EVENT):
            if until is not None and entry.time > until:
                break
            p = entry.payload
            result.append(ConsentChange(p["subject"], p["purpose"], p["status"], entry.time))
        return result

    def state(self, purpose: str, *, at: str | None = None) -> dict[str, Status]:
        """Each subject's latest status for ``purpose`` at UTC time ``at`` (default now)."""
        purpose = _check_purpose(purpose)
        state: dict[str, Status] = {}
        for change in self.changes(until=at or utc_now()):
            if change.purpose == purpose:
                state[change.subject] = change.status
        return state

    def consented(self, purpose: str, *, at: str | None = None) -> set[str]:
        """Pseudonyms of the subjects with a valid consent for ``purpose`` at ``at``."""
        return {s for s, status in self.state(purpose, at=at).items() if status == "granted"}

    def summary(self) -> dict[str, dict[str, int]]:
        """Per purpose: how many subjects have granted and withdrawn consent now."""
        purposes = {c.purpose for c in self.changes()}
        result = {}
        for purpose in sorted(purposes):
            counts = Counter(self.state(purpose).values())
            result[purpose] = {"granted": counts["granted"], "withdrawn": counts["withdrawn"]}
        return result
