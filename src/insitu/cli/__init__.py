"""The ``insitu`` command line (Typer + Rich); one module per verb group."""

from __future__ import annotations

# Importing the command modules registers their commands on ``app``.
from insitu.cli import audit, bundle, quickstart, repo, update, workspace  # noqa: F401
from insitu.cli._app import app, main, run

__all__ = ["app", "main", "run"]
