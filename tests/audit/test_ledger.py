"""Recording, querying, heads and proofs of the ledger API."""

from __future__ import annotations

import sqlite3

import pytest

from insitu.audit import Ledger, check_proof, consistency_document, inclusion_document
from insitu.errors import InvalidEventError, LedgerError, PersonalDataError
from tests.conftest import fill


def test_record_returns_a_chained_signed_entry(ledger):
    before = len(ledger)
    first = ledger.record("model.installed", model="adult-income", version="1.2.0")
    second = ledger.record("inference.count", model="adult-income", count=42)
    assert (first.seq, second.seq) == (before + 1, before + 2)
    assert second.prev == first.hash
    assert first.payload == {"model": "adult-income", "version": "1.2.0"}
    assert first.computed_hash() == first.hash
    assert len(first.sig) == 64
    ledger.verify()


def test_queries_by_type_prefix_time_and_limit(ledger):
    fill(ledger, 5, "training.round")
    fill(ledger, 3, "model.published")
    assert len(ledger.entries(event_type="training.round")) == 5
    assert len(ledger.entries(event_type="model.")) == 3
    assert len(ledger.entries(event_type="training.")) == 5
    newest = ledger.entries(newest_first=True, limit=2)
    assert [e.seq for e in newest] == [len(ledger), len(ledger) - 1]
    assert ledger.entries(since="2999-01-01") == []
    assert len(ledger.entries(until="2999-01-01")) == len(ledger)
    middle = ledger.entries()[3].time
    assert all(e.time >= middle for e in ledger.entries(since=middle))


def test_a_signed_head_is_stored_every_head_interval_entries(workspace):
    with Ledger(
        workspace.ledger_path,
        log_id=workspace.node_id,
        public_key=workspace.signing_public_key,
        signing_key=workspace.signing_key(),
        head_interval=10,
    ) as ledger:
        fill(ledger, 25)
        sizes = [h.size for h in ledger.heads()]
        assert 10 in sizes
        assert 20 in sizes
        assert ledger.verify().heads_checked == len(sizes)


@pytest.mark.parametrize(
    ("event_type", "payload", "error"),
    [
        ("NoDots", {}, InvalidEventError),
        ("training", {}, InvalidEventError),
        ("training.round", {"loss": float("nan")}, InvalidEventError),
        ("training.round", {"blob": b"raw bytes"}, InvalidEventError),
        ("training.round", {"text": "x" * 5000}, InvalidEventError),
        ("consent.changed", {"subject": "jane.doe@example.org"}, PersonalDataError),
        ("consent.changed", {"card": "4111 1111 1111 1111"}, PersonalDataError),
        ("consent.changed", {"iban": "CH93 0076 2011 6238 5295 7"}, PersonalDataError),
        ("consent.changed", {"phone": "+41 79 123 45 67"}, PersonalDataError),
        ("consent.changed", {"nested": [{"who": "bob@example.com"}]}, PersonalDataError),
    ],
)
def test_invalid_or_personal_payloads_are_refused_and_nothing_is_written(
    ledger, event_type, payload, error
):
    before = len(ledger)
    with pytest.raises(error):
        ledger.record(event_type, **payload)
    assert len(ledger) == before


def test_digests_and_counts_are_not_mistaken_for_personal_data(ledger):
    ledger.record(
        "model.published",
        sha256="0123456789012345678901234567890123456789012345678901234567890123",
        rows=4111111111111111,
        version="2026.11.22",
    )


def test_append_only_triggers_refuse_update_and_delete(ledger):
    fill(ledger, 2)
    conn = sqlite3.connect(ledger.path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE entries SET payload = '{}' WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM entries WHERE seq = 2")
    conn.close()
    ledger.verify()


def test_read_only_ledger_refuses_to_record(workspace):
    with Ledger(
        workspace.ledger_path, log_id=workspace.node_id, public_key=workspace.signing_public_key
    ) as ledger:
        assert ledger.verify().entries >= 1
        with pytest.raises(LedgerError, match="read-only"):
            ledger.record("test.event")


def test_opening_another_nodes_ledger_is_refused(workspace, tmp_path):
    from insitu.workspace import Workspace

    other, _ = Workspace.init(tmp_path / "other")
    with pytest.raises(LedgerError, match="belongs to node"):
        Ledger(workspace.ledger_path, log_id=other.node_id, public_key=other.signing_public_key)


def test_inclusion_and_consistency_proof_documents_verify(ledger, workspace):
    kept = ledger.sign_head()
    fill(ledger, 37)
    doc = inclusion_document(ledger, 5)
    checked = check_proof(doc, workspace.signing_public_key)
    assert checked.kind == "inclusion"
    growth = check_proof(consistency_document(ledger, kept), workspace.signing_public_key)
    assert f"from {kept.size} to {len(ledger)}" in growth.summary


def test_record_many_is_all_or_nothing(ledger):
    before = len(ledger)
    with pytest.raises(PersonalDataError):
        ledger.record_many(
            [("test.event", {"i": 1}), ("test.event", {"who": "someone@example.org"})]
        )
    assert len(ledger) == before
    entries = ledger.record_many([("test.event", {"i": i}) for i in range(300)])
    assert [e.seq for e in entries] == list(range(before + 1, before + 301))
    assert ledger.verify().entries == before + 300
    assert any(h.size == 256 for h in ledger.heads())
