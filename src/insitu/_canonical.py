"""Canonical JSON: the one byte encoding that hashes and signatures are computed over.

Keys sorted, no insignificant white space, ASCII only (non-ASCII escaped), no NaN or
infinity. Python's float ``repr`` is the shortest round-tripping form, so the same value
always gives the same bytes. This is the subset of RFC 8785 (JCS) that insitu needs; a
full JCS library would add a dependency for number formats the ledger never stores
(payloads are checked to be plain JSON before they are hashed).

Parsers of signed material use :func:`is_canonical`: a line that is not byte-for-byte
its own canonical encoding is refused, so no two byte strings verify as the same entry.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["canonical_bytes", "canonical_text", "is_canonical"]


def canonical_text(value: Any) -> str:
    """Return the canonical JSON text of ``value``.

    Raises:
        ValueError: ``value`` holds NaN or infinity.
        TypeError: ``value`` holds something JSON cannot represent.

    """
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def canonical_bytes(value: Any) -> bytes:
    """Return the canonical JSON encoding of ``value`` as ASCII bytes."""
    return canonical_text(value).encode("ascii")


def is_canonical(text: str) -> bool:
    """Whether ``text`` is valid JSON and exactly its own canonical encoding."""
    try:
        return canonical_text(json.loads(text)) == text
    except (ValueError, TypeError, RecursionError):
        return False
