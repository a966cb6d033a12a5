"""The append-only audit ledger: a hash-chained, signed event log in SQLite.

Every part of insitu records what it did here (``ledger.record("model.installed",
version="1.2.0")``) and every report reads from here. The properties that make it
evidence rather than a log file:

* **Append-only, hash-chained, signed.** Each entry carries the previous entry's hash
  and this node's signature (Ed25519 or ECDSA P-256; encodings in ``_records``); SQLite
  triggers refuse UPDATE and DELETE so honest code cannot rewrite history by mistake, and
  :meth:`Ledger.verify` finds it when dishonest code does.
* **Signed tree heads.** The RFC 6962 Merkle tree over all entries is updated in the
  same transaction as each append (a frontier of O(log n) hashes in table ``merkle``),
  and every ``head_interval`` entries a signed head is stored. An auditor keeps a head
  elsewhere (``insitu audit head``) and can later check that the log only grew
  (consistency proof) and that an entry is in it (inclusion proof).
* **Durable and concurrent.** WAL journal with ``synchronous=FULL``: a committed entry
  survives power loss. Each append is one ``BEGIN IMMEDIATE`` transaction that reads
  the tail inside the write lock, so several processes appending at once serialize
  cleanly; a process killed mid-append leaves the transaction rolled back.
* **No personal data.** Payloads are small JSON objects of figures, identifiers of
  artefacts and counts; string values that look like e-mail addresses, phone numbers,
  card numbers or IBANs are refused (:class:`~insitu.errors.PersonalDataError`).
"""

from __future__ import annotations

import logging
import math
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from insitu._canonical import canonical_text
from insitu._clock import utc_now
from insitu._pii import find_personal_data
from insitu._signer import Signer, SigningPublicKey
from insitu.audit import _merkle
from insitu.audit._records import (
    GENESIS_PREV,
    Entry,
    TreeHead,
    entry_hash,
    entry_signing_message,
)
from insitu.audit._verify import VerificationReport, verify_entries
from insitu.errors import (
    InvalidEventError,
    LedgerError,
    MalformedLedgerError,
    MissingLedgerError,
    PersonalDataError,
    RootMismatchError,
)

__all__ = ["EVENT_TYPE_PATTERN", "Ledger"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: Dotted lower-case names: ``<domain>.<what happened>``, e.g. ``training.round``.
EVENT_TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_STRING_CHARS = 1024
MAX_DEPTH = 8

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    node TEXT NOT NULL,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    prev BLOB NOT NULL,
    hash BLOB NOT NULL,
    sig BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_type ON entries (type, seq);
CREATE INDEX IF NOT EXISTS entries_by_time ON entries (time);
CREATE TABLE IF NOT EXISTS heads (
    size INTEGER PRIMARY KEY, root BLOB NOT NULL, time TEXT NOT NULL, sig BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS merkle (
    id INTEGER PRIMARY KEY CHECK (id = 1), size INTEGER NOT NULL, frontier BLOB NOT NULL
);
INSERT OR IGNORE INTO merkle (id, size, frontier) VALUES (1, 0, x'');
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS heads_no_update BEFORE UPDATE ON heads
    BEGIN SELECT RAISE(ABORT, 'signed heads are append-only'); END;
CREATE TRIGGER IF NOT EXISTS heads_no_delete BEFORE DELETE ON heads
    BEGIN SELECT RAISE(ABORT, 'signed heads are append-only'); END;
"""

_ENTRY_COLUMNS = "seq, time, node, type, payload, prev, hash, sig"

KeyProvider = Callable[[], Signer]


class Ledger:
    """One node's audit ledger.

    Args:
        path: the SQLite file (created with its schema if missing, unless ``genesis``).
        log_id: this node's id; every entry and head names it.
        public_key: the node's public key (Ed25519 or ECDSA P-256), used by :meth:`verify`.
        signing_key: the private key, or a function returning it. A function is called
            at the first write only, so that reading and verifying never need the
            passphrase.
        head_interval: sign and store a tree head every this many entries.
        genesis: the type of the entry this ledger starts with (a workspace's ledger
            starts with ``workspace.init``). With it the ledger must already exist: a
            missing, empty or emptied file is refused (:class:`MissingLedgerError`),
            never created anew, and :meth:`verify` refuses a ledger whose entry 1 is
            gone or is another event.

    Raises:
        MissingLedgerError: ``genesis`` is given and the file is missing or empty, or
            holds no ledger.
        MalformedLedgerError: the file is not a ledger SQLite can open.
        LedgerError: the ledger is another node's, or of another schema.

    """

    def __init__(
        self,
        path: Path | str,
        *,
        log_id: str,
        public_key: SigningPublicKey,
        signing_key: Signer | KeyProvider | None = None,
        head_interval: int = 256,
        genesis: str | None = None,
    ) -> None:
        if head_interval < 1:
            raise ValueError("head_interval must be at least 1")
        self.path = Path(path)
        self.log_id = log_id
        self.public_key = public_key
        self.head_interval = head_interval
        self.genesis = genesis
        self._signing_key = signing_key
        self._lock = threading.Lock()
        try:
            self._conn = self._connect()
        except sqlite3.DatabaseError as exc:
            raise MalformedLedgerError(
                f"cannot open the ledger {self.path}: {exc}; restore it from a backup "
                "or an export ('insitu audit export')"
            ) from exc
        try:
            self._open_schema()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise MalformedLedgerError(
                f"cannot open the ledger {self.path}: {exc}; restore it from a backup "
                "or an export ('insitu audit export')"
            ) from exc
        except BaseException:
            self._conn.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        """Connect; with ``genesis``, to an existing, non-empty file only (never create it)."""
        if self.genesis is None:
            return sqlite3.connect(
                self.path, timeout=60.0, isolation_level=None, check_same_thread=False
            )
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise self._missing("is missing: it was deleted or moved") from None
        if size == 0:
            raise self._missing("is empty (0 bytes): it was truncated")
        # mode=rw: SQLite opens the file or fails; it never creates an empty ledger in
        # the place of one deleted since the check above.
        return sqlite3.connect(
            f"{self.path.absolute().as_uri()}?mode=rw",
            uri=True,
            timeout=60.0,
            isolation_level=None,
            check_same_thread=False,
        )

    def _missing(self, what: str) -> MissingLedgerError:
        return MissingLedgerError(
            f"the ledger {self.path} {what}; entry 1 (its {self.genesis!r} entry) and "
            "everything after it are gone: restore ledger.db from a backup, or verify an "
            "export of it ('insitu audit verify --export')",
            seq=1,
        )

    def _open_schema(self) -> None:
        if self.genesis is not None:
            tables = {
                name
                for (name,) in self._conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                )
            }
            if not {"meta", "entries"} <= tables:
                raise self._missing("holds no ledger tables: it was emptied or replaced")
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        # executescript() commits any open transaction first, so the script carries
        # its own: the schema is created under the write lock, once, even when
        # several processes open a new ledger at the same moment.
        self._conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
        with self._write():
            self._check_meta()

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Close the database connection."""
        self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding SQLite's write lock from its first statement."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _check_meta(self) -> None:
        rows = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        if not rows:
            if self.genesis is not None:
                raise self._missing("holds no ledger metadata: it was emptied or replaced")
            self._conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema', ?), ('log_id', ?)",
                (str(SCHEMA_VERSION), self.log_id),
            )
            return
        if rows.get("log_id") != self.log_id:
            raise LedgerError(
                f"the ledger {self.path} belongs to node {rows.get('log_id')!r}, not "
                f"{self.log_id!r}; open it with the workspace that created it"
            )
        if rows.get("schema") != str(SCHEMA_VERSION):
            raise LedgerError(
                f"the ledger {self.path} has schema {rows.get('schema')}, this insitu reads "
                f"{SCHEMA_VERSION}; upgrade insitu"
            )

    def _key(self) -> Signer:
        if self._signing_key is None:
            raise LedgerError(
                "this ledger was opened read-only (no signing key); open it through "
                "the workspace to record events"
            )
        if callable(self._signing_key):
            self._signing_key = self._signing_key()
        return self._signing_key

    # -- writing -------------------------------------------------------------------

    def record(self, event_type: str, /, **payload: Any) -> Entry:
        """Append one signed event and return it.

        Raises:
            InvalidEventError: a malformed event type or payload.
            PersonalDataError: a payload string that looks like personal data.

        """
        return self.record_many([(event_type, payload)])[0]

    def record_many(self, events: Sequence[tuple[str, dict[str, Any]]]) -> list[Entry]:
        """Append several events in one transaction: all of them, or none.

        Each is still its own signed, chained entry; what is shared is the fsync, which
        makes bulk changes (a consent import of thousands of rows) fast.

        Raises:
            InvalidEventError: a malformed event type or payload (nothing is written).
            PersonalDataError: a payload string that looks like personal data.

        """
        prepared = [
            (event_type, _encode_event(event_type, payload)) for event_type, payload in events
        ]
        if not prepared:
            return []
        key = self._key()
        entries: list[Entry] = []
        with self._write() as conn:
            size, blob = conn.execute("SELECT size, frontier FROM merkle WHERE id = 1").fetchone()
            frontier = _merkle.Frontier.from_bytes(size, blob)
            prev = (
                conn.execute("SELECT hash FROM entries WHERE seq = ?", (size,)).fetchone()[0]
                if size
                else GENESIS_PREV
            )
            for event_type, payload_json in prepared:
                entry = self._sign_entry(key, frontier.size + 1, event_type, payload_json, prev)
                conn.execute(
                    f"INSERT INTO entries ({_ENTRY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    (
                        entry.seq,
                        entry.time,
                        entry.node,
                        entry.type,
                        entry.payload_json,
                        entry.prev,
                        entry.hash,
                        entry.sig,
                    ),
                )
                frontier.append(_merkle.leaf_hash(entry.hash))
                if entry.seq % self.head_interval == 0:
                    root = frontier.root()
                    head = TreeHead.sign(key, log=self.log_id, size=entry.seq, root=root)
                    self._store_head(conn, head)
                entries.append(entry)
                prev = entry.hash
            conn.execute(
                "UPDATE merkle SET size = ?, frontier = ? WHERE id = 1",
                (frontier.size, frontier.to_bytes()),
            )
        logger.debug("recorded %d entries up to %d", len(entries), entries[-1].seq)
        return entries

    def _sign_entry(
        self, key: Signer, seq: int, event_type: str, payload_json: str, prev: bytes
    ) -> Entry:
        now = utc_now()
        digest = entry_hash(
            seq=seq,
            time=now,
            node=self.log_id,
            event_type=event_type,
            payload_json=payload_json,
            prev=prev,
        )
        return Entry(
            seq=seq,
            time=now,
            node=self.log_id,
            type=event_type,
            payload_json=payload_json,
            prev=prev,
            hash=digest,
            sig=key.sign(entry_signing_message(digest)),
        )

    def sign_head(self) -> TreeHead:
        """Sign (and store) a tree head at the current size, or return the stored one."""
        key = self._key()
        with self._write() as conn:
            size, blob = conn.execute("SELECT size, frontier FROM merkle WHERE id = 1").fetchone()
            existing = conn.execute(
                "SELECT size, root, time, sig FROM heads WHERE size = ?", (size,)
            ).fetchone()
            if existing:
                return self._head_from_row(existing)
            root = _merkle.Frontier.from_bytes(size, blob).root()
            head = TreeHead.sign(key, log=self.log_id, size=size, root=root)
            self._store_head(conn, head)
        return head

    @staticmethod
    def _store_head(conn: sqlite3.Connection, head: TreeHead) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO heads (size, root, time, sig) VALUES (?, ?, ?, ?)",
            (head.size, head.root, head.time, head.sig),
        )

    # -- reading -------------------------------------------------------------------

    def __len__(self) -> int:
        row = self._conn.execute("SELECT MAX(seq) FROM entries").fetchone()
        return int(row[0] or 0)

    def entries(
        self,
        *,
        event_type: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[Entry]:
        """Entries filtered by type (exact, or a prefix ending in ``.``) and UTC time.

        ``since`` and ``until`` are ISO 8601 UTC strings compared as stored
        (``2026-11-22`` selects from the start of that day).
        """
        clauses: list[str] = []
        params: list[Any] = []
        if event_type:
            if event_type.endswith("."):
                clauses.append("substr(type, 1, ?) = ?")
                params += [len(event_type), event_type]
            else:
                clauses.append("type = ?")
                params.append(event_type)
        if since:
            clauses.append("time >= ?")
            params.append(since)
        if until:
            clauses.append("time < ?")
            params.append(until)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT {_ENTRY_COLUMNS} FROM entries {where} ORDER BY seq {order}"  # noqa: S608
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [self._entry_from_row(row) for row in self._conn.execute(sql, params)]

    def get(self, seq: int) -> Entry | None:
        """The entry with sequence number ``seq``, if any."""
        row = self._conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE seq = ?",  # noqa: S608
            (seq,),
        ).fetchone()
        return self._entry_from_row(row) if row else None

    def heads(self) -> list[TreeHead]:
        """All stored signed heads, smallest first."""
        rows = self._conn.execute("SELECT size, root, time, sig FROM heads ORDER BY size")
        return [self._head_from_row(row) for row in rows]

    def latest_head(self) -> TreeHead | None:
        """The stored signed head covering the most entries, if any."""
        heads = self.heads()
        return heads[-1] if heads else None

    def _entry_from_row(self, row: tuple[Any, ...]) -> Entry:
        try:
            seq, time, node, type_, payload, prev, digest, sig = row
            if not all(isinstance(b, bytes) for b in (prev, digest, sig)):
                raise TypeError("binary columns hold text")
            return Entry(
                int(seq), str(time), str(node), str(type_), str(payload), prev, digest, sig
            )
        except (TypeError, ValueError) as exc:
            raise MalformedLedgerError(
                f"ledger row {row[0]!r} is unreadable ({exc}): the database was altered",
                seq=row[0] if isinstance(row[0], int) else None,
            ) from exc

    def _head_from_row(self, row: tuple[Any, ...]) -> TreeHead:
        size, root, time, sig = row
        return TreeHead(
            log=self.log_id, size=int(size), root=bytes(root), time=str(time), sig=bytes(sig)
        )

    def _leaf_hashes(self, size: int) -> list[bytes]:
        rows = self._conn.execute("SELECT hash FROM entries WHERE seq <= ? ORDER BY seq", (size,))
        return [_merkle.leaf_hash(row[0]) for row in rows]

    # -- proofs --------------------------------------------------------------------

    def inclusion_proof(self, seq: int, size: int | None = None) -> list[bytes]:
        """Audit path proving entry ``seq`` is in the tree of the first ``size`` entries."""
        size = len(self) if size is None else size
        leaves = self._leaf_hashes(size)
        if len(leaves) != size or not 1 <= seq <= size:
            raise LedgerError(f"entry {seq} is not within the first {size} entries of the ledger")
        return _merkle.inclusion_proof(seq - 1, leaves)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """Proof that the first ``old_size`` entries are a prefix of the first ``new_size``."""
        new_size = len(self) if new_size is None else new_size
        leaves = self._leaf_hashes(new_size)
        if len(leaves) != new_size or not 0 < old_size <= new_size:
            raise LedgerError(
                f"cannot prove growth from {old_size} to {new_size} entries: "
                f"the ledger has {len(self)}"
            )
        return _merkle.consistency_proof(old_size, leaves)

    # -- verification ----------------------------------------------------------------

    def verify(self, trusted_head: TreeHead | None = None) -> VerificationReport:
        """Verify the whole ledger; see :func:`insitu.audit.verify_entries`.

        ``trusted_head`` is a head kept outside this machine: it detects truncation
        and rewriting that happened together with rewriting of the stored heads.

        Raises:
            LedgerIntegrityError: the subclass named after the first failure found.

        """
        try:
            with self._lock:
                # One read transaction: a consistent snapshot even while others append.
                self._conn.execute("BEGIN")
                try:
                    rows = self._conn.execute(
                        f"SELECT {_ENTRY_COLUMNS} FROM entries ORDER BY seq"  # noqa: S608
                    ).fetchall()
                    heads = self.heads()
                    size, blob = self._conn.execute(
                        "SELECT size, frontier FROM merkle WHERE id = 1"
                    ).fetchone()
                finally:
                    self._conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise MalformedLedgerError(
                f"the ledger database is damaged ({exc}); restore it from an export"
            ) from exc
        report = verify_entries(
            (self._entry_from_row(row) for row in rows),
            public_key=self.public_key,
            log_id=self.log_id,
            heads=heads,
            trusted_head=trusted_head,
            first_type=self.genesis,
        )
        try:
            stored = _merkle.Frontier.from_bytes(size, blob)
        except ValueError:
            stored = None
        if stored is None or stored.size != report.entries or stored.root() != report.root:
            # The frontier is a cache of the entries; if it disagrees, the next heads
            # signed from it would be wrong.
            cached = "unreadable" if stored is None else f"{stored.size} entries"
            raise RootMismatchError(
                f"the ledger's Merkle state ({cached}) does not match its {report.entries} "
                "verified entries: the database was altered; restore it from a backup",
                seq=(
                    min(stored.size, report.entries) + 1
                    if stored is not None and stored.size != report.entries
                    else None
                ),
            )
        return report


def _encode_event(event_type: str, payload: dict[str, Any]) -> str:
    """Validate an event and return its canonical payload text."""
    if not EVENT_TYPE_PATTERN.match(event_type):
        raise InvalidEventError(
            f"event type {event_type!r} is not of the form 'domain.event' "
            "(lower case, dotted), e.g. 'training.round'"
        )
    _check_payload(payload, path=event_type)
    payload_json = canonical_text(payload)
    if len(payload_json) > MAX_PAYLOAD_BYTES:
        raise InvalidEventError(
            f"payload of {event_type!r} is {len(payload_json)} bytes, over the "
            f"{MAX_PAYLOAD_BYTES}-byte limit: record figures and artefact digests, not data"
        )
    return payload_json


def _check_payload(value: Any, *, path: str, depth: int = 0) -> None:
    """Refuse payloads that are not plain JSON or that hold personal-looking strings."""
    if depth > MAX_DEPTH:
        raise InvalidEventError(f"payload at {path} is nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidEventError(f"payload value at {path} is {value}; record finite numbers")
        return
    if isinstance(value, str):
        if len(value) > MAX_STRING_CHARS:
            raise InvalidEventError(
                f"payload string at {path} has {len(value)} characters (limit "
                f"{MAX_STRING_CHARS}): record a digest of large content, not the content"
            )
        kind = find_personal_data(value)
        if kind:
            raise PersonalDataError(
                f"payload value at {path} looks like a {kind}: the ledger never holds "
                "personal data; record a pseudonymous id or a count instead"
            )
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_payload(item, path=f"{path}[{index}]", depth=depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidEventError(f"payload key {key!r} at {path} is not a string")
            _check_payload(key, path=f"{path} (a key)", depth=depth + 1)
            _check_payload(item, path=f"{path}.{key}", depth=depth + 1)
        return
    raise InvalidEventError(
        f"payload value at {path} is a {type(value).__name__}; use JSON types "
        "(str, int, float, bool, None, list, dict)"
    )
