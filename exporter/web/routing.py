"""Routing API: where should this message go, how did it go, which strategy, and the routing
table producers route from on their own.

Producers fetch and watch GET /api/v1/routing-table and route locally (see exporter.client);
GET /api/v1/route answers one decision for clients that prefer to ask per message. Outcome
reports feed passive outlier detection. Reports and strategy changes alter routing, so both are
mutating requests and need the token (enforced by the auth middleware).

The table watch is a long poll: ``?wait=30s&version=N`` answers at once when the current version
is not N, else when it changes, else 304 (no body) once ``wait`` passes. ``version=N`` without
``wait`` is a conditional read (304 when unchanged), like ``If-None-Match`` with the ETag.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from aiohttp import web
from pydantic import Field, field_validator

from exporter.config import STRATEGIES, parse_duration
from exporter.routing.router import Decision
from exporter.routing.table import Snapshot, TooManyWaiters
from exporter.web.jsonapi import ApiError, Body, json_response, read_body
from exporter.web.keys import SERVICE

#: Longest latency a report may carry; anything longer is a client's bug, not a measurement.
MAX_REPORTED_LATENCY = 3600.0
#: Longest a table watch may wait: it bounds how long a watch holds a connection, and how late
#: a watching client notices an exporter that went silent.
MAX_WAIT = 60.0
_SECONDS = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")
_VERSION = re.compile(r"[0-9]{1,19}")


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


def _wait_param(raw: str) -> float:
    """Seconds from a Prometheus-style duration ("30s", "500ms") or plain seconds ("30")."""
    try:
        seconds = float(raw) if _SECONDS.fullmatch(raw) else parse_duration(raw)
    except ValueError as exc:
        raise ApiError(400, f"wait: {exc}") from None
    if seconds > MAX_WAIT:
        raise ApiError(400, f"wait: at most {MAX_WAIT:g}s")
    return seconds


def _version_param(raw: str) -> int:
    version = int(raw) if _VERSION.fullmatch(raw) else -1
    if not 0 <= version < 2**63:
        raise ApiError(400, "version: must be a whole number between 0 and 2^63-1")
    return version


def _table_response(snap: Snapshot | None, etag: str) -> web.Response:
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if snap is None:
        return web.Response(status=304, headers=headers)
    return web.Response(body=snap.body, content_type="application/json", charset="utf-8",
                        headers=headers)


async def routing_table(request: web.Request) -> web.Response:
    """The routing table (exporter.routing.table); a watch when ``version`` is given."""
    query = request.query
    feed = request.app[SERVICE].router.table
    raw_wait, raw_version = query.get("wait"), query.get("version")
    if raw_wait is not None and raw_version is None:
        raise ApiError(400, "version: required with wait (the version the caller holds)")
    wait = _wait_param(raw_wait) if raw_wait is not None else 0.0
    if raw_version is not None:
        held = _version_param(raw_version)
        try:
            snap = await feed.wait(held, wait)
        except TooManyWaiters as exc:
            raise ApiError(503, f"too many table watchers ({exc}); retry later") from None
        return _table_response(snap, snap.etag if snap else f'"{held}"')
    snap = feed.current()
    if request.headers.get("If-None-Match", "").strip() == snap.etag:
        return _table_response(None, snap.etag)
    return _table_response(snap, snap.etag)


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
    web.get("/api/v1/routing-table", routing_table),
    web.post("/api/v1/route/report", report),
    web.put("/api/v1/balancing/strategy", set_strategy),
    web.get("/api/v1/balancing", balancing),
]
