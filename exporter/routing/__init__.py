"""Routing: which masters may take traffic, at what weight, and which one takes the next
message (strategies, panic mode, slow start, outlier ejection, rebalancing), and the routing
table that lets producers make the same decisions themselves."""

from exporter.routing.local import TableRouter
from exporter.routing.router import Decision, NoRoute, Router
from exporter.routing.table import RoutingTable, TableFeed, TooManyWaiters

__all__ = ["Decision", "NoRoute", "Router", "RoutingTable", "TableFeed", "TableRouter",
           "TooManyWaiters"]
