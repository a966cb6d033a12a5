"""Declarations of processing (GDPR Art. 30): the controller's statements, in the ledger.

What no ledger can measure (who the controller is, the purposes, the categories of data
subjects, the legal basis, recipients, transfers to third countries, time limits for
erasure) the controller declares. :func:`declare_processing` (``insitu report declare``,
and the quickstart's demonstration values) records it as ``processing.declared`` in the
coordinator's ledger; the report's Art. 30 rows read the latest such entry and print an
item nobody declared as "not declared".

Invariants:

* a declaration is recorded only when it changes what the ledger holds: declaring the
  same items twice adds no entry;
* an item not given keeps its declared value (a declaration is amended, never emptied by
  omission); an empty value withdraws the item, which then reads "not declared";
* every entry holds the whole declaration in force, so the latest entry alone is the
  record (an old entry is never needed to read it).
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from insitu.audit import Entry, events
from insitu.errors import PersonalDataError, UsageError

if TYPE_CHECKING:
    from insitu.workspace import Workspace

__all__ = ["ITEMS", "Declaration", "declare_processing", "load_declaration"]

logger = logging.getLogger(__name__)

#: The declared items, in the order of the report's Art. 30 rows.
ITEMS = (
    "controller",
    "purposes",
    "data_subjects",
    "legal_basis",
    "recipients",
    "transfers",
    "retention",
)
_CONTEXT = ("sites", "schema_sha256")


@dataclass(frozen=True)
class Declaration:
    """The declaration in force after :func:`declare_processing`, and its new entry."""

    items: dict[str, Any]
    #: The ``processing.declared`` entry written, or None: nothing changed.
    entry: Entry | None = field(default=None, repr=False)

    @property
    def changed(self) -> bool:
        """Whether this call recorded an entry."""
        return self.entry is not None

    @property
    def missing(self) -> list[str]:
        """The items not declared (the report prints them as such)."""
        return [k for k in ITEMS if not self.items.get(k)]

    def to_json(self) -> dict[str, Any]:
        """The declaration, whether it was recorded, its entry's number."""
        return {
            "declaration": {k: self.items.get(k) for k in ITEMS},
            "recorded": self.changed,
            "seq": self.entry.seq if self.entry is not None else None,
            "not_declared": self.missing,
        }


def _clean(key: str, value: Any) -> Any:
    """A declared value in the ledger's form: text or None; purposes a list of text."""
    if key == "purposes":
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
            raise UsageError("purposes: give text, or a list of texts (one per purpose)")
        return [v.strip() for v in values if v.strip()]
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError(f"{key}: give text, not {type(value).__name__}")
    return value.strip() or None


def load_declaration(path: Path) -> dict[str, Any]:
    """The items of a TOML declaration (``controller = "..."``, ``purposes = [...]``, ...).

    Keys are the items of :data:`ITEMS` (``data-subjects`` and ``data_subjects`` alike).

    Raises:
        UsageError: the file cannot be read, is not TOML, or holds another key or type.

    """
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the declaration ({exc.strerror or exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not TOML ({exc}); see docs/report.md") from exc
    items: dict[str, Any] = {}
    for key, value in doc.items():
        name = key.replace("-", "_")
        if name not in ITEMS:
            raise UsageError(
                f"{path}: {key!r} is not an item of a declaration; use "
                f"{', '.join(ITEMS)} (docs/report.md)"
            )
        items[name] = _clean(name, value)
    return items


def _latest(workspace: Workspace) -> Entry | None:
    with workspace.ledger() as ledger:
        found = ledger.entries(
            event_type=events.PROCESSING_DECLARED.name, newest_first=True, limit=1
        )
    return found[0] if found else None


def declare_processing(
    workspace: Workspace,
    items: Mapping[str, Any],
    *,
    sites: int | None = None,
    schema_sha256: str | None = None,
) -> Declaration:
    """Amend the declaration in ``workspace``'s ledger with ``items``; record it if changed.

    ``items`` maps items of :data:`ITEMS` to text (``purposes``: a list of texts); an item
    absent keeps its declared value, an empty one withdraws it. ``sites`` and
    ``schema_sha256`` say what the declaration was made for (the quickstart's run).

    Raises:
        UsageError: an unknown item, or a value of another type.
        PersonalDataError: a value looks like personal data (an e-mail address...): the
            ledger holds none.

    """
    unknown = sorted(set(items) - set(ITEMS))
    if unknown:
        raise UsageError(
            f"not items of a declaration: {', '.join(unknown)}; use {', '.join(ITEMS)}"
        )
    latest = _latest(workspace)
    previous: dict[str, Any] = dict(latest.payload) if latest is not None else {}
    declared: dict[str, Any] = {k: previous.get(k, [] if k == "purposes" else None) for k in ITEMS}
    declared.update({k: _clean(k, v) for k, v in items.items()})
    context = {k: previous[k] for k in _CONTEXT if k in previous}
    context.update(
        {k: v for k, v in (("sites", sites), ("schema_sha256", schema_sha256)) if v is not None}
    )
    payload = declared | context
    empty = not any(declared.values())
    if (latest is not None and payload == dict(latest.payload)) or (latest is None and empty):
        logger.info("the declaration of processing is unchanged: nothing recorded")
        return Declaration(declared)
    try:
        with workspace.ledger() as ledger:
            entry = events.PROCESSING_DECLARED.record(ledger, **payload)
    except PersonalDataError as exc:
        raise PersonalDataError(
            f"{exc}; in a declaration, name the controller or recipient (its contact details "
            "belong in the record kept outside insitu)"
        ) from exc
    return Declaration(declared, entry)
