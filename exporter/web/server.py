"""Serving a Service over HTTP, and the lifecycle that puts the two together."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from exporter.service import Service
from exporter.web.app import create_app

log = logging.getLogger(__name__)


class HttpServer:
    """The exporter's HTTP surface; ``port`` is the one actually bound (port 0 picks one)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.runner = web.AppRunner(
            create_app(service), access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port).start()
        address = self.runner.addresses[0]
        self.port = int(address[1])
        log.info("ha-exporter listening on http://%s:%s with %d masters", host, self.port,
                 len(self.service.fleet))

    async def stop(self) -> None:
        await self.runner.cleanup()


@asynccontextmanager
async def running(
    service: Service, host: str | None = None, port: int | None = None
) -> AsyncIterator[HttpServer]:
    """Start the service and its HTTP surface; on exit stop the service first (HTTP keeps
    answering while failovers finish), then HTTP, then release the session and store."""
    server = HttpServer(service)
    try:
        await service.start()
    except BaseException:
        await service.close()
        raise
    try:
        await server.start(host or service.config.listen.host,
                           service.config.listen.port if port is None else port)
        yield server
    finally:
        try:
            await service.stop()
        finally:
            await server.stop()
            await service.close()
