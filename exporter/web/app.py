"""HTTP surface: /metrics, health and readiness, the JSON API and the status page.

Errors are always JSON ``{"error": ...}`` with the right status; every mutating endpoint needs
the bearer token (compared in constant time) unless the operator chose --insecure-no-auth.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from exporter.service import Service

log = logging.getLogger(__name__)
SERVICE: web.AppKey[Service] = web.AppKey("service")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, default=str))


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error the API gives, including aiohttp's own (404, 405, 413), as JSON."""
    try:
        return await handler(request)
    except ApiError as exc:
        return json_response({"error": str(exc)}, exc.status)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SERVICE].config.api.max_body_bytes
        return json_response({"error": f"request body too large (limit {limit} bytes)"}, 413)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_response({"error": exc.reason}, exc.status)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_response({"error": "internal error; see the exporter's log"}, 500)


def service_of(request: web.Request) -> Service:
    return request.app[SERVICE]


def require_token(request: web.Request) -> None:
    """401 unless the bearer token matches; the token itself is never logged."""
    svc = service_of(request)
    if svc.insecure_no_auth and not svc.token:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    expected = svc.token or ""
    if (
        scheme.lower() != "bearer"
        or not expected
        or not hmac.compare_digest(given.strip().encode(), expected.encode())
    ):
        log.warning(
            "rejected %s %s from %s: missing or wrong bearer token",
            request.method,
            request.path,
            request.remote,
        )
        raise ApiError(401, "missing or invalid bearer token")


async def read_json(request: web.Request) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    raw = await request.read()  # over api.max_body_bytes: 413, answered by errors_as_json
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    return body


def master_or_404(request: web.Request) -> Any:
    name = request.match_info["name"]
    rt = service_of(request).fleet.get(name)
    if rt is None:
        raise ApiError(404, f"no master named {name!r}")
    return rt


async def metrics(request: web.Request) -> web.Response:
    body, content_type = service_of(request).metrics.render(request.headers.get("Accept"))
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    svc = service_of(request)
    if svc.ready:
        return json_response({"status": "ready", "masters": len(svc.fleet)})
    return json_response({"status": "not ready", "reason": "first probe round not done yet"}, 503)


async def masters(request: web.Request) -> web.Response:
    svc = service_of(request)
    timeout = svc.config.failover.recovery_timeout
    role_of = svc.duties.role_of
    return json_response({"masters": [rt.as_dict(role_of(rt.name), timeout) for rt in svc.fleet]})


async def master(request: web.Request) -> web.Response:
    rt = master_or_404(request)
    svc = service_of(request)
    return json_response(
        rt.as_dict(svc.duties.role_of(rt.name), svc.config.failover.recovery_timeout)
    )


async def reload(request: web.Request) -> web.Response:
    require_token(request)
    ok, errors = await service_of(request).reload()
    if not ok:
        return json_response(
            {"error": "config rejected, running config kept", "errors": errors}, 400
        )
    return json_response({"status": "reloaded"})


def create_app(service: Service) -> web.Application:
    app = web.Application(
        middlewares=[errors_as_json], client_max_size=service.config.api.max_body_bytes
    )
    app[SERVICE] = service
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/v1/masters", masters)
    app.router.add_get("/api/v1/masters/{name}", master)
    app.router.add_post("/-/reload", reload)
    from exporter.web import failover, routing, statuspage  # they import this module's helpers

    for add_routes in (statuspage.add_routes, routing.add_routes, failover.add_routes):
        add_routes(app)
    return app
