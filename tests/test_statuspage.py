"""The status page as a person sees it: real headless Chromium, phone and desktop widths."""

from __future__ import annotations

import asyncio
import html
from pathlib import Path

import aiohttp
from aiohttp import web

from exporter.config import parse_config
from exporter.service import Service
from exporter.simmaster import SimulatedMaster, create_app
from tests.support import free_port, serve_app, wait_for
from tests.tools import require_binary

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
EVIL = "<script>alert(1)</script>"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


async def chromium(tmp: Path, *args: str) -> str:
    """Run Chromium without blocking the loop that serves the page; return its stdout."""
    binary = require_binary("chromium")
    proc = await asyncio.create_subprocess_exec(
        binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, f"chromium exited {proc.returncode}"
    return out.decode()


def alertmanager_app() -> web.Application:
    async def alerts(_: web.Request) -> web.Response:
        return web.json_response([{
            "labels": {"alertname": "HAMasterDown", "severity": "critical",
                       "master": "master-a"},
            "annotations": {"summary": "Master master-a is down."},
            "startsAt": "2026-11-22T10:00:00.000Z",
        }])

    app = web.Application()
    app.router.add_get("/api/v2/alerts", alerts)
    return app


async def start_service(tmp: Path, urls: dict[str, str], alertmanager: str) -> Service:
    cfg = parse_config({
        "state_path": str(tmp / "state.db"),
        "probe": {"interval": "300ms", "timeout": "200ms", "failure_threshold": 2},
        "masters": [
            {"name": "master-a", "url": urls["master-a"], "region": "uae", "priority": 1},
            {"name": EVIL, "url": urls["evil"], "region": "usa", "priority": 2},
            {"name": "master-c", "url": urls["master-c"], "region": "uae", "role": "standby",
             "priority": 3},
        ],
        "failover": {"enabled": True, "checkpoint_interval": "300ms"},
        "alertmanager": {"url": alertmanager},
    })
    svc = Service(cfg, token="t")
    await svc.start(port=0)
    return svc


async def test_status_page_renders_the_fleet_escaped_on_phone_and_desktop(tmp_path):
    sims = {"master-a": SimulatedMaster("master-a", "uae"),
            "evil": SimulatedMaster("evil", "usa"),
            "master-c": SimulatedMaster("master-c", "uae", "standby")}
    async with serve_app(create_app(sims["master-a"])) as ua, \
            serve_app(create_app(sims["evil"])) as ue, \
            serve_app(create_app(sims["master-c"])) as uc, \
            serve_app(alertmanager_app()) as am:
        svc = await start_service(tmp_path, {"master-a": ua, "evil": ue, "master-c": uc}, am)
        try:
            page = f"http://127.0.0.1:{svc.bound_port}/"
            await wait_for(lambda: svc.ready, 5, "readiness")
            sims["master-a"].mode = "down"  # fails, and master-c takes over
            await wait_for(lambda: svc.store.list_failovers(limit=1), 10, "a failover record")
            async with aiohttp.ClientSession() as http, http.get(page) as r:
                assert r.status == 200 and r.content_type == "text/html"

            dom = await chromium(tmp_path, "--dump-dom", page)
            ARTIFACTS.mkdir(exist_ok=True)
            shots = {"phone": (390, 844), "desktop": (1280, 900)}
            for label, (w, h) in shots.items():
                await chromium(tmp_path, f"--screenshot={ARTIFACTS / f'status-{label}.png'}",
                               f"--window-size={w},{h}", page)
        finally:
            await svc.stop()

    assert EVIL not in dom  # never injected as markup
    assert html.escape(EVIL, quote=False) in dom  # shown as text
    assert dom.count("<script") == 0
    for name in ("master-a", "master-c"):
        assert f'data-master="{name}"' in dom
    assert '<span class="state failed">failed</span>' in dom
    assert 'id="failovers"' in dom and "master-c" in dom.split('id="failovers"')[1]
    assert "HAMasterDown" in dom and "Master master-a is down." in dom
    assert 'http-equiv="refresh"' in dom and 'name="viewport"' in dom
    for label in ("phone", "desktop"):
        png = ARTIFACTS / f"status-{label}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


async def test_status_page_says_when_alertmanager_is_unreachable(tmp_path):
    sim = SimulatedMaster("m", "uae")
    async with serve_app(create_app(sim)) as url:
        urls = {"master-a": url, "evil": url, "master-c": url}
        svc = await start_service(tmp_path, urls, f"http://127.0.0.1:{free_port()}")
        try:
            async with aiohttp.ClientSession() as http, \
                    http.get(f"http://127.0.0.1:{svc.bound_port}/") as r:
                text = await r.text()
        finally:
            await svc.stop()
    assert r.status == 200
    assert "is not reachable" in text and "master-a" in text
