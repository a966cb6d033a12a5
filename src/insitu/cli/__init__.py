"""The ``insitu`` command line (Typer + Rich); one module per verb group.

Layer 11, the top: parses, calls the packages below, prints. Domain events are written
by the packages, never here.
"""

from __future__ import annotations

# Importing the command modules registers their commands on ``app``.
from insitu.cli import (  # noqa: F401
    audit,
    bundle,
    consent,
    data,
    drift,
    federate,
    finetune,
    optimize,
    privacy,
    quickstart,
    repo,
    report,
    serve,
    update,
    workspace,
)
from insitu.cli._app import app, main, run

__all__ = ["app", "main", "run"]
