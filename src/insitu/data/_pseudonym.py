"""Keyed pseudonymization: HMAC-SHA256 with a key that never leaves the site.

The same value maps to the same token at one site (so records of one person can still
be linked, and consent applied, at that site) and to an unrelated token at any other
site or under any other key. Without the key, a token cannot be reversed, nor checked
against a guessed value (unlike a plain hash, which a dictionary of names or national
ids reverses in seconds). Tokens are 128 bits, hex, prefixed ``p_``.

Values are normalized before hashing (whitespace trimmed, case folded) so that
``" Jane.Doe@Example.org"`` and ``"jane.doe@example.org"`` are the same person.
"""

from __future__ import annotations

import hashlib
import hmac

import pandas as pd

__all__ = ["Pseudonymizer"]

_CONTEXT = b"insitu/pseudonym/v1\n"


class Pseudonymizer:
    """Maps identifiers to site-stable tokens. Invariant: same key and value, same token."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("a pseudonymization key has at least 256 bits")
        self._key = key

    def token(self, value: object) -> str:
        """The pseudonym of one value."""
        normalized = str(value).strip().casefold().encode("utf-8")
        digest = hmac.new(self._key, _CONTEXT + normalized, hashlib.sha256).digest()
        return "p_" + digest[:16].hex()

    def series(self, values: pd.Series) -> pd.Series:
        """The pseudonyms of a column (each distinct value hashed once)."""
        return values.map({v: self.token(v) for v in values.unique()})
