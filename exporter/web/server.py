"""Serving a Service over HTTP, and the lifecycle that puts the two together."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from exporter.service import Service
from exporter.web.app import create_app
from exporter.web.connections import ConnectionGuard, ConnectionLimits, GuardedAppRunner

log = logging.getLogger(__name__)


class HttpServer:
    """The exporter's HTTP surface; ``port`` is the one actually bound (port 0 picks one).
    ``limits`` bound its client connections (see exporter.web.connections)."""

    def __init__(self, service: Service, limits: ConnectionLimits | None = None) -> None:
        self.service = service
        self.runner = GuardedAppRunner(
            create_app(service), limits or ConnectionLimits(), shutdown_timeout=2.0
        )
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port).start()
        address = self.runner.addresses[0]
        self.port = int(address[1])
        log.info("ha-exporter listening on http://%s:%s with %d masters", host, self.port,
                 len(self.service.fleet))
        guard = self.guard
        if guard.max_connections < guard.limits.max_connections:
            log.warning("serving at most %d client connections, not %d: the open-files limit "
                        "is low (ulimit -n)", guard.max_connections, guard.limits.max_connections)

    @property
    def guard(self) -> ConnectionGuard:
        return self.runner.guard

    async def stop(self) -> None:
        await self.runner.cleanup()


@asynccontextmanager
async def running(
    service: Service,
    host: str | None = None,
    port: int | None = None,
    limits: ConnectionLimits | None = None,
) -> AsyncIterator[HttpServer]:
    """Start the service and its HTTP surface; on exit stop the service first (HTTP keeps
    answering while failovers finish), then HTTP, then release the session and store."""
    server = HttpServer(service, limits)
    try:
        await service.start()
    except BaseException:
        await service.close()
        raise
    try:
        bind = host or service.config.listen.host
        await server.start(bind, service.config.listen.port if port is None else port)
        await service.join_cluster(f"http://{bind}:{server.port}")
        yield server
    finally:
        try:
            await service.stop()
        finally:
            await server.stop()
            await service.close()
