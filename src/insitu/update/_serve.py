"""Serve a repository's public tree over HTTP (``insitu repo serve``), loopback by default.

A repository is static files, so production uses any web server or CDN; this server
is for a lab, a demo, and the tests. It serves only ``<repo>/public`` (never the keys),
read-only, and logs requests through :mod:`logging` rather than to stderr.
"""

from __future__ import annotations

import functools
import logging
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from insitu.errors import RepositoryError

__all__ = ["DEFAULT_HOST", "make_server"]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s " + format, self.address_string(), *args)

    def list_directory(self, path: Any) -> None:
        # A mirror serves files by name; listings only help someone probing it.
        self.send_error(404, "Not found")


def make_server(repo: Path, *, host: str = DEFAULT_HOST, port: int = 8080) -> ThreadingHTTPServer:
    """An HTTP server for ``repo/public`` (call ``serve_forever`` on it).

    Raises:
        RepositoryError: ``repo`` holds no repository.

    """
    public = Path(repo) / "public"
    if not (public / "metadata" / "root.json").is_file():
        raise RepositoryError(f"no update repository at {repo}; create one with 'insitu repo init'")
    if host not in {"127.0.0.1", "::1", "localhost"}:
        logger.warning(
            "serving the repository on %s, beyond this machine: metadata and bundles are "
            "signed and bundles encrypted, but prefer a real web server or CDN in production",
            host,
        )
    handler = functools.partial(_Handler, directory=str(public))
    return ThreadingHTTPServer((host, port), handler)
