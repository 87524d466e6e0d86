"""HTTP surface: /metrics, health and readiness, the JSON API and the status page.

The one place that puts the areas together: each area module declares its routes, the
middlewares enforce JSON errors and the bearer token on every mutating request, and every
response carries the security headers (exporter.web.headers).
"""

from __future__ import annotations

from aiohttp import web

from exporter.logs import Throttle
from exporter.service import Service
from exporter.web import cluster, core, failover, routing, statuspage
from exporter.web.headers import on_response_prepare
from exporter.web.keys import REJECTIONS, SERVICE
from exporter.web.middleware import bearer_token, errors_as_json

ROUTES: list[web.RouteDef] = [*core.ROUTES, *statuspage.ROUTES, *routing.ROUTES,
                              *failover.ROUTES, *cluster.ROUTES]


def create_app(service: Service) -> web.Application:
    """The application serving ``service``. Errors wrap auth so a 401 is JSON like the rest."""
    app = web.Application(
        middlewares=[errors_as_json, bearer_token, cluster.to_leader],
        client_max_size=service.config.api.max_body_bytes,
    )
    app[SERVICE] = service
    app[REJECTIONS] = Throttle()
    app.on_response_prepare.append(on_response_prepare)
    app.add_routes(ROUTES)
    return app
