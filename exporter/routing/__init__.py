"""Routing: which masters may take traffic, at what weight, and which one takes the next
message (strategies, panic mode, slow start, outlier ejection, rebalancing)."""

from exporter.routing.router import Decision, NoRoute, Router

__all__ = ["Decision", "NoRoute", "Router"]
