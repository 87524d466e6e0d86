"""Test support: real servers on 127.0.0.1 and condition waits with deadlines."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for(
    check: Callable[[], Awaitable[T] | T], timeout: float, what: str, poll: float = 0.05
) -> T:
    """Poll ``check`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            last = result
            if result:
                return result
        except Exception as exc:  # the condition may raise while the system settles
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(poll)


@asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve an aiohttp app on 127.0.0.1 (ephemeral port); yield its base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as r:
        return await r.json()


async def metric_value(http: aiohttp.ClientSession, base: str, series: str) -> float | None:
    """The value of one exact series (name plus labels as rendered) on the exporter's /metrics."""
    async with http.get(f"{base}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
    return None


async def wait_ready(http: aiohttp.ClientSession, base: str, timeout: float = 15) -> None:
    async def ready() -> bool:
        async with http.get(f"{base}/readyz") as r:
            return r.status == 200

    await wait_for(ready, timeout, f"readiness of {base}")
