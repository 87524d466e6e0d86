"""Notifications of finished moves: the post-hook and Alertmanager.

Off the move's critical path: a slow or failing receiver never delays a failover, changes its
result or blocks the next one. Deliveries still running at shutdown get a bounded flush.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from exporter.config import AlertmanagerConfig, Config, HookConfig
from exporter.failover import hooks
from exporter.failover.moves import EXECUTED
from exporter.failover.records import FailoverRecord
from exporter.store.sqlite import Store

log = logging.getLogger(__name__)


class Notifier:
    """Delivers the records of moves that ran to the configured receivers, in background
    tasks; ``config`` gives the live configuration."""

    def __init__(self, session: aiohttp.ClientSession, store: Store,
                 config: Callable[[], Config]) -> None:
        self.session = session
        self.store = store
        self.config = config
        self._tasks: set[asyncio.Task[None]] = set()

    def notify(self, record: FailoverRecord) -> None:
        cfg = self.config()
        hook, am = cfg.failover.post_hook, cfg.alertmanager
        if record["result"] not in EXECUTED or (hook is None and am is None):
            return
        task = asyncio.create_task(self._deliver(record, hook, am))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for deliveries under way."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def _deliver(self, record: FailoverRecord, hook: HookConfig | None,
                       am: AlertmanagerConfig | None) -> None:
        if hook is not None:
            eligible = [c["name"] for c in record["candidates"] if c.get("eligible")]
            ctx: dict[str, Any] = {**record, "phase": "post", "candidates": eligible}
            try:
                await hooks.call_hook(self.session, hook, ctx, "post")
            except hooks.HookError as exc:
                log.warning("post-failover hook failed: %s", exc,
                            extra={"event": "failover_hook", "phase": "post", "ok": False})
                self.store.audit("exporter", "post_hook_failed", record["master"],
                                 {"failover_id": record["id"], "error": str(exc)})
        if am is not None:
            await hooks.post_alert(self.session, am, record)
