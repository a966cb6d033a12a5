"""Switch off the telemetry and update checks of dependencies, before they are imported.

insitu promises that nothing phones home. Two dependencies ship usage reporting that is
on by default: ONNX Runtime (``ORT_DISABLE_TELEMETRY``) and Flower
(``FLWR_TELEMETRY_ENABLED``, ``FLWR_DISABLE_UPDATE_CHECK``). They read these variables
when they are imported or when a session starts, so this module runs from
``insitu/__init__.py`` before any of them can be imported through insitu.

The values are *forced*, not defaulted: a user who exported ``FLWR_TELEMETRY_ENABLED=1``
in a shell profile must not silently re-enable reporting from inside a hospital.

Ray (Flower's simulation engine) is closed here too (:data:`RAY_CLOSED_ENV`): its
cluster then refuses a process without the token. Ray's driver reads that mode once, when
``ray`` is first imported, hence here; the token itself is set by the simulation (see
``docs/federated.md``, "Ray, closed and quiet").
"""

from __future__ import annotations

import os

__all__ = ["NO_TELEMETRY_ENV", "RAY_CLOSED_ENV", "apply"]

#: Variables forced in ``os.environ`` for this process and the processes it starts.
NO_TELEMETRY_ENV: dict[str, str] = {
    "ORT_DISABLE_TELEMETRY": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # Ray (Flower's simulation engine) reports cluster usage statistics unless told not to.
    "RAY_USAGE_STATS_ENABLED": "0",
    # Keeps Ray on the loopback address: without it Ray binds its node to the machine's
    # first routable address, and a one-machine simulation never needs one.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Generic opt-outs honoured by several tools (Hugging Face, Gradio, many CLIs).
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


#: Ray settings forced for this process and its children: they must be in place before
#: ``ray`` is imported (its driver reads them once, at import).
RAY_CLOSED_ENV: dict[str, str] = {
    # A process that reaches the simulation's cluster (any local user can find its port on
    # the loopback address) is refused without the run's token: it cannot run code in the
    # sites' workers, with their data and environment.
    "RAY_AUTH_MODE": "token",
    # Ray's metrics pipeline (recorders in every process, exported by a per-node agent):
    # a one-machine simulation reads none of it.
    "RAY_enable_metrics_collection": "0",
}


def apply() -> None:
    """Force the no-telemetry variables and Ray's closed settings into this environment."""
    os.environ.update(NO_TELEMETRY_ENV)
    os.environ.update(RAY_CLOSED_ENV)
