"""Masters that break one rule of the protocol each, as real aiohttp apps: the simulated
master with one behaviour changed, in its model or by a middleware around its handlers."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from exporter.sim import SimulatedMaster, create_app

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


class IgnoresTakenOver(SimulatedMaster):
    """Activates its own duty whatever it is asked to take over."""

    def activate(self, taken_over: str | None = None) -> dict[str, Any]:
        return super().activate(None)


class DuplicatesDuties(SimulatedMaster):
    """Adds the duty again on every activate: not idempotent."""

    def activate(self, taken_over: str | None = None) -> dict[str, Any]:
        self.active = True
        self.duties.append(taken_over or self.name)
        return {"active": True, "duties": list(self.duties)}


def _rewrite(method: str, path: str, change: Callable[[dict[str, Any]], None]) -> Middleware:
    @web.middleware
    async def rewrite(request: web.Request, handler: Handler) -> web.StreamResponse:
        resp = await handler(request)
        if (request.method, request.path) != (method, path) or not isinstance(
                resp, web.Response) or resp.status != 200:
            return resp
        assert resp.text is not None
        body = json.loads(resp.text)
        change(body)
        return web.json_response(body)

    return rewrite


@web.middleware
async def ignore_epochs(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The header never reaches the master: a stale controller is obeyed (200)."""
    headers = {k: v for k, v in request.headers.items() if k.lower() != "x-ha-epoch"}
    return await handler(request.clone(headers=headers))


@web.middleware
async def error_on_unknown_path(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return web.json_response({"error": "internal error"}, status=500)


def _wrong_checksum(body: dict[str, Any]) -> None:
    body["checksum"] = "0" * 64


def _no_status(body: dict[str, Any]) -> None:
    del body["status"]


def app(kind: str) -> web.Application:
    """The broken master of that ``kind`` (an id of ``KINDS``)."""
    master = {"ignores-taken-over": IgnoresTakenOver,
              "non-idempotent-activate": DuplicatesDuties}.get(kind, SimulatedMaster)("m1")
    out = create_app(master)
    extra: dict[str, Middleware] = {
        "wrong-checksum": _rewrite("GET", "/state", _wrong_checksum),
        "no-status": _rewrite("GET", "/health", _no_status),
        "200-on-stale-epoch": ignore_epochs,
        "500-on-unknown-path": error_on_unknown_path,
    }
    if kind in extra:
        out.middlewares.append(extra[kind])
    return out


#: kind -> (the requirement that must fail, a word its reason must contain)
KINDS: dict[str, tuple[str, str]] = {
    "wrong-checksum": ("state.checksum", "checksum mismatch"),
    "no-status": ("health.schema", "status"),
    "200-on-stale-epoch": ("epoch.stale", "answered 200, expected 409"),
    "500-on-unknown-path": ("errors.unknown-path", "answered 500, expected 404"),
    "non-idempotent-activate": ("activate.idempotent", "duties"),
    "ignores-taken-over": ("activate.taken-over", "taken_over ignored"),
}
