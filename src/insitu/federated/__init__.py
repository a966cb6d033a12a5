"""Private federated training on Flower's engine: DP, secure aggregation, enforced budgets.

Start with :func:`simulate` (one machine, Flower's simulation engine). See
``docs/federated.md`` for the threat model.
"""

from __future__ import annotations

from insitu.federated._config import FederationConfig
from insitu.federated._partition import partition
from insitu.federated._server_app import RoundRecord
from insitu.federated._simulate import FederatedResult, min_rows_for, simulate

__all__ = [
    "FederatedResult",
    "FederationConfig",
    "RoundRecord",
    "min_rows_for",
    "partition",
    "simulate",
]
