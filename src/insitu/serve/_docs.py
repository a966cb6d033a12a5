"""The API's documentation pages, served from assets installed with insitu: no third party.

FastAPI's ``/docs`` and ``/redoc`` load their JavaScript, CSS, fonts and favicon from
public CDNs (jsDelivr, Google Fonts, fastapi.tiangolo.com): opening the docs of a server
that promises nothing leaves the machine told third parties about it, and ran their
JavaScript on the API's origin. Here the same pages (FastAPI's own HTML builders) point
at Swagger UI and ReDoc as the ``fastapi-offline`` package ships them (MIT; Swagger UI
Apache-2.0, ReDoc MIT), served from ``/docs/assets/``; Swagger UI's online validator and
ReDoc's Google Fonts are switched off, and a Content-Security-Policy lets the pages
load and connect to this origin only, so a browser refuses any other host even if an
asset tried.

No well-kept library serves FastAPI's docs offline by itself; ``fastapi-offline``
carries the assets (its ``FastAPIOffline`` class would replace our ``FastAPI``
instance, which we keep), so the three routes are written here.
"""

from __future__ import annotations

import importlib.resources
from typing import Any

from fastapi import FastAPI, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

__all__ = ["ASSETS_PATH", "CONTENT_SECURITY_POLICY", "add_offline_docs"]

#: Where the pages' assets are served.
ASSETS_PATH = "/docs/assets"

#: Same origin only. The pages' one inline script (FastAPI's bootstrap) needs
#: 'unsafe-inline'; ReDoc runs its search in a worker made from a blob: URL.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}


def _asset(name: str) -> bytes:
    return importlib.resources.files("fastapi_offline").joinpath("static", name).read_bytes()


def _secured(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    page.headers["X-Content-Type-Options"] = "nosniff"
    return page


def add_offline_docs(app: FastAPI, *, title: str) -> None:
    """Serve ``/docs`` (Swagger UI), ``/redoc`` and their assets from this machine.

    ``app`` must be created with ``docs_url=None, redoc_url=None``.
    """
    openapi_url = app.openapi_url or "/openapi.json"
    favicon = f"{ASSETS_PATH}/favicon.png"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return _secured(
            get_swagger_ui_html(
                openapi_url=openapi_url,
                title=f"{title} - docs",
                swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
                swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
                swagger_favicon_url=favicon,
                swagger_ui_parameters={"validatorUrl": None},
            )
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return _secured(
            get_redoc_html(
                openapi_url=openapi_url,
                title=f"{title} - ReDoc",
                redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
                redoc_favicon_url=favicon,
                with_google_fonts=False,
            )
        )

    @app.get(ASSETS_PATH + "/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        media_type = _ASSETS.get(name)
        if media_type is None:  # a fixed list: no path from the request reaches the disk
            return Response(status_code=404)
        headers: dict[str, Any] = {
            "Cache-Control": "public, max-age=86400",
            "X-Content-Type-Options": "nosniff",
        }
        return Response(_asset(name), media_type=media_type, headers=headers)
