"""python-tuf's exceptions, translated into insitu errors named after the attack.

python-tuf raises ``BadVersionNumberError`` both for a version lower than a trusted one
(a rollback) and for a file whose version is not the one the next role up lists (a
mix-and-match: e.g. targets v2 served where snapshot lists v3). Which one it is shows
only in the message, so :func:`translate` reads it; the patterns are those of tuf 7
(pinned ``<8``) and each is exercised by an attack test, so a change in tuf fails a test
rather than mislabelling an attack.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from tuf.api import exceptions as tuf_exc

from insitu.errors import (
    EndlessDataError,
    ExpiredMetadataError,
    MixAndMatchError,
    RepositoryUnavailableError,
    RollbackError,
    TargetMismatchError,
    UnsignedMetadataError,
    UpdateError,
    UpdateRefusedError,
)

__all__ = ["translate", "tuf_refusals"]

# "Expected snapshot version 3, got 2" (timestamp vs snapshot) and
# "Expected targets v3, got v2." (snapshot vs targets): a file from another state.
_MIX_AND_MATCH = re.compile(r"^Expected (snapshot version \d+, got \d+|\S+ v\d+, got v\d+)")


def translate(exc: Exception, what: str) -> UpdateError:  # noqa: PLR0911 -- one per failure
    """The insitu error for a python-tuf exception raised while doing ``what``."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, tuf_exc.ExpiredMetadataError):
        return ExpiredMetadataError(
            f"{what}: refused expired metadata ({detail}): a freeze attack, or a repository "
            "whose timestamp is not re-signed; the operator must run 'insitu repo timestamp'"
        )
    if isinstance(exc, tuf_exc.BadVersionNumberError):
        if _MIX_AND_MATCH.match(detail):
            return MixAndMatchError(
                f"{what}: refused metadata from different repository states ({detail}); "
                "the mirror is inconsistent or under attack, nothing was changed"
            )
        return RollbackError(
            f"{what}: refused metadata older than the trusted version ({detail}); a "
            "rollback attack or a stale mirror, nothing was changed"
        )
    if isinstance(exc, tuf_exc.UnsignedMetadataError):
        return UnsignedMetadataError(
            f"{what}: refused metadata without a threshold of trusted signatures ({detail})"
        )
    if isinstance(exc, tuf_exc.DownloadLengthMismatchError):
        return EndlessDataError(
            f"{what}: the server sent more bytes than the signed metadata allows ({detail}); "
            "download stopped, nothing was changed"
        )
    if isinstance(exc, tuf_exc.LengthOrHashMismatchError):
        return TargetMismatchError(
            f"{what}: the downloaded file does not match its signed length and hash "
            f"({detail}); tampered or corrupt mirror, nothing was changed"
        )
    if isinstance(exc, tuf_exc.DownloadError):
        return RepositoryUnavailableError(
            f"{what}: the repository cannot be reached ({detail}); check --url and the "
            "network, then retry"
        )
    return UpdateRefusedError(f"{what}: the repository's metadata was refused ({detail})")


@contextmanager
def tuf_refusals(what: str) -> Iterator[None]:
    """Re-raise python-tuf's repository and download errors as insitu errors."""
    try:
        yield
    except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as exc:
        raise translate(exc, what) from exc
