"""The status page as a person sees it: real headless Chromium at phone and desktop widths.

Chromium is driven over its DevTools protocol (a websocket, spoken with aiohttp) rather than
``--dump-dom``: only that way can the test *see* a JavaScript dialog, so "a master named
``<script>alert(1)</script>`` injects nothing" is observed, not inferred from the markup. A
positive control (a page that does call alert()) proves the dialog hook works. Under CI=true a
missing chromium fails the test instead of skipping it (tests.tools.require_binary).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import signal
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from exporter.config import parse_config
from exporter.service import Service
from exporter.sim.master import SimulatedMaster, create_app
from exporter.web.server import running
from exporter.web.statuspage import ALERTS_TIMEOUT
from tests.support import closed_port, serve_app, wait_for
from tests.tools import require_binary

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
EVIL = "<script>alert(1)</script>"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--remote-debugging-port=0"]
PHONE, DESKTOP = (390, 844), (1280, 900)
#: status.css: --bad and --ok, as getComputedStyle reports them.
RED, GREEN = "rgb(207, 34, 46)", "rgb(26, 127, 55)"
ALERT = {
    "labels": {"alertname": "HAMasterDown", "severity": "critical", "master": "master-a"},
    "annotations": {"summary": "Master master-a is down."},
    "startsAt": "2026-11-22T10:00:00.000Z",
}

#: Everything the assertions need, read from the live DOM in one evaluation (one instant).
READ_PAGE = """(() => {
  const cells = tr => [...tr.cells].map(c => c.textContent.trim());
  const rows = sel => [...document.querySelectorAll(sel + ' tbody tr')];
  return {
    masters: rows('#masters').map(tr => ({
      key: tr.dataset.master, name: tr.cells[0].textContent.trim(),
      nameElements: tr.cells[0].childElementCount, cells: cells(tr)})),
    failovers: rows('#failovers').map(cells),
    duties: rows('#duties').map(tr => ({
      key: tr.dataset.duty, state: tr.dataset.state, cells: cells(tr),
      believedFlagged: tr.cells[3].classList.contains('err'),
      mark: (m => m ? getComputedStyle(m).backgroundColor : null)(tr.querySelector('.mark'))})),
    header: document.querySelector('header').innerText,
    dutyBadge: (b => b ? {text: b.textContent.trim(),
                          background: getComputedStyle(b).backgroundColor} : null)(
      document.getElementById('duties-served')),
    title: document.title,
    alerts: rows('#alerts').map(cells),
    sections: Object.fromEntries([...document.querySelectorAll('section')].map(
      s => [s.querySelector('h2').textContent.trim(), s.innerText])),
    scripts: document.getElementsByTagName('script').length,
    handlers: [...document.querySelectorAll('*')].flatMap(e => [...e.attributes])
      .map(a => a.name).filter(n => n.startsWith('on')),
    refresh: document.querySelector('meta[http-equiv="refresh"]')?.content ?? null,
    viewport: document.querySelector('meta[name="viewport"]')?.content ?? null,
    innerWidth: window.innerWidth,
    pageWidth: document.documentElement.scrollWidth,
    columns: Object.fromEntries([...document.querySelectorAll('table')].map(t => [t.id,
      [...t.querySelectorAll('th')].filter(th => th.offsetParent !== null)
        .map(th => th.textContent.trim().toLowerCase())])),
    clipped: [...document.querySelectorAll('table')]
      .filter(t => t.scrollWidth > t.parentElement.clientWidth + 1).map(t => t.id),
    smallestFont: Math.min(...[...document.querySelectorAll('td, th')]
      .filter(e => e.offsetParent !== null)
      .map(e => parseFloat(getComputedStyle(e).fontSize))),
    html: document.documentElement.outerHTML,
  };
})()"""


class DevTools:
    """One page of a headless Chromium over the DevTools protocol.

    Every JavaScript dialog the page opens is recorded in ``dialogs`` and dismissed at once,
    so an injected alert() can neither go unnoticed nor hang the page.
    """

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.dialogs: list[str] = []
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[dict]] = {}
        self._waiters: list[tuple[str, asyncio.Future[dict]]] = []
        self._tasks = {asyncio.create_task(self._read())}

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._calls.pop(data["id"])
                if "error" in data:
                    fut.set_exception(RuntimeError(f"DevTools: {data['error']}"))
                else:
                    fut.set_result(data.get("result", {}))
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Page.javascriptDialogOpening":
                self.dialogs.append(f"{params.get('type')}: {params.get('message')}")
                task = asyncio.create_task(self.call("Page.handleJavaScriptDialog", accept=True))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            for want, fut in self._waiters:
                if want == method and not fut.done():
                    fut.set_result(params)
            self._waiters = [(m, f) for m, f in self._waiters if not f.done()]

    async def call(self, method: str, **params: Any) -> dict:
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        return await asyncio.wait_for(fut, 15)

    def expect(self, method: str) -> asyncio.Future[dict]:
        """A future for the next ``method`` event; create it before causing the event."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((method, fut))
        return fut

    async def load(self, url: str) -> None:
        loaded = self.expect("Page.loadEventFired")
        await self.call("Page.navigate", url=url)
        await asyncio.wait_for(loaded, 15)

    async def evaluate(self, expression: str) -> Any:
        res = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in res:
            raise AssertionError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def viewport(self, size: tuple[int, int], mobile: bool) -> None:
        """Emulate a screen; ``mobile`` makes Chromium honour (or miss) the viewport meta."""
        await self.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1],
                        deviceScaleFactor=1, mobile=mobile)

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


@asynccontextmanager
async def chromium(tmp: Path) -> AsyncIterator[DevTools]:
    """Start headless Chromium (its own process group) and attach to its first page."""
    binary = require_binary("chromium")
    profile = tmp / "chromium-profile"
    log = (tmp / "chromium.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank",
        stdout=log, stderr=log, start_new_session=True)
    try:
        async def devtools_port() -> int | None:
            assert proc.returncode is None, f"chromium exited {proc.returncode}; see {log.name}"
            lines = (profile / "DevToolsActivePort").read_text().splitlines()
            return int(lines[0]) if len(lines) >= 2 else None

        port = await wait_for(devtools_port, 20, "chromium's DevTools port")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                tools = DevTools(ws)
                await tools.call("Page.enable")
                yield tools
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # renderer or zygote children left behind
        except ProcessLookupError:
            pass
        log.close()


def alertmanager_app(seen: list[dict[str, str]], answer: str = "one alert") -> web.Application:
    """Alertmanager's GET /api/v2/alerts: one firing alert, a hang, or malformed answers."""

    async def alerts(request: web.Request) -> web.Response:
        seen.append(dict(request.query))
        if answer == "never answers":
            await asyncio.sleep(30)
        if answer == "not json":
            return web.Response(text="<html>a proxy login page</html>", content_type="text/html")
        if answer == "malformed alerts":
            return web.json_response([{"labels": None, "startsAt": 5}, 7, {"annotations": []}])
        if answer == "HTTP 500":
            return web.json_response({"error": "boom"}, status=500)
        return web.json_response([ALERT])

    async def pushed(_: web.Request) -> web.Response:
        return web.json_response({})  # the exporter's own alert pushes (exporter.failover.hooks)

    app = web.Application()
    app.router.add_get("/api/v2/alerts", alerts)
    app.router.add_post("/api/v2/alerts", pushed)
    return app


@asynccontextmanager
async def start_service(
    tmp: Path, urls: dict[str, str], alertmanager: str
) -> AsyncIterator[tuple[Service, str]]:
    cfg = parse_config({
        "state_path": str(tmp / "state.db"),
        "probe": {"interval": "500ms", "timeout": "400ms", "failure_threshold": 2},
        "masters": [
            {"name": "master-a", "url": urls["master-a"], "region": "uae", "priority": 1},
            {"name": EVIL, "url": urls["evil"], "region": "usa", "priority": 2},
            {"name": "master-c", "url": urls["master-c"], "region": "uae", "role": "standby",
             "priority": 3},
        ],
        "failover": {"enabled": True, "checkpoint_interval": "500ms"},
        "alertmanager": {"url": alertmanager},
    })
    svc = Service(cfg, token="t")
    async with running(svc, "127.0.0.1", 0) as server:
        yield svc, f"http://127.0.0.1:{server.port}"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


async def test_status_page_in_chromium_escaped_failovers_alerts_phone_and_desktop(tmp_path):
    require_binary("chromium")  # before starting anything
    sims = {"master-a": SimulatedMaster("master-a", "uae"),
            "evil": SimulatedMaster(EVIL, "usa"),
            "master-c": SimulatedMaster("master-c", "uae", "standby")}
    am_queries: list[dict[str, str]] = []
    async with serve_app(create_app(sims["master-a"])) as ua, \
            serve_app(create_app(sims["evil"])) as ue, \
            serve_app(create_app(sims["master-c"])) as uc, \
            serve_app(alertmanager_app(am_queries)) as am, \
            aiohttp.ClientSession() as http:
        urls = {"master-a": ua, "evil": ue, "master-c": uc}
        async with start_service(tmp_path, urls, am) as (svc, base):
            page = f"{base}/"
            await wait_for(lambda: svc.ready, 10, "the first probe round")
            async with http.post(f"{ua}/chaos", json={"mode": "down"}) as r:
                assert r.status == 200  # master-a fails; the standby master-c takes over
            await wait_for(lambda: any(f["result"] == "success"
                                       for f in svc.store.list_failovers(limit=5, brief=True)),
                           15, "a successful failover away from master-a")
            await wait_for(lambda: svc.fleet.get("master-a").health.state == "failed", 5,
                           "master-a failed")
            await wait_for(lambda: svc.duty_status().served == ["master-a", EVIL], 5,
                           "master-c reporting master-a's duty")
            async with http.get(page) as r:
                assert r.status == 200 and r.content_type == "text/html"
                assert r.charset == "utf-8"
                served = await r.text()
            assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in served

            ARTIFACTS.mkdir(exist_ok=True)
            seen: dict[str, dict] = {}
            async with chromium(tmp_path) as browser:
                # Positive control: a page that does call alert() is noticed.
                dialog = browser.expect("Page.javascriptDialogOpening")
                await browser.call("Page.navigate", url="data:text/html,<script>alert(7)</script>")
                await asyncio.wait_for(dialog, 10)
                assert browser.dialogs == ["alert: 7"]
                browser.dialogs.clear()

                for label, size, mobile in (("phone", PHONE, True), ("desktop", DESKTOP, False)):
                    await browser.viewport(size, mobile)
                    await browser.load(page)
                    seen[label] = await browser.evaluate(READ_PAGE)
                    await browser.screenshot(ARTIFACTS / f"status-{label}.png")

                # The meta refresh really reloads the page (and a reload injects nothing either).
                started = time.monotonic()
                await asyncio.wait_for(browser.expect("Page.loadEventFired"), 15)
                refreshed_after = time.monotonic() - started
                seen["refreshed"] = await browser.evaluate(READ_PAGE)

                # Behind the exporter's back, the script-named master stops serving its own
                # duty and takes master-a's too: one duty unserved, one split, all masters up.
                async with http.post(f"{ue}/deactivate", json={}) as r:
                    assert r.status == 200
                async with http.post(f"{ue}/activate", json={"taken_over": "master-a"}) as r:
                    assert r.status == 200
                await wait_for(lambda: (svc.duty_status().split, svc.duty_status().unserved)
                               == (["master-a"], [EVIL]), 5, "the drift seen by the exporter")
                async with http.get(f"{base}/api/v1/masters") as r:
                    api = {m["name"]: m for m in (await r.json())["masters"]}
                await browser.load(page)
                seen["drift"] = await browser.evaluate(READ_PAGE)
                await browser.screenshot(ARTIFACTS / "status-duties-drift.png")
                await asyncio.sleep(0)  # let a dialog event queued with the load be read
                dialogs = list(browser.dialogs)

    assert dialogs == [], f"the page opened JavaScript dialogs: {dialogs}"
    for label, dom in seen.items():
        assert dom["scripts"] == 0, f"{label}: a <script> element is in the page"
        assert dom["handlers"] == [], f"{label}: event-handler attributes {dom['handlers']}"
        assert EVIL not in dom["html"], f"{label}: the master name went in as markup"
        # every master, with its state; the script-named one as plain text in its cell
        rows = {m["key"]: m for m in dom["masters"]}
        assert set(rows) == {"master-a", EVIL, "master-c"}, label
        assert rows[EVIL]["name"] == EVIL and rows[EVIL]["nameElements"] == 0, label
        states = {k: m["cells"][1] for k, m in rows.items()}
        assert states == {"master-a": "failed", EVIL: "healthy", "master-c": "healthy"}, label
        assert rows["master-c"]["cells"][2] == "active", f"{label}: the standby took over"
        # the failover, newest first: when, from, to, result
        assert dom["failovers"], f"{label}: no row under Recent failovers"
        assert dom["failovers"][0][1:4] == ["master-a", "master-c", "success"], label
        # what Alertmanager says is firing
        assert dom["alerts"] and dom["alerts"][0][:3] == ["HAMasterDown", "critical", "master-a"]
        assert "Master master-a is down." in dom["html"], label
        assert dom["refresh"] and int(dom["refresh"]) >= 2, label
        assert dom["viewport"] and "width=device-width" in dom["viewport"], label
    # Duties: what the masters say next to what the exporter believes, and the header
    for label in ("phone", "desktop", "refreshed"):
        dom = seen[label]
        assert [d["cells"] for d in dom["duties"]] == [
            ["master-a", "served", "master-c", "master-c"],  # failed over to the standby
            [EVIL, "served", EVIL, EVIL],
        ], label
        assert not any(d["believedFlagged"] or d["mark"] for d in dom["duties"]), label
        assert "duties: 2/2 served" in dom["header"], label
        assert dom["dutyBadge"]["background"] == GREEN, label
    drift = seen["drift"]
    assert [(d["key"], d["state"], d["cells"][1:]) for d in drift["duties"]] == [
        ("master-a", "split", ["SPLIT", f"{EVIL}, master-c", "master-c"]),
        (EVIL, "unserved", ["UNSERVED", "nobody", EVIL]),
    ]
    assert [d["believedFlagged"] for d in drift["duties"]] == [True, True]
    assert [d["mark"] for d in drift["duties"]] == [RED, RED], "UNSERVED/SPLIT in red"
    assert drift["dutyBadge"] == {"text": "duties: 0/2 served", "background": RED}
    # both serving masters are healthy, yet nothing is served as it should be
    assert "2/3 healthy" in drift["header"] and "fleet health 0/100" in drift["header"]
    assert "duties 0/2 served" in drift["title"]
    assert (api[EVIL]["duties"], api[EVIL]["reported_active"], api[EVIL]["reported_duties"]) == (
        [EVIL], True, ["master-a"])  # the exporter's belief next to the master's own word
    assert (api["master-c"]["duties"], api["master-c"]["reported_duties"]) == (
        ["master-a"], ["master-a"])
    assert api["master-a"]["duties"] == []  # failed over: the exporter gives it none

    assert am_queries and am_queries[0].get("silenced") == "false"
    assert refreshed_after < 10

    phone, desktop = seen["phone"], seen["desktop"]
    # Readable on a phone: the layout viewport is the screen (no 980 px desktop page zoomed
    # out), nothing scrolls sideways, no table is clipped, the text is not tiny.
    assert phone["innerWidth"] == PHONE[0], "viewport meta not honoured on a phone"
    assert phone["pageWidth"] <= PHONE[0], f"page is {phone['pageWidth']} px wide on a phone"
    assert phone["clipped"] == [], f"tables cut off on a phone: {phone['clipped']}"
    assert phone["smallestFont"] >= 12, f"{phone['smallestFont']} px text on a phone"
    for must in ("master", "state", "role", "queue", "weight"):
        assert must in phone["columns"]["masters"], f"no {must} column on a phone"
    assert phone["columns"]["failovers"][1:4] == ["from", "to", "result"]
    assert len(desktop["columns"]["masters"]) == 9, "desktop shows every column"
    assert desktop["innerWidth"] == DESKTOP[0] and desktop["clipped"] == []
    # where the failover's state came from: master-a was down (its /state too), so from its
    # checkpoint; a desktop column, left out on a phone like trigger and duration
    assert desktop["columns"]["failovers"][4] == "state"
    assert desktop["failovers"][0][4] == "checkpoint"
    assert "state" not in phone["columns"]["failovers"]
    for label, (width, height) in (("phone", PHONE), ("desktop", DESKTOP)):
        png = ARTIFACTS / f"status-{label}.png"
        assert png_size(png) == (width, height), f"{png} has the wrong size"
        assert png.stat().st_size > 10_000, f"{png} looks blank"


@pytest.mark.parametrize(("alertmanager", "message"), [
    ("dead port", "Alertmanager at {url} is not reachable (ClientConnectorError)"),
    ("never answers", "Alertmanager at {url} is not reachable (TimeoutError)"),
    ("HTTP 500", "Alertmanager at {url} answered HTTP 500"),
    ("not json", "Alertmanager at {url} did not answer a list of alerts"),
    ("malformed alerts", None),
])
async def test_status_page_renders_whatever_alertmanager_does(tmp_path, alertmanager, message):
    """A dead, hanging or wrong Alertmanager costs at most ALERTS_TIMEOUT and one clear line."""
    queries: list[dict[str, str]] = []
    async with serve_app(create_app(SimulatedMaster("master-a", "uae"))) as ua, \
            serve_app(create_app(SimulatedMaster(EVIL, "usa"))) as ue, \
            serve_app(create_app(SimulatedMaster("master-c", "uae", "standby"))) as uc, \
            serve_app(alertmanager_app(queries, alertmanager)) as fake, \
            aiohttp.ClientSession() as http:
        am = f"http://127.0.0.1:{closed_port()}" if alertmanager == "dead port" else fake
        urls = {"master-a": ua, "evil": ue, "master-c": uc}
        async with start_service(tmp_path, urls, am) as (_svc, base):
            started = time.monotonic()
            async with http.get(f"{base}/") as r:
                text = await r.text()
            took = time.monotonic() - started
    assert r.status == 200
    assert took < ALERTS_TIMEOUT + 2, f"the page waited {took:.1f}s for Alertmanager"
    assert 'id="masters"' in text and 'data-master="master-a"' in text  # the rest renders
    alerts_section = text.split("<h2>Firing alerts</h2>", 1)[1]
    if message is None:  # unusable entries still show, as "?" rows, not as a failed page
        assert alerts_section.count("<tr><td>?</td>") == 2
    else:
        assert message.format(url=am) in alerts_section
    assert (alertmanager == "dead port") != bool(queries)


def failover_rows(html: str) -> list[tuple[str, list[str], str]]:
    """(data-state-source, the cells' text, the State cell's markup) of each row of the
    server-rendered Recent failovers table, newest first."""
    table = html.split('<table id="failovers">', 1)[1].split("</table>", 1)[0]
    rows = []
    for source, body in re.findall(r'<tr data-failover="\d+" data-state-source="([^"]*)">'
                                   r"(.*?)</tr>", table, re.S):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", body, re.S)
        rows.append((source, [re.sub(r"<[^>]+>", "", c).strip() for c in cells], cells[4]))
    return rows


async def test_status_page_shows_where_each_failovers_state_came_from(tmp_path):
    """master-a is down from the start, so neither it nor any checkpoint has its state, and
    failover.require_state is off: its failover succeeds with no state, shown as "none" (a
    warning). Then master-b, serving, is switched over by hand: its state moves live."""
    sims = {"master-a": SimulatedMaster("master-a", "uae"),
            "master-b": SimulatedMaster("master-b", "usa"),
            "master-c": SimulatedMaster("master-c", "uae", "standby"),
            "master-d": SimulatedMaster("master-d", "usa", "standby")}
    sims["master-a"].mode = "down"  # /health says down, every other call answers 503
    async with serve_app(create_app(sims["master-a"])) as ua, \
            serve_app(create_app(sims["master-b"])) as ub, \
            serve_app(create_app(sims["master-c"])) as uc, \
            serve_app(create_app(sims["master-d"])) as ud, \
            aiohttp.ClientSession() as http:
        cfg = parse_config({
            "state_path": str(tmp_path / "state.db"),
            "probe": {"interval": "200ms", "timeout": "150ms", "failure_threshold": 2},
            "masters": [
                {"name": "master-a", "url": ua, "region": "uae", "priority": 1},
                {"name": "master-b", "url": ub, "region": "usa", "priority": 2},
                {"name": "master-c", "url": uc, "region": "uae", "role": "standby",
                 "priority": 3},
                {"name": "master-d", "url": ud, "region": "usa", "role": "standby",
                 "priority": 4},
            ],
            "failover": {"enabled": True, "require_state": False,
                         "checkpoint_interval": "500ms"},
        })
        svc = Service(cfg, token="t")
        async with running(svc, "127.0.0.1", 0) as server:
            base = f"http://127.0.0.1:{server.port}"
            await wait_for(lambda: [f["result"] for f in svc.recent_failovers(5)] == ["success"],
                           10, "the stateless failover of master-a")
            async with http.post(f"{base}/api/v1/failover", json={"from": "master-b"},
                                 headers={"Authorization": "Bearer t"}) as r:
                switchover = await r.json()
                assert r.status == 200, switchover
            moves = svc.store.list_failovers(limit=5)  # full records: the fetch step's source
            # Moves recorded with no journal here, as a cluster replica imports the leader's:
            # the source is read from the record's own fetch step; one that is markup is text.
            for source in ("checkpoint", EVIL):
                fetch = {"step": "fetch", "status": "ok", "backup": None, "duration": 0.01,
                         "detail": {"from": "master-b", "source": source}}
                svc.store.record_failover("master-b", "failed", "manual", "imported",
                                          time.time(), steps=[fetch])
            async with http.get(f"{base}/") as r:
                assert r.status == 200
                html = await r.text()
    recorded = [(m["master"], m["backup"], m["result"],
                 next(s for s in m["steps"] if s["step"] == "fetch")["detail"]["source"])
                for m in moves]
    assert recorded == [("master-b", "master-d", "success", "live"),
                        ("master-a", "master-c", "success", "none")]
    assert switchover["id"] == moves[0]["id"]
    assert ('title="where the state the backup got came from: live, checkpoint, or none (no state '
            'moved)">State</th>') in html
    rows = failover_rows(html)
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert [(source, cells[1:5]) for source, cells, _ in rows] == [
        (escaped, ["master-b", "\N{EN DASH}", "failed", escaped]),  # no backup
        ("checkpoint", ["master-b", "\N{EN DASH}", "failed", "checkpoint"]),
        ("live", ["master-b", "master-d", "success", "live"]),
        ("none", ["master-a", "master-c", "success", "none"]),
    ]
    assert rows[0][2] == escaped and EVIL not in html  # no class, no markup
    assert rows[1][2] == '<span class="state source-checkpoint">checkpoint</span>'
    assert rows[2][2] == '<span class="state source-live">live</span>'
    assert rows[3][2] == '<span class="state source-none">none</span>'  # styled as a warning
    assert ".source-none { color: var(--warn);" in html


def test_missing_chromium_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    """CI can never pass by skipping the browser test."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required when CI=true"):
        require_binary("chromium")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        require_binary("chromium")

