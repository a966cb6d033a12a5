r"""Ledger exports: a JSON-lines file that anyone can verify on another machine.

Format (``insitu-ledger-export/1``), every line canonical JSON followed by ``\\n``::

    {"format": "insitu-ledger-export/1", "head": {...signed head...}, "public_key": "<key>"}
    {"hash": ..., "node": ..., "payload": ..., "prev": ..., "seq": 1, "sig": ..., ...}
    ...

Everything in the header is covered by a signature or derived from the key: the node id
is the fingerprint of ``public_key``, and the head is signed. Every line must be
byte-for-byte its own canonical encoding, so *any* changed byte in the file is found:
it either breaks the JSON, makes a line non-canonical, or changes a signed value.

A verifier should pin the key it expects (``--public-key``): an export re-signed from
end to end with another key is internally consistent, and only a pinned key (or a
trusted head signed by the real key) tells it apart.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from insitu._atomic import atomic_writer
from insitu._canonical import canonical_text, is_canonical
from insitu._signer import SigningPublicKey, public_key_from_text, public_key_text
from insitu.audit import events
from insitu.audit._ledger import Ledger
from insitu.audit._records import Entry, TreeHead, node_id_for
from insitu.audit._verify import VerificationReport, verify_entries
from insitu.errors import BadEntrySignatureError, MalformedLedgerError, TruncatedLedgerError

__all__ = ["EXPORT_FORMAT", "ExportVerification", "export_ledger", "verify_export"]

EXPORT_FORMAT = "insitu-ledger-export/1"


@dataclass(frozen=True, slots=True)
class ExportVerification:
    """A verified export: who signed it and what it covers."""

    node_id: str
    public_key_hex: str
    head: TreeHead
    report: VerificationReport


def export_ledger(ledger: Ledger, path: str | os.PathLike[str]) -> TreeHead:
    """Write the whole ledger to ``path`` with a fresh signed head; returns that head.

    Written with :func:`insitu._atomic.atomic_writer`: an unpredictable temporary file,
    fsynced and renamed, never half-written; a ``path`` that is a symbolic link is
    refused (``OSError`` ``ELOOP``) before the head is signed.

    Raises:
        OSError: ``path`` is a symbolic link, or the file system refused the write.

    """
    path = Path(path)
    with atomic_writer(path) as handle:
        head = ledger.sign_head()
        key_text = public_key_text(ledger.public_key)
        header = {"format": EXPORT_FORMAT, "head": head.to_json(), "public_key": key_text}
        handle.write(canonical_text(header).encode("ascii") + b"\n")
        for entry in ledger.entries():
            if entry.seq > head.size:
                break
            handle.write(canonical_text(entry.to_json()).encode("ascii") + b"\n")
    return head


def verify_export(
    path: Path,
    *,
    public_key: SigningPublicKey | None = None,
    trusted_head: TreeHead | None = None,
    first_type: str | None = events.WORKSPACE_INIT.name,
) -> ExportVerification:
    """Verify an export file completely.

    Args:
        path: the export.
        public_key: the key the ledger must be signed with. Without it, the key in the
            file is trusted (the caller should say so to the user).
        trusted_head: an older head kept elsewhere; the export must contain its entries.
        first_type: the type entry 1 must have: a workspace's ledger starts with its
            ``workspace.init`` entry, so an export without it is refused. ``None`` for a
            ledger that was not a workspace's.

    Raises:
        LedgerIntegrityError: the subclass named after the first failure found.

    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise MalformedLedgerError(f"cannot read the export {path}: {exc.strerror}") from exc
    if not data.endswith(b"\n"):
        raise MalformedLedgerError("the export does not end with a newline: it was truncated")
    lines = data[:-1].split(b"\n")
    objects = [_parse_line(line, number) for number, line in enumerate(lines, start=1)]
    header, body = objects[0], objects[1:]
    if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
        raise MalformedLedgerError(f"not an {EXPORT_FORMAT} file (bad header line)")
    if set(header) != {"format", "head", "public_key"}:
        raise MalformedLedgerError("the export header has unexpected fields")
    try:
        # Lower-case hex only, as written: a byte changed to another spelling of the same
        # key ("f" to "F") is a change to the file, and is refused like any other.
        file_key = public_key_from_text(header["public_key"])
    except ValueError as exc:
        raise MalformedLedgerError(f"the export's public key is malformed ({exc})") from exc
    key = public_key or file_key
    if public_key is not None and public_key_text(public_key) != public_key_text(file_key):
        raise BadEntrySignatureError(
            "the export is signed with a different key than the one pinned: "
            "it was re-signed, or you pinned the wrong node's key"
        )
    head = TreeHead.from_json(header["head"])
    node = node_id_for(key)
    entries = [Entry.from_json(obj) for obj in body]
    if head.size != len(entries):
        raise TruncatedLedgerError(
            f"the export's signed head covers {head.size} entries but it holds {len(entries)}",
            seq=min(head.size, len(entries)) + 1,
        )
    report = verify_entries(
        entries,
        public_key=key,
        log_id=node,
        heads=[head],
        trusted_head=trusted_head,
        first_type=first_type,
    )
    return ExportVerification(
        node_id=node, public_key_hex=public_key_text(key), head=head, report=report
    )


def _parse_line(line: bytes, number: int) -> object:
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedLedgerError(
            f"line {number} of the export holds non-ASCII bytes: it was altered",
            seq=number - 1 or None,
        ) from None
    if not is_canonical(text):
        raise MalformedLedgerError(
            f"line {number} of the export is not canonical JSON: it was altered",
            seq=number - 1 or None,
        )
    return json.loads(text)
