"""Attacks that remove the ledger's history instead of editing it: each fails at entry 1.

The attacker can write the workspace's files (ledger.db among them) but holds neither
the node's key nor a head an auditor kept. Deleting, emptying or truncating the ledger
must never verify as "0 entries, OK": every workspace's ledger starts with the entry
``insitu init`` wrote, so a ledger without it fails verification at entry 1, and no
command quietly creates a fresh, empty one in its place.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from insitu.audit import TreeHead, events, export_ledger, verify_export
from insitu.audit._merkle import Frontier
from insitu.cli import run
from insitu.errors import (
    BrokenChainError,
    MissingLedgerError,
    TruncatedLedgerError,
)
from insitu.workspace import Workspace
from tests.audit._tamper import raw, rebuild_merkle_state
from tests.conftest import fill


def invoke(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def home(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "ws"
    assert run(["init", "--home", str(path)]) == 0
    capsys.readouterr()
    return path


def _fails_at_entry_1(capsys: pytest.CaptureFixture[str], home: Path, reason: str) -> None:
    """``audit verify`` exits 1 with one line naming entry 1 and ``reason``."""
    code, out, err = invoke(capsys, "audit", "verify", "--home", str(home))
    assert code == 1
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith("error: verification FAILED (first bad entry: 1): ")
    assert reason in line
    code, out, _ = invoke(capsys, "audit", "verify", "--home", str(home), "--json")
    assert code == 1
    document = json.loads(out)
    assert (document["ok"], document["first_bad_seq"]) == (False, 1)
    assert document["error"] == "MissingLedgerError"


def _delete(ledger: Path) -> None:
    ledger.unlink()


def _zero_bytes(ledger: Path) -> None:
    ledger.write_bytes(b"")


def _tables_dropped(ledger: Path) -> None:
    conn = sqlite3.connect(ledger, isolation_level=None)
    for table in ("entries", "heads", "merkle", "meta"):
        conn.execute(f"DROP TABLE {table}")
    conn.close()


def _rows_deleted(ledger: Path) -> None:
    # The careful attacker: every entry and head gone, the Merkle cache made to agree.
    conn = raw(ledger)
    conn.execute("DELETE FROM entries")
    conn.execute("DELETE FROM heads")
    rebuild_merkle_state(conn)
    conn.close()


def _metadata_deleted_too(ledger: Path) -> None:
    _rows_deleted(ledger)
    conn = sqlite3.connect(ledger, isolation_level=None)
    conn.execute("DELETE FROM meta")
    conn.close()


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        (_delete, "is missing: it was deleted or moved"),
        (_zero_bytes, "is empty (0 bytes)"),
        (_tables_dropped, "holds no ledger tables"),
        (_rows_deleted, "the ledger holds no entries"),
        (_metadata_deleted_too, "holds no ledger metadata"),
    ],
    ids=["deleted", "zero-bytes", "tables-dropped", "no-rows", "no-rows-no-meta"],
)
def test_attack_removed_history_fails_verify_at_entry_1(home, capsys, attack, reason):
    ledger = Workspace.layout(home).ledger_path
    attack(ledger)
    _fails_at_entry_1(capsys, home, reason)


def test_attack_deleted_ledger_is_not_recreated_by_any_command(home, capsys):
    ledger = Workspace.layout(home).ledger_path
    ledger.unlink()
    for command in (["audit", "log"], ["audit", "head"], ["audit", "verify"]):
        code, _, err = invoke(capsys, *command, "--home", str(home))
        assert code == 1, command
        assert err.count("\n") == 1
        assert "is missing" in err
    assert not ledger.exists()  # a fresh, empty ledger would verify as "0 entries"


def test_attack_zero_byte_ledger_is_left_as_found(home, capsys):
    ledger = Workspace.layout(home).ledger_path
    ledger.write_bytes(b"")
    assert invoke(capsys, "audit", "verify", "--home", str(home))[0] == 1
    assert ledger.read_bytes() == b""  # no schema written into the evidence


def test_attack_emptied_ledger_is_refused_by_the_api(workspace):
    with workspace.ledger() as ledger:
        fill(ledger, 5)
    _rows_deleted(workspace.ledger_path)
    with (
        workspace.ledger() as ledger,
        pytest.raises(MissingLedgerError, match=r"entry 1 is missing: the ledger holds no") as err,
    ):
        ledger.verify()
    assert err.value.seq == 1


def test_attack_deleted_ledger_cannot_be_opened_to_record(workspace):
    workspace.ledger_path.unlink()
    with pytest.raises(MissingLedgerError, match=r"ledger\.db is missing: it was deleted"):
        workspace.ledger()
    assert not workspace.ledger_path.exists()


def test_attack_init_entry_deleted_fails_at_entry_1(ledger):
    fill(ledger, 5)
    conn = raw(ledger.path)
    conn.execute("DELETE FROM entries WHERE seq = 1")
    conn.execute("DELETE FROM heads")
    rebuild_merkle_state(conn)
    conn.close()
    with pytest.raises(BrokenChainError, match=r"entry 1 is missing") as err:
        ledger.verify()
    assert err.value.seq == 1


def test_attack_history_restarted_with_the_nodes_key_fails_at_entry_1(workspace):
    # An insider with the key empties the ledger and records a new, clean history: every
    # entry is signed and chained, but the ledger no longer starts with the init entry.
    _rows_deleted(workspace.ledger_path)
    with workspace.ledger() as ledger:
        ledger.record("test.event", index=1)
        with pytest.raises(MissingLedgerError, match=r"entry 1 is a 'test\.event' event") as err:
            ledger.verify()
    assert err.value.seq == 1


def test_attack_ledger_cut_below_its_signed_head_fails_at_the_first_missing_entry(home, capsys):
    ws = Workspace.open(home)
    with ws.ledger() as ledger:
        fill(ledger, 30)
        ledger.sign_head()  # a head at 31 entries, stored in the ledger
    conn = raw(ws.ledger_path)
    conn.execute("DELETE FROM entries WHERE seq > 20")
    rebuild_merkle_state(conn)
    conn.close()
    code, out, err = invoke(capsys, "audit", "verify", "--home", str(home), "--json")
    assert code == 1
    document = json.loads(out)
    assert document["error"] == TruncatedLedgerError.__name__
    assert document["first_bad_seq"] == 21
    (line,) = err.splitlines()
    assert "first bad entry: 21" in line
    assert "truncated after entry 20" in line


def test_attack_ledger_cut_to_nothing_under_a_kept_head_fails_at_entry_1(home, capsys, tmp_path):
    kept = tmp_path / "kept-head.json"
    assert invoke(capsys, "audit", "head", "--home", str(home), "--out", str(kept))[0] == 0
    _rows_deleted(Workspace.layout(home).ledger_path)
    code, _, err = invoke(capsys, "audit", "verify", "--home", str(home), "--head", str(kept))
    assert code == 1
    assert "first bad entry: 1" in err
    assert err.count("\n") == 1


def test_attack_export_without_entries_is_refused(workspace, tmp_path):
    # An export whose genuine head covers nothing: no workspace's history is empty.
    key = workspace.signing_key()
    head = TreeHead.sign(key, log=workspace.node_id, size=0, root=Frontier().root())
    with workspace.ledger() as ledger:
        export_ledger(ledger, tmp_path / "real.jsonl")
    header = json.loads((tmp_path / "real.jsonl").read_text().splitlines()[0])
    header["head"] = head.to_json()
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps(header, sort_keys=True, separators=(",", ":")) + "\n")
    with pytest.raises(MissingLedgerError, match=r"entry 1 is missing") as err:
        verify_export(empty, public_key=workspace.signing_public_key)
    assert err.value.seq == 1
    # A ledger that was never a workspace's may opt out of the init-entry rule.
    assert verify_export(empty, public_key=workspace.signing_public_key, first_type=None)


def test_the_init_entry_is_what_every_workspace_ledger_starts_with(workspace):
    with workspace.ledger() as ledger:
        first = ledger.get(1)
        assert ledger.genesis == events.WORKSPACE_INIT.name
    assert first is not None
    assert first.type == events.WORKSPACE_INIT.name


def test_attack_site_ledger_deleted_is_reported_not_left_out(tmp_path):
    # Deleting a site's ledger must not drop the site (and its history) from the report.
    from insitu.report import collect_evidence

    coordinator, _ = Workspace.init(tmp_path / "coordinator", name="coordinator")
    site, _ = Workspace.init(coordinator.site_home("site-a"), name="site-a")
    site.ledger_path.unlink()
    evidence = collect_evidence([coordinator.home])
    assert [le.name for le in evidence.ledgers] == ["coordinator", "site-a"]
    assert not evidence.verified
    (problem,) = evidence.problems
    assert problem.startswith("ledger of site-a: the ledger ")
    assert "is missing" in problem
