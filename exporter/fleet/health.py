"""Health state per master: a hysteresis state machine fed by probe results.

The machine is pure (no I/O, the caller passes the clock) so that it can be checked
property-based over random probe sequences, and cheap (``__slots__``) so that 10,000 masters
cost little memory. Every transition is returned to the caller, which logs and publishes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

log = logging.getLogger(__name__)


class State(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    FAILED = "failed"
    RECOVERING = "recovering"
    MAINTENANCE = "maintenance"


STATES: tuple[State, ...] = tuple(State)
SERVING = frozenset({State.HEALTHY, State.DEGRADED})


class Result(StrEnum):
    SUCCESS = "success"
    TIMEOUT = "timeout"
    CONNECT_ERROR = "connect_error"
    HTTP_ERROR = "http_error"
    INVALID_RESPONSE = "invalid_response"
    UNHEALTHY = "unhealthy"


RESULTS: tuple[Result, ...] = tuple(Result)


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change, as published to subscribers (failover, balancing, store)."""

    master: str
    old: State
    new: State
    reason: str
    at: float  # wall clock, seconds since the epoch


class HealthMachine:
    """Hysteresis: ``failure_threshold`` consecutive failures to fail, ``recovery_threshold``
    consecutive successes to heal; one failure while recovering sends it back to failed and
    counts a recovery attempt; past ``max_recovery_attempts`` it stays failed until reset."""

    __slots__ = (
        "consecutive_failures",
        "consecutive_successes",
        "failed_since",
        "failure_threshold",
        "max_recovery_attempts",
        "name",
        "needs_reset",
        "recovery_attempts",
        "recovery_threshold",
        "state",
    )

    def __init__(
        self,
        name: str,
        failure_threshold: int,
        recovery_threshold: int,
        max_recovery_attempts: int = 5,
        state: State = State.HEALTHY,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.recovery_threshold = recovery_threshold
        self.max_recovery_attempts = max_recovery_attempts
        self.state = state
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.recovery_attempts = 0
        self.failed_since: float | None = None
        self.needs_reset = False

    def observe(self, ok: bool, degraded: bool, reason: str, now: float) -> Transition | None:
        """Feed one probe result; return the transition it caused, if any."""
        if ok:
            self.consecutive_failures = 0
            self.consecutive_successes += 1
        else:
            self.consecutive_successes = 0
            self.consecutive_failures += 1
        state = self.state
        if state is State.MAINTENANCE:
            return None
        target = state
        if not ok:
            if state is State.RECOVERING:
                self.recovery_attempts += 1
                if self.recovery_attempts >= self.max_recovery_attempts:
                    self.needs_reset = True
                target = State.FAILED
            elif state in SERVING and self.consecutive_failures >= self.failure_threshold:
                target = State.FAILED
        elif state is State.FAILED:
            if not self.needs_reset:
                target = (
                    self._serving(degraded)
                    if self.consecutive_successes >= self.recovery_threshold
                    else State.RECOVERING
                )
        elif state is State.RECOVERING:
            if self.consecutive_successes >= self.recovery_threshold:
                target = self._serving(degraded)
        elif state is State.HEALTHY and degraded:
            target = State.DEGRADED
        elif state is State.DEGRADED and not degraded:
            target = State.HEALTHY
        return self._move(target, reason, now)

    def _serving(self, degraded: bool) -> State:
        return State.DEGRADED if degraded else State.HEALTHY

    def _move(self, target: State, reason: str, now: float) -> Transition | None:
        if target is self.state:
            return None
        old, self.state = self.state, target
        if target is State.FAILED and old is not State.RECOVERING:
            self.failed_since = now
        elif target in SERVING:
            self.failed_since = None
            self.recovery_attempts = 0
        return Transition(self.name, old, target, reason, now)

    def set_maintenance(self, on: bool, now: float) -> Transition | None:
        """Drain (on) or hand back to the probes (off: it must earn healthy again)."""
        if on:
            return self._move(State.MAINTENANCE, "maintenance requested", now)
        if self.state is not State.MAINTENANCE:
            return None
        self.consecutive_successes = 0
        return self._move(State.RECOVERING, "maintenance ended", now)

    def reset(self, now: float) -> Transition | None:
        """Manual reset: clear counters and the attempt limit; the probes decide from here."""
        self.needs_reset = False
        self.recovery_attempts = 0
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        if self.state in (State.FAILED, State.MAINTENANCE):
            return self._move(State.RECOVERING, "manual reset", now)
        return None

    def recovery_timed_out(self, now: float, recovery_timeout: float) -> bool:
        return self.failed_since is not None and now - self.failed_since > recovery_timeout


Subscriber = Callable[[Transition], Awaitable[None] | None]


class EventBus:
    """In-process publish/subscribe of transitions; a failing subscriber never stops the others."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def subscribe(self, fn: Subscriber) -> None:
        self._subscribers.append(fn)

    def publish(self, event: Transition) -> None:
        log.info(
            "master %s: %s -> %s (%s)",
            event.master,
            event.old,
            event.new,
            event.reason,
            extra={
                "master": event.master,
                "from": str(event.old),
                "to": str(event.new),
                "reason": event.reason,
                "event": "transition",
            },
        )
        for fn in self._subscribers:
            try:
                result = fn(event)
            except Exception:
                log.exception("subscriber %r failed on %s", fn, event)
                continue
            if asyncio.iscoroutine(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("subscriber failed", exc_info=task.exception())

    async def drain(self) -> None:
        """Wait for subscriber tasks still running (used on shutdown and in tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
