"""Private federated training on Flower's engine: DP, secure aggregation, enforced budgets.

Start with :func:`simulate` (one machine, Flower's simulation engine). See
``docs/federated.md`` for the threat model.

Layer 9: imports ``insitu.training``, ``insitu.data``, ``insitu.privacy`` and below;
Flower is reached only from here (and from the thin entry point ``insitu._flower_app``).
"""

from __future__ import annotations

from insitu.federated._apps import run_server_app, site_client
from insitu.federated._certs import FederationCerts, make_certs
from insitu.federated._config import FederationConfig
from insitu.federated._partition import partition
from insitu.federated._server_app import RoundRecord
from insitu.federated._simulate import FederatedResult, min_rows_for, simulate
from insitu.federated._superlink import DEFAULT_ADDRESS, DeployResult, serve
from insitu.federated._supernode import JoinResult, join, probe_server

__all__ = [
    "DEFAULT_ADDRESS",
    "DeployResult",
    "FederatedResult",
    "FederationCerts",
    "FederationConfig",
    "JoinResult",
    "RoundRecord",
    "join",
    "make_certs",
    "min_rows_for",
    "partition",
    "probe_server",
    "run_server_app",
    "serve",
    "simulate",
    "site_client",
]
