"""The evidence a report is built from: verified ledgers, and artefacts checked against them.

Invariant: every figure of a report comes from an :class:`Evidence`, which holds only

* ledger entries, each ledger verified first (hash chain, signatures, Merkle heads:
  :meth:`insitu.audit.Ledger.verify`); a ledger that fails is kept, marked unverified,
  with the failure's message;
* artefacts a ledger entry points to, opened only after their SHA-256 was compared with
  the digest that entry holds: the ONNX model of each ``federation.completed``
  (``onnx_sha256``), the data schema in the model's ``features.json`` (its canonical
  digest against ``federation.started.schema_sha256``), and every ``artefacts`` mapping of
  ``{"path", "sha256"}`` in a payload (paths relative to the workspace home).

Nothing is recomputed from data, so anyone holding the workspaces regenerates the same
figures, and tampering with a ledger or an artefact shows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from insitu.audit import Entry
from insitu.errors import LedgerIntegrityError, UsageError, WorkspaceError
from insitu.workspace import Workspace

__all__ = [
    "ArtefactCheck",
    "Evidence",
    "LedgerEvidence",
    "collect_evidence",
    "entry_ref",
    "find_workspaces",
]


@dataclass
class LedgerEvidence:
    """One workspace's ledger: its entries and whether they verified."""

    home: Path
    name: str
    node_id: str
    role: str
    entries: list[Entry] = field(repr=False)
    verified: bool
    problem: str | None = None
    root: str = ""
    heads_checked: int = 0

    def of_type(self, event_type: str) -> list[Entry]:
        """Entries of one type (or a prefix ending in ``.``), oldest first."""
        if event_type.endswith("."):
            return [e for e in self.entries if e.type.startswith(event_type)]
        return [e for e in self.entries if e.type == event_type]


@dataclass(frozen=True)
class ArtefactCheck:
    """An artefact's digest against the ledger entry that points to it."""

    what: str
    path: str
    ledger: str
    seq: int
    expected: str
    actual: str | None

    @property
    def ok(self) -> bool:
        """The file exists and has the digest the ledger holds."""
        return self.actual == self.expected


@dataclass
class Evidence:
    """Everything a report may use (see the module docstring)."""

    ledgers: list[LedgerEvidence]
    artefacts: list[ArtefactCheck]
    _opened: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def verified(self) -> bool:
        """Every ledger verified and every artefact matched its ledger entry."""
        return all(le.verified for le in self.ledgers) and all(a.ok for a in self.artefacts)

    @property
    def problems(self) -> list[str]:
        """One line per failure."""
        lines = [f"ledger of {le.name}: {le.problem}" for le in self.ledgers if not le.verified]
        lines += [
            f"{a.what} {a.path}: "
            + ("missing" if a.actual is None else f"sha256 {a.actual[:16]}... differs from")
            + f" ledger {a.ledger} entry {a.seq} ({a.expected[:16]}...)"
            for a in self.artefacts
            if not a.ok
        ]
        return lines

    @property
    def coordinators(self) -> list[LedgerEvidence]:
        """Ledgers of workspaces that ran a federation."""
        return [le for le in self.ledgers if le.role == "coordinator"]

    @property
    def sites(self) -> list[LedgerEvidence]:
        """Ledgers of workspaces that trained as a site."""
        return [le for le in self.ledgers if le.role == "site"]

    def artefact(self, key: str) -> Any:
        """A verified artefact's parsed content (JSON or bytes), or None if it did not verify."""
        return self._opened.get(key)


def _is_workspace(path: Path) -> bool:
    # The config, not the ledger, makes a workspace: one whose ledger was deleted is
    # reported as unverified, never left out of the report.
    return Workspace.layout(path).config_path.is_file()


def find_workspaces(paths: list[Path]) -> list[Path]:
    """Workspaces at or under ``paths``: a workspace, its ``sites/*``, or a quickstart directory.

    Raises:
        UsageError: a path that holds no workspace.

    """
    found: list[Path] = []
    for path in paths:
        candidates = [path, path / "coordinator"]
        homes = [c for c in candidates if _is_workspace(c)]
        if not homes:
            raise UsageError(
                f"{path} holds no insitu workspace: give a workspace home, or the --out "
                "directory of 'insitu quickstart'"
            )
        for home in homes:
            found.append(home)
            sites = Workspace.layout(home).sites_dir
            if sites.is_dir():
                found += sorted(p for p in sites.iterdir() if _is_workspace(p))
    unique: list[Path] = []
    for home in found:
        if home.resolve() not in {u.resolve() for u in unique}:
            unique.append(home)
    return unique


def _role(entries: list[Entry]) -> str:
    types = {e.type for e in entries}
    if "federation.started" in types:
        return "coordinator"
    if "federation.site_round" in types:
        return "site"
    return "workspace"


def _read_ledger(home: Path) -> LedgerEvidence:
    try:
        ws = Workspace.open(home)
    except WorkspaceError as exc:
        raise UsageError(f"{home}: {exc}") from exc
    try:
        ledger = ws.ledger()
    except LedgerIntegrityError as exc:  # missing, emptied or unreadable
        return LedgerEvidence(home, ws.name, ws.node_id, "workspace", [], False, str(exc))
    with ledger:
        entries = ledger.entries()
        try:
            report = ledger.verify()
        except LedgerIntegrityError as exc:
            return LedgerEvidence(
                home, ws.name, ws.node_id, _role(entries), entries, False, str(exc)
            )
    return LedgerEvidence(
        home,
        ws.name,
        ws.node_id,
        _role(entries),
        entries,
        True,
        root=report.root.hex(),
        heads_checked=report.heads_checked,
    )


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _check_artefacts(evidence: Evidence, le: LedgerEvidence) -> None:
    from insitu.data import DataSchema
    from insitu.errors import SchemaError

    started = {e.payload.get("run"): e for e in le.of_type("federation.started")}
    for entry in le.of_type("federation.completed"):
        run = str(entry.payload["run"])
        model_dir = Workspace.layout(le.home).model_dir(run)
        onnx = model_dir / "model.onnx"
        check = ArtefactCheck(
            "model", str(onnx.relative_to(le.home)), le.name, entry.seq,
            str(entry.payload["onnx_sha256"]), _sha256(onnx),
        )  # fmt: skip
        evidence.artefacts.append(check)
        if check.ok:
            evidence._opened[f"onnx:{run}"] = onnx.read_bytes()
        start = started.get(run)
        features = model_dir / "features.json"
        if start is None or "schema_sha256" not in start.payload:
            continue
        actual: str | None = None
        schema: DataSchema | None = None
        try:
            schema = DataSchema.from_dict(json.loads(features.read_text())["schema"])
            actual = schema.digest()
        except (OSError, ValueError, KeyError, SchemaError):
            actual = None
        check = ArtefactCheck(
            "data schema", str(features.relative_to(le.home)), le.name, start.seq,
            str(start.payload["schema_sha256"]), actual,
        )  # fmt: skip
        evidence.artefacts.append(check)
        if check.ok:
            evidence._opened[f"schema:{run}"] = schema
    for entry in le.entries:
        artefacts = entry.payload.get("artefacts")
        if not isinstance(artefacts, dict):
            continue
        for key, ref in artefacts.items():
            if not isinstance(ref, dict) or "path" not in ref or "sha256" not in ref:
                continue
            path = (le.home / str(ref["path"])).resolve()
            # An entry may only point inside its own workspace (never /etc/...).
            inside = path.is_relative_to(le.home.resolve())
            check = ArtefactCheck(
                f"{entry.type} {key}", str(ref["path"]), le.name, entry.seq,
                str(ref["sha256"]), _sha256(path) if inside else None,
            )  # fmt: skip
            evidence.artefacts.append(check)
            if check.ok:
                data = path.read_bytes()
                try:
                    evidence._opened[f"{entry.seq}:{key}"] = json.loads(data)
                except ValueError:
                    evidence._opened[f"{entry.seq}:{key}"] = data


def collect_evidence(paths: list[Path]) -> Evidence:
    """Verify every ledger at or under ``paths`` and check the artefacts they point to.

    Never raises on tampering: failures are kept in the evidence (``verified`` false,
    ``problems``), so a caller can refuse or mark the report.

    Raises:
        UsageError: a path holds no workspace.

    """
    evidence = Evidence(
        ledgers=[_read_ledger(home) for home in find_workspaces(paths)], artefacts=[]
    )
    for le in evidence.ledgers:
        _check_artefacts(evidence, le)
    return evidence


def entry_ref(le: LedgerEvidence, entries: list[Entry]) -> str:
    """Where a figure came from: ``site-01 #12 privacy.spent`` or a range of entries."""
    if not entries:
        return f"{le.name}: no entry"
    seqs = [e.seq for e in entries]
    if len(seqs) == 1:
        return f"{le.name} #{seqs[0]} {entries[0].type}"
    return f"{le.name} #{min(seqs)}-#{max(seqs)} {entries[0].type} ({len(seqs)})"
