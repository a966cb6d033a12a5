"""The dashboard's routes: a token-protected page and its figures as JSON.

Authentication is the workspace's API token (``keys/api-token``, the bearer token of
the localhost API): a request carries it as ``Authorization: Bearer TOKEN``, or as the
``insitu_token`` cookie that ``GET <prefix>?token=TOKEN`` sets (HttpOnly,
SameSite=Strict, the dashboard's path only) before redirecting to the same page without
the token in the address. Comparison is constant-time. Every response forbids caching
and carries a Content-Security-Policy that allows no script, no frame and no request to
any other origin (``default-src 'none'``), so the page works offline and cannot be made
to call out.
"""

from __future__ import annotations

import hmac
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from insitu.dashboard._svg import bar, gauge, line_chart
from insitu.dashboard._view import MetricsSource, site_view
from insitu.drift import DriftMonitor
from insitu.workspace import Workspace

__all__ = ["router"]

COOKIE = "insitu_token"
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _points(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(float(r["round"]), float(r[key])) for r in rows if r.get(key) is not None]


def _environment() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(
            lambda name: (
                resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8")
            )
        ),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.globals.update(bar=bar, gauge=gauge, line_chart=line_chart, points=_points)
    return env


def router(
    workspace: Workspace,
    metrics_source: MetricsSource | None = None,
    *,
    drift_monitor: DriftMonitor | None = None,
    prefix: str = "/dashboard",
) -> APIRouter:
    """The dashboard of ``workspace`` as a FastAPI router, to mount in ``insitu serve``.

    ``metrics_source`` returns the server's live figures (see
    :data:`~insitu.dashboard._view.MetricsSource`); ``drift_monitor``, when given, is
    checked before each view so that drift figures are current.
    """
    token = workspace.api_token()
    env = _environment()
    api = APIRouter(prefix=prefix)

    def authorized(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        offered = header[7:] if header.lower().startswith("bearer ") else ""
        offered = offered or request.cookies.get(COOKIE, "")
        return bool(offered) and hmac.compare_digest(offered.encode(), token.encode())

    def refuse() -> Response:
        return HTMLResponse(
            "<!doctype html><title>insitu: token required</title><p>This dashboard needs the "
            "node's API token: open <code>?token=TOKEN</code> once (the token is in "
            "<code>keys/api-token</code> of the workspace).</p>",
            status_code=401,
            headers=_HEADERS | {"WWW-Authenticate": "Bearer"},
        )

    def view() -> dict[str, Any]:
        return site_view(workspace, metrics_source=metrics_source, drift_monitor=drift_monitor)

    @api.get("", response_class=HTMLResponse, include_in_schema=False)
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request) -> Response:
        offered = request.query_params.get("token")
        if offered is not None:
            if not hmac.compare_digest(offered.encode(), token.encode()):
                return refuse()
            response = RedirectResponse(url=prefix, status_code=303, headers=_HEADERS)
            response.set_cookie(
                COOKIE, token, httponly=True, samesite="strict", path=prefix, secure=False
            )
            return response
        if not authorized(request):
            return refuse()
        html = env.get_template("dashboard.html").render(view=view(), prefix=prefix)
        return HTMLResponse(html, headers=_HEADERS)

    @api.get("/data.json", include_in_schema=False)
    def data(request: Request) -> Response:
        if not authorized(request):
            return JSONResponse({"error": "token required"}, status_code=401, headers=_HEADERS)
        return JSONResponse(view(), headers=_HEADERS)

    return api
