"""Producer client: route each message to a master, deliver it there, report how it went, and
on failure try the next routing decision.

Example::

    from exporter.client import Client, DeliveryFailed

    async with Client(["http://exporter-1:9108", "http://exporter-2:9108"]) as client:
        try:
            result = await client.send({"id": "order-17", "total": 42}, key="customer-9")
        except DeliveryFailed as exc:
            ...  # every attempt failed: exc.attempts says where and why
        print(result["master"], result["attempts"])

Routing is local by default: the client fetches the exporter's routing table
(``GET /api/v1/routing-table``), keeps it current with a long-poll watch, and makes each decision
itself with the router's own strategy code (exporter.routing), so producers keep delivering on
their last table while no exporter answers. An exporter without the table is asked per message
(``GET /api/v1/route``), as is every exporter with ``local_routing=False``.

Delivery is at least once: after a timeout the first master may have taken the message even
though the client retried elsewhere. Masters dedupe by message ``id`` (master protocol), so
``send`` gives a message without one a fresh id before the first attempt and keeps it for every
retry. Reports feed the exporter's passive outlier detection and in-flight load; they are best
effort and never fail a send.

A failover to a master's last checkpoint loses what it acknowledged since, so the client keeps
what each master acknowledged (:class:`ReplayBuffer`) and after a failover re-sends to the new
holder what lies above the watermark it received (docs/protocol.md "Watermarks", client.md).
"""

from exporter.client.core import Client
from exporter.client.errors import (
    Attempt,
    ClientError,
    DeliveryFailed,
    ExporterUnreachable,
    RequestRejected,
    RouteUnavailable,
)
from exporter.client.replay import ReplayBuffer

__all__ = [
    "Attempt", "Client", "ClientError", "DeliveryFailed", "ExporterUnreachable", "ReplayBuffer",
    "RequestRejected", "RouteUnavailable",
]
