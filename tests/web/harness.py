"""A real exporter for the web tests: a Service in front of three in-process simulated masters,
served by ``running(...)`` on 127.0.0.1 port 0, and a client for it.

The routes are enumerated from the running app's router, so a route added later is covered
by every test that walks them without anyone remembering to list it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from exporter.config import parse_config
from exporter.service import Service
from exporter.sim.master import SimulatedMaster, create_app
from exporter.web.connections import ConnectionLimits
from exporter.web.server import HttpServer, running
from tests.support import serve_app, wait_for

TOKEN = "s3cret-token-for-the-web-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MUTATING = ("POST", "PUT", "DELETE", "PATCH")
#: Values for path placeholders: a master that exists, a failover id that does not.
PLACEHOLDERS = {"name": "master-a", "id": "1"}


class Api:
    """The exporter under test: its service, server, base URL, app and an HTTP client."""

    def __init__(self, svc: Service, server: HttpServer, http: aiohttp.ClientSession) -> None:
        self.svc = svc
        self.server = server
        self.app: web.Application = server.runner.app
        assert server.port is not None
        self.port: int = server.port
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
                found.append((route.method, concrete(route.resource.canonical)))
        return found

    def paths(self) -> list[str]:
        return sorted({path for _, path in self.routes(("GET", *MUTATING))})


def concrete(canonical: str, values: dict[str, str] | None = None) -> str:
    """A route's canonical path with its ``{placeholders}`` filled in."""
    values = values or PLACEHOLDERS
    return re.sub(r"\{(\w+)[^}]*\}", lambda m: values[m[1]], canonical)


@asynccontextmanager
async def exporter(
    tmp: Path,
    token: str | None = TOKEN,
    insecure_no_auth: bool = False,
    limits: ConnectionLimits | None = None,
    max_body_bytes: int = 1024,
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
            "api": {"token_env": None, "max_body_bytes": max_body_bytes},
        })
        svc = Service(cfg, token=token, insecure_no_auth=insecure_no_auth)
        async with running(svc, "127.0.0.1", 0, limits) as server, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            await wait_for(lambda: svc.ready, 10, "the first probe round")
            yield Api(svc, server, http)


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one raw HTTP/1.x response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body
