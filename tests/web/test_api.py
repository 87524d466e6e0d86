"""The API's cross-cutting rules, over a real exporter app on 127.0.0.1 and simulated masters:
every mutating request needs the token, reads do not, and request bodies are strict.

The routes are enumerated from the running app's router, so a route added later is covered
without anyone remembering to list it here.
"""

from __future__ import annotations

import logging
import re
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
from exporter.web.server import HttpServer, running
from tests.support import serve_app, wait_for

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MUTATING = ("POST", "PUT", "DELETE", "PATCH")
#: Values for path placeholders: a master that exists, a failover id that does not.
PLACEHOLDERS = {"name": "master-a", "id": "1"}
NO_TOKEN: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer not-the-token-42"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": "Bearer"},
    {"Authorization": TOKEN},
]


class Api:
    """The exporter under test: its service, base URL, app and an HTTP client."""

    def __init__(self, svc: Service, server: HttpServer, http: aiohttp.ClientSession) -> None:
        self.svc = svc
        self.app: web.Application = server.runner.app
        self.base = f"http://127.0.0.1:{server.port}"
        self.http = http

    async def call(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any
    ) -> tuple[int, Any]:
        async with self.http.request(method, self.base + path, headers=headers, **kw) as r:
            if r.content_type == "application/json":
                return r.status, await r.json()
            return r.status, await r.text()

    def routes(self, methods: tuple[str, ...]) -> list[tuple[str, str]]:
        """(method, concrete path) of every route the app serves with one of ``methods``."""
        found = []
        for route in self.app.router.routes():
            if route.method in methods and route.resource is not None:
                path = re.sub(r"\{(\w+)[^}]*\}", lambda m: PLACEHOLDERS[m[1]],
                              route.resource.canonical)
                found.append((route.method, path))
        return found

    def paths(self) -> list[str]:
        return sorted({path for _, path in self.routes(("GET", *MUTATING))})


@asynccontextmanager
async def exporter(
    tmp: Path, token: str | None = TOKEN, insecure_no_auth: bool = False
) -> AsyncIterator[Api]:
    sims = [SimulatedMaster("master-a", "uae"), SimulatedMaster("master-b", "usa"),
            SimulatedMaster("master-c", "uae", "standby")]
    async with serve_app(create_app(sims[0])) as ua, serve_app(create_app(sims[1])) as ub, \
            serve_app(create_app(sims[2])) as uc:
        cfg = parse_config({
            "state_path": str(tmp / "state.db"),
            "probe": {"interval": "200ms", "timeout": "150ms"},
            "masters": [
                {"name": "master-a", "url": ua, "region": "uae", "priority": 1},
                {"name": "master-b", "url": ub, "region": "usa", "priority": 2},
                {"name": "master-c", "url": uc, "region": "uae", "role": "standby",
                 "priority": 3},
            ],
            "failover": {"enabled": False},
            "api": {"token_env": None, "max_body_bytes": 1024},
        })
        svc = Service(cfg, token=token, insecure_no_auth=insecure_no_auth)
        async with running(svc, "127.0.0.1", 0) as server, aiohttp.ClientSession() as http:
            await wait_for(lambda: svc.ready, 10, "the first probe round")
            yield Api(svc, server, http)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with exporter(tmp_path) as a:
        yield a


def audit_actions(api: Api) -> list[str]:
    return [e["action"] for e in api.svc.store.list_audit(limit=100, before=None, master=None)]


async def test_every_mutating_request_without_the_token_is_401(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    mutating = api.routes(MUTATING)
    assert {
        ("POST", "/-/reload"),
        ("POST", "/api/v1/failover"),
        ("POST", "/api/v1/failover/pause"),
        ("POST", "/api/v1/failover/resume"),
        ("POST", "/api/v1/masters/master-a/maintenance"),
        ("POST", "/api/v1/masters/master-a/reset"),
        ("POST", "/api/v1/route/report"),
        ("PUT", "/api/v1/balancing/strategy"),
    } <= set(mutating), mutating
    before = audit_actions(api)
    # every mutating method on every path, routed for it or not
    checked = 0
    with caplog.at_level(logging.WARNING, logger="exporter.web"):
        for path in api.paths():
            for method in MUTATING:
                for headers in NO_TOKEN:
                    status, body = await api.call(method, path, headers, json={})
                    assert (status, body) == (401, {"error": "missing or invalid bearer token"}), (
                        method, path, headers)
                    checked += 1
    assert checked >= len(mutating) * len(NO_TOKEN)
    assert audit_actions(api) == before  # nothing was done
    assert api.svc.failover is not None and not api.svc.failover.paused
    assert "rejected POST /api/v1/failover/pause" in caplog.text
    assert TOKEN not in caplog.text and "not-the-token-42" not in caplog.text
    # with the token, a method the path does not serve is a JSON 405, not a pass
    status, body = await api.call("DELETE", "/api/v1/failover", AUTH)
    assert status == 405 and body["error"]


async def test_reads_need_no_token(api: Api) -> None:
    reads = api.routes(("GET",))
    assert ("GET", "/") in reads and ("GET", "/metrics") in reads, reads
    for method, path in reads:
        status, body = await api.call(method, path)
        expected = 404 if path == "/api/v1/failovers/1" else 200  # no failover yet
        assert status == expected, (path, status, body)


async def test_unknown_body_key_is_400_naming_it_on_every_mutating_route(api: Api) -> None:
    before = audit_actions(api)
    for method, path in api.routes(MUTATING):
        status, body = await api.call(method, path, AUTH, json={"unexpected": 1})
        assert status == 400, (method, path, status, body)
        assert "body.unexpected: unexpected field" in body["error"], (path, body)
    valid_plus_extra = [
        ("POST", "/api/v1/failover", {"from": "master-a", "extra": 1}, "body.extra"),
        ("POST", "/api/v1/masters/master-b/maintenance", {"enabled": True, "drain": False},
         "body.drain"),
        ("POST", "/api/v1/route/report", {"master": "master-a", "ok": True, "latency": 1},
         "body.latency"),
        ("PUT", "/api/v1/balancing/strategy", {"strategy": "geo", "Strategy": "geo"},
         "body.Strategy"),
    ]
    for method, path, payload, named in valid_plus_extra:
        status, body = await api.call(method, path, AUTH, json=payload)
        assert (status, body) == (400, {"error": f"{named}: unexpected field"}), path
    assert audit_actions(api) == before
    assert api.svc.router.strategy == "round_robin"


async def test_missing_or_mistyped_field_is_400_naming_it(api: Api) -> None:
    cases = [
        ("POST", "/api/v1/failover", {}, "body.from: required field missing"),
        ("POST", "/api/v1/failover", {"from": ""}, "body.from: "),
        ("POST", "/api/v1/failover", {"from": "master-a", "to": 3}, "body.to: "),
        ("POST", "/api/v1/route/report", {"ok": True}, "body.master: required field missing"),
        ("POST", "/api/v1/route/report", {"master": "master-a"},
         "body.ok: required field missing"),
        ("POST", "/api/v1/route/report", {"master": "master-a", "ok": "yes"}, "body.ok: "),
        ("POST", "/api/v1/route/report", {"master": "master-a", "ok": True,
                                          "latency_seconds": -1}, "body.latency_seconds: "),
        ("POST", "/api/v1/masters/master-b/maintenance", {"enabled": "yes"}, "body.enabled: "),
        ("PUT", "/api/v1/balancing/strategy", {}, "body.strategy: required field missing"),
        ("PUT", "/api/v1/balancing/strategy", {"strategy": "random"},
         "body.strategy: unknown strategy 'random'"),
    ]
    for method, path, payload, message in cases:
        status, body = await api.call(method, path, AUTH, json=payload)
        assert status == 400 and body["error"].startswith(message), (path, payload, body)
    for raw in (b"[1, 2]", b'"text"', b"{not json"):
        status, body = await api.call("POST", "/api/v1/failover/pause", AUTH, data=raw)
        assert status == 400 and "JSON" in body["error"], (raw, body)
    status, body = await api.call("POST", "/api/v1/route/report", AUTH,
                                  json={"master": "master-a", "ok": True, "pad": "x" * 2048})
    assert status == 413 and "1024 bytes" in body["error"]


async def test_valid_bodies_and_domain_errors(api: Api) -> None:
    """What was accepted before still is (optional fields optional, no body where none is
    needed); failover's refusals come back with their statuses."""
    ok = [
        ("POST", "/api/v1/failover", {"from": "master-b", "to": None}),
        ("POST", "/api/v1/route/report", {"master": "master-a", "ok": True}),
        ("POST", "/api/v1/route/report", {"master": "master-a", "ok": False,
                                          "latency_seconds": 2}),
        ("POST", "/api/v1/failover/pause", None),
        ("POST", "/api/v1/failover/resume", {}),
        ("POST", "/api/v1/masters/master-c/maintenance", None),
        ("POST", "/api/v1/masters/master-c/maintenance", {"enabled": False}),
        ("POST", "/api/v1/masters/master-c/reset", None),
        ("PUT", "/api/v1/balancing/strategy", {"strategy": "geo"}),
    ]
    for method, path, payload in ok:
        status, body = await api.call(method, path, AUTH, json=payload)
        assert status == 200, (path, payload, status, body)
    assert api.svc.router.strategy == "geo"
    refused = [
        ("POST", "/api/v1/failover", {"from": "nobody"}, 404),
        ("POST", "/api/v1/failover", {"from": "master-c"}, 409),  # standby: no duties
        ("POST", "/api/v1/masters/nobody/reset", None, 404),
        ("POST", "/api/v1/route/report", {"master": "nobody", "ok": True}, 404),
    ]
    for method, path, payload, expected in refused:
        status, body = await api.call(method, path, AUTH, json=payload)
        assert status == expected and body["error"], (path, payload, status, body)


async def test_insecure_no_auth_without_a_token_lets_writes_through(tmp_path: Path) -> None:
    async with exporter(tmp_path, token=None, insecure_no_auth=True) as api:
        status, body = await api.call("POST", "/api/v1/failover/pause")
        assert status == 200 and body["paused"] is True


async def test_insecure_no_auth_does_not_override_a_configured_token(tmp_path: Path) -> None:
    async with exporter(tmp_path, insecure_no_auth=True) as api:
        assert (await api.call("POST", "/api/v1/failover/pause"))[0] == 401
        assert (await api.call("POST", "/api/v1/failover/pause", AUTH))[0] == 200
