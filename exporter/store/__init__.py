"""Durable facts of one exporter: audit, failover history and journal, assignments, flags."""

from exporter.store.sqlite import Store, StoreError

__all__ = ["Store", "StoreError"]
