"""Verification of a ledger, wherever its entries come from (the SQLite file or an export).

Nothing here reads files or databases: callers feed entries and heads in, so the same
checks run on a live ledger, on an export on another machine, and in the tests.

What :func:`verify_entries` guarantees when it returns (and otherwise it raises the
:class:`~insitu.errors.LedgerIntegrityError` subclass named after the failure, carrying
the first bad sequence number):

1. sequence numbers run 1, 2, ..., n with no gap (no deletion, no insertion);
2. each entry's ``prev`` is the previous entry's hash (no reordering, no splice);
3. each entry's hash is the hash of its content (no edit);
4. each entry is signed by the node's key and names that node (no re-signing);
5. every signed tree head given is signed by the node's key, and its root is the RFC
   6962 root of the first ``size`` entries (no forged or rewritten history);
6. a *trusted* head (kept elsewhere by an auditor) covers no more entries than there
   are (no truncation) and matches the entries it covers;
7. given ``first_type`` (a workspace's ledger starts with its ``workspace.init``
   entry), there is an entry 1 and it is of that type: a deleted or emptied ledger
   is never "0 entries, OK".

Every failure names the first bad entry in its message and in ``seq``, or says that
no single entry is bad (a forged head, a malformed export header).

Signatures are checked last and in bulk: Ed25519 verification is the dominant cost
(about 100 us each with OpenSSL here), so for large logs it is spread over the cores
with a process pool while this process checks the chain.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from insitu._signer import SigningPublicKey, public_key_from_text, public_key_text
from insitu.audit._merkle import Frontier, leaf_hash
from insitu.audit._records import (
    GENESIS_PREV,
    Entry,
    TreeHead,
    entry_signature_problem,
    verify_entry_signature,
)
from insitu.errors import (
    BadEntrySignatureError,
    BrokenChainError,
    EntryHashMismatchError,
    LedgerIntegrityError,
    MalformedLedgerError,
    MissingLedgerError,
    RootMismatchError,
    TruncatedLedgerError,
)

__all__ = ["ChainChecker", "VerificationReport", "verify_entries"]

logger = logging.getLogger(__name__)

#: Below this many entries a process pool costs more than it saves.
PARALLEL_THRESHOLD = 20_000
_CHUNK = 5_000


@dataclass(frozen=True, slots=True)
class VerificationReport:
    """What a successful verification covered."""

    entries: int
    root: bytes
    heads_checked: int
    trusted_head_size: int | None
    seconds: float


class ChainChecker:
    """Checks properties 1 to 3 and the node name, one entry at a time, in order.

    Invariant: after ``k`` entries were fed without an exception, they are numbered
    1..k, chained by hash, each hash matches its content, and ``frontier`` holds the
    RFC 6962 tree over their hashes. Signatures are not checked here.
    """

    def __init__(self, log_id: str) -> None:
        self.log_id = log_id
        self.frontier = Frontier()
        self.last_hash = GENESIS_PREV

    @property
    def size(self) -> int:
        """How many entries were accepted."""
        return self.frontier.size

    def feed(self, entry: Entry) -> None:
        """Accept the next entry or raise the error named after what is wrong with it."""
        expected = self.size + 1
        if entry.seq != expected:
            what = "missing (deleted)" if entry.seq > expected else "out of order"
            raise BrokenChainError(
                f"entry {expected} is {what}: found entry {entry.seq} in its place",
                seq=expected,
            )
        if entry.prev != self.last_hash:
            raise BrokenChainError(
                f"entry {entry.seq} does not follow entry {entry.seq - 1}: "
                "entries were removed, inserted or swapped",
                seq=entry.seq,
            )
        if entry.node != self.log_id:
            raise BadEntrySignatureError(
                f"entry {entry.seq} claims node {entry.node!r}; this ledger is {self.log_id!r}",
                seq=entry.seq,
            )
        try:
            datetime.strptime(entry.time, "%Y-%m-%dT%H:%M:%S.%fZ")
        except ValueError:
            raise MalformedLedgerError(
                f"entry {entry.seq} has a malformed time {entry.time!r}", seq=entry.seq
            ) from None
        if entry.computed_hash() != entry.hash:
            raise EntryHashMismatchError(
                f"entry {entry.seq} was edited: its content does not match its hash",
                seq=entry.seq,
            )
        self.frontier.append(leaf_hash(entry.hash))
        self.last_hash = entry.hash


def _first_bad_signature(public_text: str, items: Sequence[tuple[int, bytes, bytes]]) -> int | None:
    """Sequence number of the first bad signature in ``items``, or ``None``."""
    key = public_key_from_text(public_text)
    for seq, digest, sig in items:
        if not verify_entry_signature(key, digest, sig):
            return seq
    return None


def _check_signatures_async(
    public_key: SigningPublicKey, items: list[tuple[int, bytes, bytes]]
) -> list[Future[int | None]] | None:
    """Start checking signatures in worker processes, or return ``None`` to do it inline."""
    workers = os.cpu_count() or 1
    if len(items) < PARALLEL_THRESHOLD or workers < 2:
        return None
    raw = public_key_text(public_key)
    # spawn, not fork: the caller may hold SQLite connections and threads.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    futures = [
        pool.submit(_first_bad_signature, raw, items[i : i + _CHUNK])
        for i in range(0, len(items), _CHUNK)
    ]
    pool.shutdown(wait=False)
    return futures


def verify_entries(
    entries: Iterable[Entry],
    *,
    public_key: SigningPublicKey,
    log_id: str,
    heads: Iterable[TreeHead] = (),
    trusted_head: TreeHead | None = None,
    first_type: str | None = None,
) -> VerificationReport:
    """Verify entries (in order) and heads of one ledger; see the module docstring.

    Raises:
        LedgerIntegrityError: the subclass named after the first failure found.

    """
    started = time.perf_counter()
    entries = list(entries)
    if first_type is not None and not entries:
        raise MissingLedgerError(
            f"entry 1 is missing: the ledger holds no entries, not even its {first_type!r} "
            "entry; it was emptied: restore it from a backup or an export",
            seq=1,
        )
    all_heads = [*heads, *([trusted_head] if trusted_head else [])]
    for head in all_heads:
        head.verify_signature(public_key)
        if head.log != log_id:
            raise RootMismatchError(f"a tree head is for log {head.log!r}, not {log_id!r}")
    heads_at: dict[int, list[TreeHead]] = {}
    for head in all_heads:
        heads_at.setdefault(head.size, []).append(head)

    sig_items = [(e.seq, e.hash, e.sig) for e in entries]
    futures = _check_signatures_async(public_key, sig_items)

    checker = ChainChecker(log_id)
    chain_error: LedgerIntegrityError | None = None
    try:
        _check_heads_at(checker, heads_at)
        for entry in entries:
            checker.feed(entry)
            _check_heads_at(checker, heads_at)
    except LedgerIntegrityError as exc:
        chain_error = exc

    # Report the first bad entry, whichever check found it.
    limit = chain_error.seq if chain_error and chain_error.seq else len(entries) + 1
    bad_sig = _collect_signature_result(public_key, sig_items, futures, limit)
    if bad_sig is not None:
        why = entry_signature_problem(public_key, next(i[2] for i in sig_items if i[0] == bad_sig))
        raise BadEntrySignatureError(
            f"entry {bad_sig} is not signed by this node's key ({why}): it was re-signed or forged",
            seq=bad_sig,
        )
    if chain_error is not None:
        raise chain_error
    if first_type is not None and entries[0].type != first_type:
        raise MissingLedgerError(
            f"entry 1 is a {entries[0].type!r} event, not the {first_type!r} entry the "
            "ledger starts with: its history was replaced or restarted",
            seq=1,
        )

    longest = max((h.size for h in all_heads), default=0)
    if longest > checker.size:
        raise TruncatedLedgerError(
            f"a signed head covers {longest} entries but only {checker.size} remain: "
            f"the ledger was truncated after entry {checker.size}",
            seq=checker.size + 1,
        )
    return VerificationReport(
        entries=checker.size,
        root=checker.frontier.root(),
        heads_checked=len(all_heads),
        trusted_head_size=trusted_head.size if trusted_head else None,
        seconds=time.perf_counter() - started,
    )


def _check_heads_at(checker: ChainChecker, heads_at: dict[int, list[TreeHead]]) -> None:
    for head in heads_at.get(checker.size, ()):
        if head.root != checker.frontier.root():
            raise RootMismatchError(
                f"the signed head at size {head.size} does not match entries 1..{head.size}: "
                "history was rewritten after the head was signed",
                seq=head.size or None,
            )


def _collect_signature_result(
    public_key: SigningPublicKey,
    items: list[tuple[int, bytes, bytes]],
    futures: list[Future[int | None]] | None,
    limit: int,
) -> int | None:
    if futures is None:
        return _first_bad_signature(
            public_key_text(public_key),
            [item for item in items if item[0] < limit],
        )
    bad = [seq for f in futures if (seq := f.result()) is not None and seq < limit]
    return min(bad, default=None)
