"""Notifications of finished moves: the post-hook and Alertmanager.

Off the move's critical path: a slow or failing receiver never delays a failover, changes its
result or blocks the next one. Failures are counted by kind (``failures``) and logged when their
reason starts or changes, not once per move: a receiver down for an hour of flapping must not
flood the log. Deliveries still running at shutdown get a bounded flush.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from types import MappingProxyType
from typing import Any

import aiohttp

from exporter.config import AlertmanagerConfig, Config, HookConfig
from exporter.failover import hooks
from exporter.failover.moves import EXECUTED
from exporter.failover.records import FailoverRecord
from exporter.store.sqlite import Store

log = logging.getLogger(__name__)

POST_HOOK, ALERTMANAGER = "post_hook", "alertmanager"  # the kinds of ``failures``


class Notifier:
    """Delivers the records of moves that ran to the configured receivers, in background
    tasks; ``config`` gives the live configuration."""

    def __init__(self, session: aiohttp.ClientSession, store: Store,
                 config: Callable[[], Config]) -> None:
        self.session = session
        self.store = store
        self.config = config
        self._tasks: set[asyncio.Task[None]] = set()
        self._failures: dict[str, int] = {}
        self.failures: Mapping[str, int] = MappingProxyType(self._failures)
        self._reasons: dict[str, str] = {}  # the last reason logged, by kind

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
            if await self._attempt(POST_HOOK, hooks.call_hook(self.session, hook, ctx, "post")):
                self.store.audit("exporter", "post_hook_failed", record["master"], {
                    "failover_id": record["id"], "error": self._reasons[POST_HOOK]})
        if am is not None:
            await self._attempt(ALERTMANAGER, hooks.send_alert(self.session, am, record))

    async def _attempt(self, kind: str, delivery: Coroutine[Any, Any, None]) -> bool:
        """Await ``delivery``; True when it failed (counted, and logged if the reason is
        new). Never raises: a notification must not end in an unretrieved task error."""
        try:
            await delivery
        except Exception as exc:
            reason = str(exc) if isinstance(exc, hooks.HookError) else repr(exc)
            self._failures[kind] = self._failures.get(kind, 0) + 1
            if self._reasons.get(kind) != reason:
                log.warning("%s delivery failed: %s (logged again only when the reason "
                            "changes)", kind, reason,
                            extra={"event": "failover_notify", "kind": kind, "ok": False})
            self._reasons[kind] = reason
            return True
        if self._reasons.pop(kind, None) is not None:
            log.info("%s deliveries work again", kind,
                     extra={"event": "failover_notify", "kind": kind, "ok": True})
        return False
