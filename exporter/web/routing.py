"""Routing API: where should this message go, how did it go, which strategy.

Producers call GET /api/v1/route per message (see exporter.client); outcome reports feed
passive outlier detection. Reports and strategy changes alter routing, so both need the token.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache

from aiohttp import web

from exporter.config import STRATEGIES
from exporter.routing.router import Decision, NoRoute
from exporter.web.app import ApiError, json_response, read_json, require_token, service_of


@lru_cache(maxsize=4096)
def _decision_body(d: Decision) -> bytes:
    """The encoded answer for a decision, made once: decisions are a few immutable values per
    master, and encoding per request (json_response) was over half of this hot handler's time."""
    return json.dumps({"master": d.master, "url": d.url, "strategy": d.strategy}).encode()


async def route(request: web.Request) -> web.Response:
    svc = service_of(request)
    query = request.query
    try:
        d = svc.router.route(query.get("key") or None, query.get("region") or None)
    except NoRoute as exc:
        return json_response({"error": str(exc), "strategy": svc.router.strategy}, 503)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    return web.Response(body=_decision_body(d), content_type="application/json", charset="utf-8")


async def report(request: web.Request) -> web.Response:
    require_token(request)
    body = await read_json(request)
    master, ok, latency = body.get("master"), body.get("ok"), body.get("latency_seconds", 0.0)
    if not isinstance(master, str) or not master:
        raise ApiError(400, "'master' must be a master name")
    if not isinstance(ok, bool):
        raise ApiError(400, "'ok' must be true or false")
    if (
        isinstance(latency, bool)
        or not isinstance(latency, int | float)
        or latency < 0
        or not math.isfinite(latency)
    ):
        raise ApiError(400, "'latency_seconds' must be a non-negative number")
    svc = service_of(request)
    try:
        ejected = svc.router.report(master, ok, float(latency))
    except KeyError:
        raise ApiError(404, f"no master named {master!r}") from None
    if ejected:
        svc.on_ejected(master)
    return json_response({"master": master, "ejected": svc.router.is_ejected(master)})


async def set_strategy(request: web.Request) -> web.Response:
    require_token(request)
    name = (await read_json(request)).get("strategy")
    if name not in STRATEGIES:
        raise ApiError(400, f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
    svc = service_of(request)
    old = svc.router.strategy
    svc.set_strategy(name, actor="api")
    return json_response({"strategy": name, "previous": old})


async def balancing(request: web.Request) -> web.Response:
    svc = service_of(request)
    r = svc.router
    return json_response(
        {
            "strategy": r.strategy,
            "panic": r.panic,
            "distribution_quality": r.distribution_quality(),
            "weights": r.effective_weights(),
            "masters": {rt.name: r.master_info(rt.name) for rt in svc.fleet},
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/route", route)
    app.router.add_post("/api/v1/route/report", report)
    app.router.add_put("/api/v1/balancing/strategy", set_strategy)
    app.router.add_get("/api/v1/balancing", balancing)
