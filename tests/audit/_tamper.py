"""What an attacker with write access to ledger.db can do, as helpers for attack tests."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from insitu.audit._merkle import Frontier, leaf_hash


def raw(path: Path) -> sqlite3.Connection:
    """A connection with the append-only triggers dropped, as an attacker would."""
    conn = sqlite3.connect(path, isolation_level=None)
    for trigger in ("entries_no_update", "entries_no_delete", "heads_no_update", "heads_no_delete"):
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    return conn


def rebuild_merkle_state(conn: sqlite3.Connection) -> None:
    """Make the cached Merkle frontier agree with the (tampered) entries."""
    frontier = Frontier()
    for (digest,) in conn.execute("SELECT hash FROM entries ORDER BY seq"):
        frontier.append(leaf_hash(digest))
    conn.execute(
        "UPDATE merkle SET size = ?, frontier = ? WHERE id = 1",
        (frontier.size, frontier.to_bytes()),
    )


def rewrite_and_rechain(conn: sqlite3.Connection, seq: int, payload: str, key) -> None:
    """Replace entry ``seq``'s payload, then re-hash and re-sign it and every later entry."""
    from insitu.audit._records import entry_hash, entry_signing_message

    rows = conn.execute(
        "SELECT seq, time, node, type, payload, prev FROM entries WHERE seq >= ? ORDER BY seq",
        (seq,),
    ).fetchall()
    prev = rows[0][5]
    for row_seq, time, node, type_, old_payload, _ in rows:
        new_payload = payload if row_seq == seq else old_payload
        digest = entry_hash(
            seq=row_seq, time=time, node=node, event_type=type_, payload_json=new_payload, prev=prev
        )
        conn.execute(
            "UPDATE entries SET payload = ?, prev = ?, hash = ?, sig = ? WHERE seq = ?",
            (new_payload, prev, digest, key.sign(entry_signing_message(digest)), row_seq),
        )
        prev = digest
    rebuild_merkle_state(conn)
