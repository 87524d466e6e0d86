"""Webhooks and Alertmanager posts against real tiny aiohttp receivers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from exporter.config import AlertmanagerConfig, HookConfig
from exporter.failover.hooks import HookError, alert_payload, call_hook, post_alert, render_body
from tests.support import serve_app


class Receiver:
    """Records every POST body; answers ``status`` (or hangs when ``hang``)."""

    def __init__(self, status: int = 200, hang: bool = False) -> None:
        self.status = status
        self.hang = hang
        self.bodies: list[tuple[str, object]] = []
        self.got = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append((request.path, await request.json()))
        self.got.set()
        if self.hang:
            await asyncio.sleep(30)
        return web.json_response({"ok": self.status < 300}, status=self.status)


CTX = {"id": 7, "master": "a", "backup": "c", "result": "success", "reason": "r",
       "candidates": ["c", "d"], "phase": "post"}


def test_render_body_default_and_template():
    assert json.loads(render_body(None, CTX)) == CTX
    body = render_body('{"text": "failover {{ master }} -> {{ backup }}", '
                       '"cands": {{ candidates | tojson }}}', CTX)
    assert json.loads(body) == {"text": "failover a -> c", "cands": ["c", "d"]}


@pytest.mark.parametrize("template, match", [
    ("{{ nope }}", "template error"),
    ("{% if %}", "template error"),
    ("not json {{ master }}", "did not render to JSON"),
    ("{{ ''.__class__.__mro__ }}", "template error|did not render"),
])
def test_render_body_errors(template, match):
    with pytest.raises(HookError, match=match):
        render_body(template, CTX)


async def test_call_hook_delivers_and_fails_clearly():
    ok, bad, slow = Receiver(), Receiver(status=500), Receiver(hang=True)
    async with serve_app(ok.app) as u1, serve_app(bad.app) as u2, serve_app(slow.app) as u3, \
            aiohttp.ClientSession() as session:
        await call_hook(session, HookConfig(url=f"{u1}/hook", body='{"m": "{{ master }}"}'),
                        CTX, "pre")
        assert ok.bodies == [("/hook", {"m": "a"})]
        with pytest.raises(HookError, match="HTTP 500"):
            await call_hook(session, HookConfig(url=f"{u2}/hook"), CTX, "pre")
        with pytest.raises(HookError, match=r"timeout after 0\.2s"):
            await call_hook(session, HookConfig(url=f"{u3}/hook", timeout=0.2), CTX, "pre")
        with pytest.raises(HookError, match=r"ClientConnectorError|Cannot connect"):
            await call_hook(session, HookConfig(url="http://127.0.0.1:1/hook"), CTX, "pre")


async def test_alertmanager_v2_post_received():
    am = Receiver()
    record = {"id": 3, "master": "a", "backup": "c", "result": "success", "trigger": "auto",
              "reason": "health: timeout", "started": 1_700_000_000.0,
              "finished": 1_700_000_000.5, "duration": 0.5}
    async with serve_app(am.app) as url, aiohttp.ClientSession() as session:
        assert await post_alert(session, AlertmanagerConfig(url=url), record)
        assert await post_alert(session, AlertmanagerConfig(url=url + "/"),
                                {**record, "result": "failed", "backup": None})
        assert not await post_alert(session, AlertmanagerConfig(url="http://127.0.0.1:1"),
                                    record, timeout=1)
    (path1, alerts1), (path2, alerts2) = am.bodies
    assert path1 == path2 == "/api/v2/alerts"
    assert alerts1[0]["labels"] == {"alertname": "HAFailoverExecuted", "master": "a",
                                    "backup": "c", "result": "success", "severity": "info"}
    assert alerts1[0]["startsAt"] == "2023-11-14T22:13:20.000Z"
    assert alerts1[0]["endsAt"] > alerts1[0]["startsAt"]
    assert alerts2[0]["labels"]["alertname"] == "HAFailoverFailed"
    assert alerts2[0]["labels"]["backup"] == "none"
    assert alerts2[0]["labels"]["severity"] == "critical"


def test_alert_payload_rolled_back_is_failed():
    [alert] = alert_payload({"id": 1, "master": "a", "result": "rolled_back", "started": 1.0})
    assert alert["labels"]["alertname"] == "HAFailoverFailed"
