"""The exporter's own endpoints: metrics, liveness, readiness, master state, reload."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from exporter.fleet import MasterRuntime
from exporter.service import Service
from exporter.web.jsonapi import ApiError, NoBody, json_response, read_body
from exporter.web.keys import SERVICE


def _master_or_404(request: web.Request) -> MasterRuntime:
    name = request.match_info["name"]
    rt = request.app[SERVICE].fleet.get(name)
    if rt is None:
        raise ApiError(404, f"no master named {name!r}")
    return rt


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text, or OpenMetrics when the scraper's Accept header asks for it."""
    body, content_type = request.app[SERVICE].metrics.render(request.headers.get("Accept"))
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
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
