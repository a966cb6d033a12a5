"""Private federated training on Flower's engine: DP, secure aggregation, enforced budgets.

Start with :func:`simulate` (one machine, Flower's simulation engine). See
``docs/federated.md`` for the threat model.

Layer 9: imports ``insitu.training``, ``insitu.data``, ``insitu.privacy`` and below;
Flower is reached only from here (and from the thin entry point ``insitu._flower_app``).

The names below are loaded on first use (PEP 562): Flower starts a fresh ClientApp
process for every message a site receives, and the egress witness that wraps each one
(:func:`deployed_egress_mod`) must not pay for PyTorch and the simulation engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from insitu.federated._apps import run_server_app, site_client
    from insitu.federated._certs import FederationCerts, make_certs
    from insitu.federated._config import FederationConfig
    from insitu.federated._egress import deployed_egress_mod
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
    "deployed_egress_mod",
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

# Where each public name lives, so that importing the package costs nothing.
_HOMES: dict[str, str] = {
    "DEFAULT_ADDRESS": "_superlink",
    "DeployResult": "_superlink",
    "FederatedResult": "_simulate",
    "FederationCerts": "_certs",
    "FederationConfig": "_config",
    "JoinResult": "_supernode",
    "RoundRecord": "_server_app",
    "deployed_egress_mod": "_egress",
    "join": "_supernode",
    "make_certs": "_certs",
    "min_rows_for": "_simulate",
    "partition": "_partition",
    "probe_server": "_supernode",
    "run_server_app": "_apps",
    "serve": "_superlink",
    "simulate": "_simulate",
    "site_client": "_apps",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
