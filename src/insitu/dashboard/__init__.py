"""The site's dashboard: one token-protected, server-rendered page, offline.

:func:`router` returns a FastAPI router that ``insitu serve`` mounts on its loopback
port: installed models and their signature status, request rate and latency (from the
server), drift per feature, the privacy budget per data set, recent ledger events with
the ledger's verification status, and the last federated training's accuracy and
epsilon per round, as inline SVG charts (no script, no CDN). ``docs/operations.md``.

Layer 9: imports ``insitu.drift``, ``insitu.update``, ``insitu.bundle``,
``insitu.privacy`` and below.
"""

from __future__ import annotations

from insitu.dashboard._router import router
from insitu.dashboard._view import MetricsSource, site_view

__all__ = ["MetricsSource", "router", "site_view"]
