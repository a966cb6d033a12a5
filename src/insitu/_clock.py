"""insitu's one clock: the time every ledger entry, consent change and install is stamped with.

One function, so that tests freeze one thing (freezegun patches ``datetime``) and every
package agrees on the format: ISO 8601 in UTC with microseconds and a ``Z``, which sorts
as text in time order (the ledger compares times as stored).
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["utc_now"]


def utc_now() -> str:
    """Current UTC time as ISO 8601 with microseconds and a ``Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
