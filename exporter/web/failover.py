"""Failover API: history, audit, manual switchover, maintenance, reset, pause.

History and audit are paginated newest first with an id cursor (``?limit=&before=``), which
stays stable while new entries arrive. Ids are SQLite integers: a number outside 1..2**63-1
is refused with a 400 before it reaches the store. Every action is a mutating request, so
the auth middleware demands the token; failover's refusals become statuses in the error
middleware.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from aiohttp import web
from pydantic import Field

from exporter.web.jsonapi import ApiError, Body, NoBody, json_response, read_body
from exporter.web.keys import SERVICE

MAX_PAGE = 500
#: The largest id SQLite can store (a signed 64-bit integer).
MAX_ID = 2**63 - 1
_WHOLE = re.compile(r"[0-9]{1,19}")


class Operator(Protocol):
    """The failover operations this API offers, by name only: the web layer does not depend on
    where failover keeps its implementation."""

    async def switchover(
        self, frm: str, to: str | None = None, actor: str = "api", *,
        allow_state_loss: bool = False,
    ) -> dict[str, Any]: ...

    async def set_maintenance(self, name: str, on: bool, actor: str = "api") -> dict[str, Any]: ...

    async def reset(self, name: str, actor: str = "api") -> dict[str, Any]: ...

    def pause(self, actor: str = "api") -> None: ...

    def resume(self, actor: str = "api") -> None: ...

    def status(self) -> dict[str, Any]: ...


class Switchover(Body):
    """``allow_state_loss``: when the source no longer serves (the switchover becomes a
    failover) and neither live state nor a young enough checkpoint is left, activate the
    backup without state rather than refuse (``failover.require_state``). Explicit, and
    audited under the caller."""

    source: str = Field(alias="from", min_length=1, max_length=256)
    to: str | None = Field(default=None, min_length=1, max_length=256)
    allow_state_loss: bool = False


class Maintenance(Body):
    """``enabled`` is required: a typo or an empty body must not drain a master."""

    enabled: bool


def whole_number(text: str, name: str, low: int, high: int) -> int:
    """``text`` as an integer in ``low..high`` (ASCII digits only), or a 400 naming ``name``."""
    value = int(text) if _WHOLE.fullmatch(text) else None
    if value is None or not low <= value <= high:
        raise ApiError(400, f"{name!r} must be a whole number between {low} and {high}")
    return value


def _page_args(request: web.Request) -> tuple[int, int | None, str | None]:
    query = request.query
    limit = whole_number(query.get("limit", "50"), "limit", 1, MAX_PAGE)
    before = whole_number(query["before"], "before", 1, MAX_ID) if "before" in query else None
    return limit, before, query.get("master") or None


def _page(items: list[dict[str, Any]], limit: int, total: int) -> dict[str, Any]:
    more = len(items) > limit
    items = items[:limit]
    return {"items": items, "total": total, "next_before": items[-1]["id"] if more else None}


def _operator(request: web.Request) -> Operator:
    fo = request.app[SERVICE].failover
    if fo is None:
        raise ApiError(503, "the exporter is still starting")
    return fo


async def failovers(request: web.Request) -> web.Response:
    limit, before, master = _page_args(request)
    store = request.app[SERVICE].store
    rows = store.list_failovers(limit=limit + 1, before=before, master=master, brief=True)
    return json_response(_page(rows, limit, store.count_failovers(master)))


async def failover_one(request: web.Request) -> web.Response:
    fid = whole_number(request.match_info["id"], "failover id", 1, MAX_ID)
    row = request.app[SERVICE].store.get_failover(fid)
    if row is None:
        raise ApiError(404, f"no failover with id {fid}")
    return json_response(row)


async def audit(request: web.Request) -> web.Response:
    limit, before, master = _page_args(request)
    store = request.app[SERVICE].store
    rows = store.list_audit(limit=limit + 1, before=before, master=master)
    return json_response(_page(rows, limit, store.count_audit(master)))


async def manual_failover(request: web.Request) -> web.Response:
    """Graceful switchover: the new master is active before the old one is released. A move
    that ran but did not succeed is a 409 carrying the full record."""
    body = await read_body(request, Switchover)
    record = await _operator(request).switchover(
        body.source, body.to, actor="api", allow_state_loss=body.allow_state_loss
    )
    return json_response(record, 200 if record.get("result") in ("success", "dry_run") else 409)


async def maintenance(request: web.Request) -> web.Response:
    """An unknown master is a 404 whatever the body says."""
    name = request.match_info["name"]
    if request.app[SERVICE].fleet.get(name) is None:
        raise ApiError(404, f"no master named {name!r}")
    body = await read_body(request, Maintenance)
    return json_response(
        await _operator(request).set_maintenance(name, body.enabled, actor="api")
    )


async def reset(request: web.Request) -> web.Response:
    await read_body(request, NoBody)
    name = request.match_info["name"]
    return json_response(await _operator(request).reset(name, actor="api"))


async def pause(request: web.Request) -> web.Response:
    await read_body(request, NoBody)
    fo = _operator(request)
    fo.pause("api")
    return json_response(fo.status())


async def resume(request: web.Request) -> web.Response:
    await read_body(request, NoBody)
    fo = _operator(request)
    fo.resume("api")
    return json_response(fo.status())


async def status(request: web.Request) -> web.Response:
    return json_response(_operator(request).status())


ROUTES: list[web.RouteDef] = [
    web.get("/api/v1/failovers", failovers),
    web.get("/api/v1/failovers/{id}", failover_one),
    web.get("/api/v1/audit", audit),
    web.post("/api/v1/failover", manual_failover),
    web.get("/api/v1/failover/status", status),
    web.post("/api/v1/failover/pause", pause),
    web.post("/api/v1/failover/resume", resume),
    web.post("/api/v1/masters/{name}/maintenance", maintenance),
    web.post("/api/v1/masters/{name}/reset", reset),
]
