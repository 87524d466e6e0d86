"""Failover API: history, audit, manual switchover, maintenance, reset, pause.

History and audit are paginated newest first with an id cursor (``?limit=&before=``), which
stays stable while new entries arrive; every action needs the bearer token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from exporter.failover.errors import (
    Conflict,
    FailoverRejected,
    InvalidRequest,
    Unavailable,
    UnknownMaster,
)
from exporter.failover.manager import FailoverManager
from exporter.web.app import ApiError, json_response, read_json, require_token, service_of

MAX_PAGE = 500


def _page_args(request: web.Request) -> tuple[int, int | None, str | None]:
    try:
        limit = int(request.query.get("limit", "50"))
        before = int(request.query["before"]) if "before" in request.query else None
    except ValueError:
        raise ApiError(400, "'limit' and 'before' must be whole numbers") from None
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError(400, f"'limit' must be between 1 and {MAX_PAGE}")
    return limit, before, request.query.get("master") or None


def _page(items: list[dict[str, Any]], limit: int, total: int) -> dict[str, Any]:
    more = len(items) > limit
    items = items[:limit]
    return {"items": items, "total": total, "next_before": items[-1]["id"] if more else None}


def _manager(request: web.Request) -> FailoverManager:
    fo = service_of(request).failover
    if fo is None:
        raise ApiError(503, "the exporter is still starting")
    return fo


_STATUS: dict[type[FailoverRejected], int] = {
    UnknownMaster: 404, Conflict: 409, InvalidRequest: 400, Unavailable: 503,
}


async def _act(call: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await call()
    except FailoverRejected as exc:
        raise ApiError(_STATUS.get(type(exc), 409), str(exc)) from None


async def failovers(request: web.Request) -> web.Response:
    limit, before, master = _page_args(request)
    store = service_of(request).store
    rows = store.list_failovers(limit=limit + 1, before=before, master=master, brief=True)
    return json_response(_page(rows, limit, store.count_failovers(master)))


async def failover_one(request: web.Request) -> web.Response:
    try:
        fid = int(request.match_info["id"])
    except ValueError:
        raise ApiError(400, "failover id must be a whole number") from None
    row = service_of(request).store.get_failover(fid)
    if row is None:
        raise ApiError(404, f"no failover with id {fid}")
    return json_response(row)


async def audit(request: web.Request) -> web.Response:
    limit, before, master = _page_args(request)
    store = service_of(request).store
    rows = store.list_audit(limit=limit + 1, before=before, master=master)
    return json_response(_page(rows, limit, store.count_audit(master)))


async def manual_failover(request: web.Request) -> web.Response:
    """Graceful switchover: the new master is active before the old one is released."""
    require_token(request)
    body = await read_json(request)
    frm, to = body.get("from"), body.get("to")
    if not isinstance(frm, str) or not frm:
        raise ApiError(400, "'from' must name the master to switch away from")
    if to is not None and (not isinstance(to, str) or not to):
        raise ApiError(400, "'to' must be a master name when given")
    fo = _manager(request)
    record = await _act(lambda: fo.switchover(frm, to, actor="api"))
    return json_response(record, 200 if record.get("result") in ("success", "dry_run") else 409)


async def maintenance(request: web.Request) -> web.Response:
    require_token(request)
    body = await read_json(request)
    on = body.get("enabled", True)
    if not isinstance(on, bool):
        raise ApiError(400, "'enabled' must be true or false")
    name = request.match_info["name"]
    fo = _manager(request)
    return json_response(await _act(lambda: fo.set_maintenance(name, on, actor="api")))


async def reset(request: web.Request) -> web.Response:
    require_token(request)
    await read_json(request)
    name = request.match_info["name"]
    fo = _manager(request)
    return json_response(await _act(lambda: fo.reset(name, actor="api")))


async def pause(request: web.Request) -> web.Response:
    require_token(request)
    fo = _manager(request)
    fo.pause("api")
    return json_response(fo.status())


async def resume(request: web.Request) -> web.Response:
    require_token(request)
    fo = _manager(request)
    fo.resume("api")
    return json_response(fo.status())


async def status(request: web.Request) -> web.Response:
    return json_response(_manager(request).status())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/failovers", failovers)
    app.router.add_get("/api/v1/failovers/{id}", failover_one)
    app.router.add_get("/api/v1/audit", audit)
    app.router.add_post("/api/v1/failover", manual_failover)
    app.router.add_get("/api/v1/failover/status", status)
    app.router.add_post("/api/v1/failover/pause", pause)
    app.router.add_post("/api/v1/failover/resume", resume)
    app.router.add_post("/api/v1/masters/{name}/maintenance", maintenance)
    app.router.add_post("/api/v1/masters/{name}/reset", reset)
