"""The dashboard in a real headless Chromium: offline, token-protected, the ledger's figures."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from insitu.dashboard import router, site_view
from insitu.data import FeatureEncoder, read_table
from insitu.drift import DriftMonitor
from insitu.finetune import finetune
from insitu.privacy import SubjectBudget
from insitu.workspace import Workspace
from tests.drift.conftest import shift_age
from tests.finetune._device import NAME, Device, build_device

CHROMIUM = "/usr/bin/chromium"
ROUNDS = [(1, 0.7612, 0.41), (2, 0.7935, 0.63), (3, 0.8104, 0.80), (4, 0.8188, 0.94)]


@dataclass
class Site:
    device: Device
    url: str


def _prepare(device: Device) -> None:
    ws = device.workspace()
    finetune(ws, NAME, device.data, epsilon=1.0)
    # The coordinator's round records (this node coordinated a run too), payloads as
    # insitu.federated._simulate writes them.
    with ws.ledger() as ledger:
        for number, accuracy, epsilon in ROUNDS:
            ledger.record(
                "federation.round",
                run="run-7f3a",
                round=number,
                sites_ok=3,
                failures=0,
                accuracy=accuracy - 0.01,
                central_accuracy=accuracy,
                epsilon_run_max=epsilon,
            )
    monitor = DriftMonitor(ws)
    bundle, session = device.client().session()
    assert monitor.register_card(bundle.card)
    frame = shift_age(read_table(device.data))
    inputs = FeatureEncoder.for_schema(device.schema).encode(frame)
    monitor.on_batch(NAME, bundle.version, inputs, session.run(None, {"features": inputs})[0])
    monitor.check()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    import uvicorn
    from fastapi import FastAPI

    device = build_device(tmp_path_factory.mktemp("dash"))
    _prepare(device)
    app = FastAPI()
    live = {
        "request_rate": 12.5,
        "latency_p50_ms": 1.8,
        "latency_p95_ms": 4.2,
        "requests_total": 48213,
        "models": [{"name": NAME, "version": "1.0.1-local.1"}],
    }
    app.include_router(router(device.workspace(), metrics_source=lambda: live))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="off", ws="none", http="h11")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield Site(device, f"http://127.0.0.1:{port}")
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_dashboard_in_chromium_is_offline_and_shows_the_ledger_figures(
    site: Site, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    ws = site.device.workspace()
    token = ws.api_token()
    with ws.ledger() as ledger:
        entries = ledger.verify().entries
        spent = SubjectBudget.for_workspace(ws, ledger).spent()
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.on("request", lambda r: requests.append(r.url))
            # Without the token: refused.
            response = page.goto(f"{site.url}/dashboard")
            assert response is not None
            assert response.status == 401
            # With it once: a cookie, and the address loses the token.
            response = page.goto(f"{site.url}/dashboard?token={token}")
            assert response is not None
            assert response.status == 200
            assert page.url == f"{site.url}/dashboard"
            text = page.inner_text("body")
            screenshot = tmp_path / "dashboard.png"
            page.screenshot(path=str(screenshot), full_page=True)
            if os.environ.get("INSITU_DASHBOARD_SCREENSHOT"):
                shutil.copy(screenshot, os.environ["INSITU_DASHBOARD_SCREENSHOT"])
            drift_age = page.inner_text("#drift-age")
            drift_hours = page.inner_text("#drift-hr_per_week")
            models = page.inner_text("#models")
            charts = page.inner_html("#training")
        finally:
            browser.close()
    assert requests
    assert all(url.startswith(f"{site.url}/") for url in requests), requests
    assert f"ledger verified · {entries} entries" in text
    assert f"spent {spent:.3f}" in text
    assert "1.0.1-local.1" in models
    assert "1.0.0" in models
    assert models.count("✓ verified") == 2
    assert "12.5" in text
    assert "48,213" in text
    for _, accuracy, epsilon in ROUNDS:
        assert f">{accuracy:.3g}<" in charts
        assert f">{epsilon:.3g}<" in charts
    assert "DRIFT" in drift_age
    assert "ok" in drift_hours
    assert "finetune.installed" in text
    assert screenshot.stat().st_size > 20_000


def test_dashboard_refuses_a_wrong_token_and_serves_json_to_the_bearer(site: Site) -> None:
    import httpx

    token = site.device.workspace().api_token()
    assert httpx.get(f"{site.url}/dashboard?token=not-it").status_code == 401
    assert httpx.get(f"{site.url}/dashboard/data.json").status_code == 401
    wrong = httpx.get(f"{site.url}/dashboard/data.json", headers={"Authorization": "Bearer x"})
    assert wrong.status_code == 401
    good = httpx.get(
        f"{site.url}/dashboard/data.json", headers={"Authorization": f"Bearer {token}"}
    )
    assert good.status_code == 200
    assert "default-src 'none'" in good.headers["content-security-policy"]
    doc = good.json()
    assert [r["accuracy"] for r in doc["training"]["rounds"]] == [r[1] for r in ROUNDS]
    assert doc["drift"][0]["flagged"][0] == "age"


def test_a_tampered_ledger_shows_as_failed(site: Site, tmp_path: Path) -> None:
    from tests.audit._tamper import raw

    home = tmp_path / "copy"
    shutil.copytree(site.device.home, home)
    conn = raw(home / "ledger.db")
    conn.execute("UPDATE entries SET payload = replace(payload, '0.8104', '0.9104')")
    conn.close()
    view = site_view(Workspace.open(home))
    assert view["ledger"]["verification"]["ok"] is False
    assert view["ledger"]["verification"]["seq"] is not None


def test_attack_deleted_ledger_shows_as_failed_not_as_an_error(site: Site, tmp_path: Path) -> None:
    home = tmp_path / "copy"
    shutil.copytree(site.device.home, home)
    (home / "ledger.db").unlink()
    view = site_view(Workspace.open(home))
    assert view["ledger"]["verification"]["ok"] is False
    assert "MissingLedgerError" in view["ledger"]["verification"]["error"]
    assert view["ledger"]["recent"] == []


def test_the_local_version_is_served_with_its_drift_gauges_in_metrics(site: Site) -> None:
    # What 'insitu finetune' installed (signed by the device's own key) is what serves.
    import httpx

    from insitu.serve import running

    with running(site.device.workspace()) as server:
        models = httpx.get(server.url + "/v1/models", headers=server.headers, timeout=30).json()
        text = httpx.get(server.url + "/metrics", headers=server.headers, timeout=30).text
    assert "1.0.1-local.1" in str(models)
    assert 'insitu_drift_rows{model="adult-income",version="1.0.1-local.1"}' in text
