"""Routing API: where should this message go, how did it go, which strategy.

Producers call GET /api/v1/route per message (see exporter.client); outcome reports feed
passive outlier detection. Reports and strategy changes alter routing, so both are mutating
requests and need the token (enforced by the auth middleware).
"""

from __future__ import annotations

import json
from functools import lru_cache

from aiohttp import web
from pydantic import Field, field_validator

from exporter.config import STRATEGIES
from exporter.routing.router import Decision
from exporter.web.jsonapi import ApiError, Body, json_response, read_body
from exporter.web.keys import SERVICE

#: Longest latency a report may carry; anything longer is a client's bug, not a measurement.
MAX_REPORTED_LATENCY = 3600.0


class Report(Body):
    master: str = Field(min_length=1, max_length=256)
    ok: bool
    latency_seconds: float = Field(
        default=0.0, ge=0, le=MAX_REPORTED_LATENCY, allow_inf_nan=False
    )


class StrategyChange(Body):
    strategy: str

    @field_validator("strategy")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
        return name


@lru_cache(maxsize=4096)
def _decision_body(d: Decision) -> bytes:
    """The encoded answer for a decision, made once: decisions are a few immutable values per
    master, and encoding per request (json_response) was over half of this hot handler's time."""
    return json.dumps({"master": d.master, "url": d.url, "strategy": d.strategy}).encode()


async def route(request: web.Request) -> web.Response:
    """NoRoute (nobody can serve) is answered 503 by the error middleware."""
    query = request.query
    try:
        d = request.app[SERVICE].router.route(query.get("key") or None,
                                              query.get("region") or None)
    except ValueError as exc:  # the router's word for a region nobody serves
        raise ApiError(400, str(exc)) from None
    return web.Response(body=_decision_body(d), content_type="application/json", charset="utf-8")


async def report(request: web.Request) -> web.Response:
    body = await read_body(request, Report)
    svc = request.app[SERVICE]
    try:
        ejected = svc.router.report(body.master, body.ok, body.latency_seconds)
    except KeyError:  # the router's word for a master it does not know
        raise ApiError(404, f"no master named {body.master!r}") from None
    if ejected:
        svc.on_ejected(body.master)
    return json_response({"master": body.master, "ejected": svc.router.is_ejected(body.master)})


async def set_strategy(request: web.Request) -> web.Response:
    body = await read_body(request, StrategyChange)
    svc = request.app[SERVICE]
    old = svc.router.strategy
    svc.set_strategy(body.strategy, actor="api")
    return json_response({"strategy": body.strategy, "previous": old})


async def balancing(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
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


ROUTES: list[web.RouteDef] = [
    web.get("/api/v1/route", route),
    web.post("/api/v1/route/report", report),
    web.put("/api/v1/balancing/strategy", set_strategy),
    web.get("/api/v1/balancing", balancing),
]
