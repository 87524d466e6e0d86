"""Cluster mode over HTTP: the cluster's state, and operator actions sent to the leader.

A mutating call that acts on the fleet (failover, pause, maintenance, reset, strategy) made to
a follower is answered ``307 Temporary Redirect`` to the same path on the leader (a 307 keeps
the method and body). Clients drop credentials on a redirect to another host or port, so the
caller sends the request again to ``Location`` with its token (``curl --location-trusted``).
The follower holds no connection open on the client's behalf, and the answer comes from the
replica that acted. Per-replica calls (``/-/reload``, ``/api/v1/route/report``) are never
redirected.
"""

from __future__ import annotations

from aiohttp import web

from exporter.web.jsonapi import json_response
from exporter.web.keys import SERVICE
from exporter.web.middleware import MUTATING, Handler

LOCAL_PATHS = frozenset({"/-/reload", "/api/v1/route/report"})


async def cluster(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    node = svc.cluster
    if node is None:  # a single node: it leads itself, on its persisted epoch
        return json_response({"mode": "single", "member": None, "leading": True,
                              "leader": None, "epoch": svc.store.epoch(), "members": []})
    return json_response(node.status())


@web.middleware
async def to_leader(request: web.Request, handler: Handler) -> web.StreamResponse:
    node = request.app[SERVICE].cluster
    if (node is None or request.method not in MUTATING or request.path in LOCAL_PATHS
            or not request.path.startswith("/api/")):
        return await handler(request)
    why = node.not_leading()
    if why is None:
        return await handler(request)
    leader = node.leader_url()
    if leader is None or node.leader is None or node.leader.member == node.member:
        return json_response({"error": f"no cluster leader can act now: {why}"}, 503,
                             headers={"Retry-After": "1"})
    location = leader.rstrip("/") + request.path_qs
    return json_response({"error": f"{why}; send it to the leader", "leader": leader},
                         307, headers={"Location": location})


ROUTES: list[web.RouteDef] = [web.get("/api/v1/cluster", cluster)]
