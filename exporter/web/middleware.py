"""The two rules every route obeys, enforced here rather than in each handler.

* Errors are JSON ``{"error": ...}``: the web layer's own refusals, aiohttp's (404, 405, 413),
  and the domain's exceptions, which carry no HTTP status; ``DOMAIN_STATUS`` is the one place
  that gives them one.
* Every mutating request needs the bearer token, so a route added later cannot forget it.
"""

from __future__ import annotations

import hmac
import logging
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
from exporter.routing.router import NoRoute
from exporter.store import StoreError
from exporter.web.jsonapi import ApiError, json_response
from exporter.web.keys import REJECTIONS, SERVICE

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MUTATING = frozenset({"POST", "PUT", "DELETE", "PATCH"})
UNAUTHORIZED = "missing or invalid bearer token"

#: Domain exception type -> HTTP status; the most specific class in an exception's MRO wins.
DOMAIN_STATUS: dict[type[Exception], int] = {
    UnknownMaster: 404,
    Conflict: 409,
    InvalidRequest: 400,
    Unavailable: 503,
    FailoverRejected: 409,
    NoRoute: 503,
    StoreError: 503,
}


def _domain_status(exc: Exception) -> int | None:
    for cls in type(exc).__mro__:
        if cls in DOMAIN_STATUS:
            return DOMAIN_STATUS[cls]
    return None


def _details(request: web.Request, exc: Exception) -> dict[str, Any]:
    """Extra fields for a domain error's body: a client told that no master can take a
    message also needs the strategy that decided so."""
    if isinstance(exc, NoRoute):
        return {"strategy": request.app[SERVICE].router.strategy}
    return {}


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
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
    except Exception as exc:
        status = _domain_status(exc)
        if status is None:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return json_response({"error": "internal error; see the exporter's log"}, 500)
        return json_response({"error": str(exc), **_details(request, exc)}, status)


def _authorized(request: web.Request) -> bool:
    svc = request.app[SERVICE]
    if svc.insecure_no_auth and not svc.token:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    expected = svc.token or ""
    return (
        scheme.lower() == "bearer"
        and bool(expected)
        and hmac.compare_digest(given.strip().encode(), expected.encode())
    )


@web.middleware
async def bearer_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """401 for a mutating request without the right token; reads and their HEAD/OPTIONS pass.
    The token is read per request because a reload may change it; it is never logged. The
    warning is throttled per method and route: anyone can send these."""
    if request.method in MUTATING and not _authorized(request):
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "(no route)"
        skipped = request.app[REJECTIONS].admit((request.method, route))
        if skipped is not None:
            log.warning(
                "rejected %s %s from %s: missing or wrong bearer token%s",
                request.method,
                request.path[:200],
                request.remote,
                f" ({skipped} more on this route since the last report)" if skipped else "",
            )
        raise ApiError(401, UNAUTHORIZED)
    return await handler(request)
