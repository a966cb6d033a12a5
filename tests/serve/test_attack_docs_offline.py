"""The API's documentation pages load nothing from another host.

FastAPI's own ``/docs`` and ``/redoc`` fetch Swagger UI, ReDoc, Google Fonts and a
favicon from public CDNs: a browser opening them tells third parties about the server
and runs their JavaScript on its origin. insitu serves the assets itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from insitu.serve import running
from insitu.serve._docs import CONTENT_SECURITY_POLICY
from tests.serve.conftest import Site

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def client(site: Site) -> Iterator[httpx.Client]:
    with running(site.workspace) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_attack_docs_pages_name_no_other_host(client: httpx.Client, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    html = response.text
    assert "http://" not in html
    assert "https://" not in html
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets
    for asset in assets:
        assert asset.startswith("/"), asset
        fetched = client.get(asset)
        assert fetched.status_code == 200, asset
        assert len(fetched.content) > 1000, asset


def test_only_the_listed_assets_are_served(client: httpx.Client) -> None:
    assert client.get("/docs/assets/../../../etc/passwd").status_code == 404
    assert client.get("/docs/assets/__init__.py").status_code == 404


def test_healthz_says_only_that_the_server_is_up(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_attack_docs_in_chromium_contact_no_other_host(site: Site) -> None:
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    answered: list[str] = []
    failed: dict[str, str] = {}
    with running(site.workspace) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_context().new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("response", lambda r: answered.append(r.url))
            page.on("requestfailed", lambda r: failed.update({r.url: str(r.failure)}))
            for path, ready in (("/docs", ".opblock"), ("/redoc", "h1")):
                response = page.goto(server.url + path)
                assert response is not None
                assert response.status == 200
                page.wait_for_selector(ready, timeout=20_000)
            text = page.inner_text("body")
        finally:
            browser.close()
    assert any(url.endswith("/openapi.json") for url in requests)
    # blob: URLs are made by the page itself (ReDoc's search worker); data: URLs are inline.
    own = (f"{server.url}/", f"blob:{server.url}/", "data:")
    assert [url for url in answered if not url.startswith(own)] == []
    # ReDoc's bundle still names one image on its vendor's CDN (the "API docs by Redocly"
    # logo): the page's Content-Security-Policy stops it in the browser, before any
    # connection is made.
    for url in (url for url in requests if not url.startswith(own)):
        assert failed.get(url) == "csp", (url, failed.get(url))
    assert "insitu local inference API" in text
