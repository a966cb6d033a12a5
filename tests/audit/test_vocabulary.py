"""The ledger's vocabulary is written down, and the package speaks nothing else.

Read from the code itself (``ast``): every ledger write in ``src/insitu`` goes through an
event of ``insitu.audit.events``; every event type a reader filters on is one of them;
``docs/ledger.md`` lists exactly them. Each rule is shown to fail on a planted violation.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from insitu.audit import events
from insitu.audit.events import VOCABULARY, Event
from insitu.errors import InvalidEventError

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "insitu"
_TYPE = re.compile(r"^[a-z_]+\.[a-z_]+$")
#: The two places that may call ``Ledger.record`` itself: the ledger and the vocabulary.
_WRITERS = {"audit/_ledger.py", "audit/events.py"}


def _receiver(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def violations(sources: dict[str, str]) -> list[str]:
    """Ledger writes and reads outside the vocabulary in ``sources``, one line each."""
    found: list[str] = []
    for path, text in sorted(sources.items()):
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            method, owner = node.func.attr, node.func.value
            where = f"{path}:{node.lineno}"
            direct = method == "record" and "ledger" in _receiver(owner).lower()
            if direct and path not in _WRITERS:
                found.append(f"{where}: writes the ledger directly; use an event of events")
            named = (
                method in ("record", "entry")
                and isinstance(owner, ast.Attribute)
                and isinstance(owner.value, ast.Name)
                and owner.value.id == "events"
            )
            if named and path.startswith("cli/"):
                found.append(f"{where}: the command line writes a domain event; the domain does")
            if named and not isinstance(getattr(events, owner.attr, None), Event):
                found.append(f"{where}: events.{owner.attr} is not in the vocabulary")
            literals = [a for a in node.args if isinstance(a, ast.Constant)]
            literals += [k.value for k in node.keywords if k.arg == "event_type"]
            if method in ("of_type", "entries"):
                for literal in literals:
                    value = getattr(literal, "value", None)
                    if isinstance(value, str) and _TYPE.match(value) and value not in VOCABULARY:
                        found.append(f"{where}: reads {value!r}, which nothing records")
    return found


def _tree() -> dict[str, str]:
    return {str(p.relative_to(SRC)): p.read_text(encoding="utf-8") for p in SRC.rglob("*.py")}


def test_the_package_records_and_reads_only_the_vocabulary():
    assert violations(_tree()) == []


def test_a_planted_unknown_event_type_is_found():
    tree = _tree()
    tree["federated/_planted.py"] = "def f(ledger):\n    events.FEDERATION_BOGUS.record(ledger)\n"
    (line,) = violations(tree)
    assert "events.FEDERATION_BOGUS is not in the vocabulary" in line


def test_a_planted_direct_ledger_write_is_found():
    tree = _tree()
    tree["cli/_planted.py"] = "def f(ledger):\n    ledger.record('privacy.audit', run='r')\n"
    (line,) = violations(tree)
    assert "writes the ledger directly" in line


def test_a_planted_domain_event_written_by_the_command_line_is_found():
    tree = _tree()
    tree["cli/_planted.py"] = "def f(ledger):\n    events.PRIVACY_AUDIT.record(ledger)\n"
    (line,) = violations(tree)
    assert "the command line writes a domain event" in line


def test_a_planted_reader_of_an_unrecorded_type_is_found():
    tree = _tree()
    tree["report/_planted.py"] = "def f(site):\n    return site.of_type('training.round')\n"
    (line,) = violations(tree)
    assert "reads 'training.round', which nothing records" in line


def test_docs_ledger_lists_exactly_the_vocabulary():
    doc = (ROOT / "docs" / "ledger.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", doc, flags=re.MULTILINE))
    assert listed == set(VOCABULARY)
    # Nor does the text name an event that no code records (the old examples did).
    domains = {name.split(".")[0] for name in VOCABULARY} | {"training", "model", "inference"}
    named = {n for n in re.findall(r"`([a-z_]+\.[a-z_]+)`", doc) if n.split(".")[0] in domains}
    assert named <= set(VOCABULARY)


def test_an_event_refuses_a_payload_that_does_not_fit(ledger):
    with pytest.raises(InvalidEventError, match="misses round"):
        events.FEDERATION_FAILED.record(ledger, run="r", sites={}, reason="x")
    with pytest.raises(InvalidEventError, match="'extra' is not a key"):
        events.FEDERATION_FAILED.record(ledger, run="r", round=1, sites={}, reason="x", extra=1)
    with pytest.raises(InvalidEventError, match="'round' is str, expected int"):
        events.FEDERATION_FAILED.record(ledger, run="r", round="1", sites={}, reason="x")
    with pytest.raises(InvalidEventError, match="'rows' is bool"):
        events.INFERENCE_COUNTED.record(
            ledger, model="m", version="1", hour="h", requests=1, rows=True, errors=0,
            partial=False,
        )  # fmt: skip
    assert len(ledger) == 1  # workspace.init only: nothing was written
    entry = events.FEDERATION_FAILED.record(ledger, run="r", round=None, sites={}, reason="x")
    assert entry.type == "federation.failed"
    # An open payload (a report's figures) takes further keys beside its fields.
    events.MODEL_OPTIMIZED.record(
        ledger, source_sha256="a" * 64, chosen=None, chosen_sha256=None, candidates={}, seen=3
    )
