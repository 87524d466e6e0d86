"""Notifications never block a move: failed post-hooks and Alertmanager posts are counted by
kind and logged once per reason, against real receivers on 127.0.0.1."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import aiohttp
from aiohttp import web

from exporter.failover.notify import Notifier
from exporter.failover.records import FailoverRecord
from exporter.store import Store
from tests.support import closed_port, make_config, master_entry, serve_app


def record(fid: int) -> FailoverRecord:
    return cast(FailoverRecord, {
        "id": fid, "started": 1.0, "finished": 2.0, "master": "a", "backup": "c",
        "result": "success", "trigger": "auto", "reason": "r", "duration": 1.0, "steps": [],
        "candidates": [{"name": "c", "eligible": True, "rank": 1, "reason": None}],
        "kind": "failover"})


def failing_hook() -> web.Application:
    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error": "nope"}, status=500)

    app = web.Application()
    app.router.add_post("/hook", refuse)
    return app


async def test_failures_are_counted_by_kind_and_logged_once_per_reason(tmp_path: Path, caplog):
    caplog.set_level(logging.INFO, logger="exporter.failover.notify")
    store = Store(tmp_path / "s.db")
    async with serve_app(failing_hook()) as hook_url, aiohttp.ClientSession() as session:
        config = make_config(
            tmp_path, [master_entry("a", "http://127.0.0.1:1")],
            failover={"post_hook": {"url": f"{hook_url}/hook", "timeout": "2s"}},
            alertmanager={"url": f"http://127.0.0.1:{closed_port()}"})
        notifier = Notifier(session, store, lambda: config)
        for fid in (1, 2, 3):
            notifier.notify(record(fid))
            await notifier.flush(10)
    assert dict(notifier.failures) == {"post_hook": 3, "alertmanager": 3}
    failed: list[Any] = [r for r in caplog.records if "delivery failed" in r.getMessage()]
    assert sorted(r.kind for r in failed) == ["alertmanager", "post_hook"]  # once each
    assert "HTTP 500" in next(r.getMessage() for r in failed if r.kind == "post_hook")
    audited = [a for a in store.list_audit() if a["action"] == "post_hook_failed"]
    assert [a["detail"]["failover_id"] for a in audited] == [3, 2, 1]
    store.close()
