"""The ``insitu`` command line (Typer + Rich); one module per verb group.

Layer 11, the top: parses, calls the packages below, prints. Domain events are written
by the packages, never here. A verb's module is imported only when the verb runs
(:mod:`insitu.cli._lazy`), so ``insitu --version`` and a device's ``insitu update`` pay
for none of the training stack.
"""

from __future__ import annotations

from insitu.cli._app import app, main, run

__all__ = ["app", "main", "run"]
