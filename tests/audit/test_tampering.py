"""Attacks on the ledger: each must be found by verify, with the first bad entry named.

The attacker has write access to ledger.db (and drops the append-only triggers); what
they do not have is the node's private key, nor the signed head an auditor kept.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from insitu.audit import TreeHead
from insitu.audit._records import entry_signing_message
from insitu.errors import (
    BadEntrySignatureError,
    BadHeadSignatureError,
    BrokenChainError,
    EntryHashMismatchError,
    LedgerIntegrityError,
    RootMismatchError,
    TruncatedLedgerError,
)
from tests.audit._tamper import raw, rebuild_merkle_state, rewrite_and_rechain
from tests.conftest import fill


@pytest.fixture
def filled(ledger):
    fill(ledger, 30)
    ledger.verify()
    return ledger


def test_payload_byte_changed(filled):
    conn = raw(filled.path)
    conn.execute(
        "UPDATE entries SET payload = replace(payload, '\"index\":7', '\"index\":8') WHERE seq = 9"
    )
    with pytest.raises(EntryHashMismatchError) as caught:
        filled.verify()
    assert caught.value.seq == 9


def test_event_type_relabelled(filled):
    raw(filled.path).execute("UPDATE entries SET type = 'test.other' WHERE seq = 4")
    with pytest.raises(EntryHashMismatchError) as caught:
        filled.verify()
    assert caught.value.seq == 4


def test_entry_deleted(filled):
    conn = raw(filled.path)
    conn.execute("DELETE FROM entries WHERE seq = 12")
    rebuild_merkle_state(conn)
    with pytest.raises(BrokenChainError) as caught:
        filled.verify()
    assert caught.value.seq == 12


def test_entry_deleted_and_renumbered(filled):
    # A careful attacker closes the gap in the numbering: the hash chain still breaks.
    conn = raw(filled.path)
    conn.execute("DELETE FROM entries WHERE seq = 12")
    conn.execute("UPDATE entries SET seq = seq - 1 WHERE seq > 12")
    rebuild_merkle_state(conn)
    with pytest.raises(BrokenChainError) as caught:
        filled.verify()
    assert caught.value.seq == 12


def test_two_entries_swapped(filled):
    conn = raw(filled.path)
    conn.execute("UPDATE entries SET seq = -1 WHERE seq = 5")
    conn.execute("UPDATE entries SET seq = 5 WHERE seq = 6")
    conn.execute("UPDATE entries SET seq = 6 WHERE seq = -1")
    rebuild_merkle_state(conn)
    with pytest.raises(LedgerIntegrityError) as caught:
        filled.verify()
    assert caught.value.seq == 5
    assert isinstance(caught.value, BrokenChainError | EntryHashMismatchError)


def test_two_entries_contents_swapped_keeping_numbers(filled):
    conn = raw(filled.path)
    cols = "time, node, type, payload, prev, hash, sig"
    five = conn.execute(f"SELECT {cols} FROM entries WHERE seq = 5").fetchone()
    six = conn.execute(f"SELECT {cols} FROM entries WHERE seq = 6").fetchone()
    sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
    conn.execute(f"UPDATE entries SET {sets} WHERE seq = 5", six)
    conn.execute(f"UPDATE entries SET {sets} WHERE seq = 6", five)
    with pytest.raises(BrokenChainError) as caught:
        filled.verify()
    assert caught.value.seq == 5


def test_tail_truncated_is_found_against_a_kept_signed_head(filled):
    kept = filled.sign_head()  # the auditor keeps this elsewhere
    conn = raw(filled.path)
    # A careful attacker removes the tail, the heads covering it, and fixes the cache:
    # the ledger is internally consistent again...
    conn.execute("DELETE FROM entries WHERE seq > 20")
    conn.execute("DELETE FROM heads WHERE size > 20")
    rebuild_merkle_state(conn)
    assert filled.verify().entries == 20
    # ...but not against the head the auditor kept.
    with pytest.raises(TruncatedLedgerError) as caught:
        filled.verify(trusted_head=kept)
    assert caught.value.seq == 21


def test_tail_truncated_is_found_by_a_stored_head(filled):
    filled.sign_head()
    conn = raw(filled.path)
    conn.execute("DELETE FROM entries WHERE seq > 25")
    rebuild_merkle_state(conn)
    with pytest.raises(TruncatedLedgerError):
        filled.verify()


def test_entry_resigned_with_another_key(filled):
    attacker = Ed25519PrivateKey.generate()
    conn = raw(filled.path)
    digest = conn.execute("SELECT hash FROM entries WHERE seq = 17").fetchone()[0]
    conn.execute(
        "UPDATE entries SET sig = ? WHERE seq = 17",
        (attacker.sign(entry_signing_message(digest)),),
    )
    with pytest.raises(BadEntrySignatureError) as caught:
        filled.verify()
    assert caught.value.seq == 17


def test_edited_entry_rehashed_and_resigned_with_another_key(filled):
    # Rewrite entry 10 and re-chain everything after it: only the signatures give it away.
    attacker = Ed25519PrivateKey.generate()
    rewrite_and_rechain(raw(filled.path), 10, '{"accuracy":0.99,"index":9}', attacker)
    with pytest.raises(BadEntrySignatureError) as caught:
        filled.verify()
    assert caught.value.seq == 10


def test_forged_head_signed_with_another_key(filled, workspace):
    attacker = Ed25519PrivateKey.generate()
    real = filled.sign_head()
    forged = TreeHead.sign(attacker, log=workspace.node_id, size=real.size, root=real.root)
    with pytest.raises(BadHeadSignatureError):
        filled.verify(trusted_head=forged)


def test_forged_head_with_altered_root_keeps_the_old_signature(filled):
    real = filled.sign_head()
    altered = TreeHead(log=real.log, size=real.size, root=bytes(32), time=real.time, sig=real.sig)
    with pytest.raises(BadHeadSignatureError):
        filled.verify(trusted_head=altered)


def test_stored_head_replaced_by_a_forgery(filled, workspace):
    attacker = Ed25519PrivateKey.generate()
    head = TreeHead.sign(attacker, log=workspace.node_id, size=10, root=bytes(32))
    raw(filled.path).execute(
        "INSERT OR REPLACE INTO heads (size, root, time, sig) VALUES (?, ?, ?, ?)",
        (head.size, head.root, head.time, head.sig),
    )
    with pytest.raises(BadHeadSignatureError):
        filled.verify()


def test_history_rewritten_under_a_genuine_head(filled, workspace):
    # An insider who holds the node's key rewrites entry 3, re-signs the rest and drops
    # the stored heads: internally consistent, but the head an auditor kept catches it.
    kept = filled.sign_head()
    conn = raw(filled.path)
    rewrite_and_rechain(conn, 3, '{"accuracy":0.99,"index":1}', workspace.signing_key())
    conn.execute("DELETE FROM heads")
    assert filled.verify().entries == 31
    with pytest.raises(RootMismatchError):
        filled.verify(trusted_head=kept)


def test_merkle_state_altered(filled):
    raw(filled.path).execute("UPDATE merkle SET frontier = zeroblob(length(frontier))")
    with pytest.raises(RootMismatchError):
        filled.verify()


def test_byte_flip_in_the_database_file(filled, workspace):
    filled.close()  # checkpoint the WAL into ledger.db
    data = bytearray(workspace.ledger_path.read_bytes())
    needle = b'"index":13'
    offset = data.find(needle)
    assert offset > 0
    data[offset + len(needle) - 1] ^= 0x01  # "index":13 -> "index":12
    workspace.ledger_path.write_bytes(bytes(data))
    with workspace.ledger() as reopened, pytest.raises(EntryHashMismatchError) as caught:
        reopened.verify()
    assert caught.value.seq is not None
