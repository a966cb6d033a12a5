"""The quickstart as a library: every capability of insitu, end to end, in one call.

:func:`run_quickstart` is what ``insitu quickstart`` runs (the CLI only parses, calls and
prints); a notebook can call it too and read the typed :class:`QuickstartResult`. Its
steps, their ledger events (``quickstart.step``, ``federation.baseline``,
``processing.declared``) and the figures the report reads are written here, never by the
command line.

Layer 11: the orchestration above every package it runs (federated training, attacks,
optimize, bundle, update, serve, report); only ``insitu.cli`` is above it.
"""

from __future__ import annotations

from insitu.quickstart._run import QuickstartResult, QuickstartSettings, run_quickstart
from insitu.quickstart._steps import STEPS, StepResult

__all__ = ["STEPS", "QuickstartResult", "QuickstartSettings", "StepResult", "run_quickstart"]
