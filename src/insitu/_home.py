"""The environment variable naming a node's home (a leaf: it imports nothing of insitu).

It lives here, not in :mod:`insitu.workspace` (which exports it), so that the command
line can declare its ``--home`` option without importing the workspace: ``insitu
--version`` and ``--help`` import no more than they print.
"""

from __future__ import annotations

__all__ = ["HOME_ENV"]

#: Where a command finds its workspace when ``--home`` is not given.
HOME_ENV = "INSITU_HOME"
