"""The exporter's own endpoints: metrics, liveness, readiness, master state, reload."""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import Any

from aiohttp import web

from exporter.fleet import MasterRuntime
from exporter.metrics import content_type, wants_openmetrics
from exporter.service import Service
from exporter.web.jsonapi import ApiError, NoBody, json_response, read_body
from exporter.web.keys import SERVICE

log = logging.getLogger(__name__)


def _master_or_404(request: web.Request) -> MasterRuntime:
    name = request.match_info["name"]
    rt = request.app[SERVICE].fleet.get(name)
    if rt is None:
        raise ApiError(404, f"no master named {name!r}")
    return rt


async def metrics(request: web.Request) -> web.StreamResponse:
    """Prometheus text, or OpenMetrics when the scraper's Accept header asks for it, streamed:
    each piece is written as it is rendered and the event loop is handed back in between, so
    a scrape of a large fleet neither holds the probes' schedule nor its whole body in memory.
    The render never raises (what fails is left out), so once the headers are out the body is
    always a valid exposition."""
    openmetrics = wants_openmetrics(request.headers.get("Accept"))
    resp = web.StreamResponse(headers={"Content-Type": content_type(openmetrics)})
    if request.method == "HEAD":  # headers only: a body here would corrupt the connection
        resp.content_length = 0
        await resp.prepare(request)
        return resp
    await resp.prepare(request)
    try:
        async with aclosing(request.app[SERVICE].metrics.stream(openmetrics)) as body:
            async for data in body:
                await resp.write(data)
        await resp.write_eof()
    except ConnectionError:  # the scraper gave up (its scrape_timeout) or went away
        log.debug("scrape of /metrics from %s ended by the client", request.remote)
    return resp


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    reason = svc.not_ready_reason
    if reason is None:
        return json_response({"status": "ready", "masters": len(svc.fleet)})
    return json_response({"status": "not ready", "reason": reason}, 503)


def master_json(svc: Service, rt: MasterRuntime) -> dict[str, Any]:
    """One master's entry: its record, with the duty table's role and duties for it."""
    return rt.as_dict(
        svc.duties.role_of(rt.name),
        svc.config.failover.recovery_timeout,
        duties=svc.duties.duties_of(rt.name),
    )


async def masters(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    return json_response({"masters": [master_json(svc, rt) for rt in svc.fleet]})


async def master(request: web.Request) -> web.Response:
    rt = _master_or_404(request)
    return json_response(master_json(request.app[SERVICE], rt))


async def reload(request: web.Request) -> web.Response:
    """A rejected file is a 400 listing every problem; the running config stays."""
    await read_body(request, NoBody)
    ok, errors = await request.app[SERVICE].reload()
    if not ok:
        return json_response(
            {"error": "config rejected, running config kept", "errors": errors}, 400
        )
    return json_response({"status": "reloaded"})


ROUTES: list[web.RouteDef] = [
    web.get("/metrics", metrics),
    web.get("/healthz", healthz),
    web.get("/readyz", readyz),
    web.get("/api/v1/masters", masters),
    web.get("/api/v1/masters/{name}", master),
    web.post("/-/reload", reload),
]
