"""What the fleet says happened, and the in-process bus that carries it.

The bus is the only way probe findings, health transitions and duty moves reach routing and
failover, so every consumer sees the same facts in the same order. Consumers subscribe before
anything publishes (the service wires them first, then publishes what it restored).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from exporter.fleet.states import State

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Transition:
    """One health state change of one master."""

    master: str
    old: State
    new: State
    reason: str
    at: float  # wall clock, seconds since the epoch


@dataclass(frozen=True, slots=True)
class Sample:
    """One probe folded into a master's record: whether it answered well, its state after the
    probe, and the queue it reported (None: unknown)."""

    master: str
    ok: bool
    state: State
    queue_length: float | None


@dataclass(frozen=True, slots=True)
class RoleChanged:
    """A master's role, derived from who holds which duty, changed (failover, reload, restore)."""

    master: str
    old: str
    new: str


Event = Transition | Sample | RoleChanged
E = TypeVar("E", Transition, Sample, RoleChanged)
Handler = Callable[[Any], Awaitable[None] | None]


class EventBus:
    """Typed publish/subscribe. Synchronous handlers run inline, in subscription order;
    coroutine handlers run as tasks. A failing handler never stops the others."""

    def __init__(self) -> None:
        self._handlers: dict[type, list[Handler]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def subscribe(self, kind: type[E], fn: Callable[[E], Awaitable[None] | None]) -> None:
        self._handlers.setdefault(kind, []).append(fn)

    def publish(self, event: Event) -> None:
        for fn in self._handlers.get(type(event), ()):
            try:
                result = fn(event)
            except Exception:
                log.exception("%s handler %r failed", type(event).__name__, fn)
                continue
            if asyncio.iscoroutine(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event handler failed", exc_info=task.exception())

    async def drain(self) -> None:
        """Wait for handler tasks still running (shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def log_transition(t: Transition) -> None:
    """Every health transition, logged once, structured."""
    log.info(
        "master %s: %s -> %s (%s)", t.master, t.old, t.new, t.reason,
        extra={"master": t.master, "from": str(t.old), "to": str(t.new), "reason": t.reason,
               "event": "transition"},
    )
