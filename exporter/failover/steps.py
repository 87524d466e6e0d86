"""Step plumbing of a move: journal before, bound while running, time and log after.

The journal entry is committed before the step runs so that crash recovery knows what may have
happened; while the state file fails, the entry waits in the store's memory and the step runs
anyway (a failing disk never stops a move). A forward step is bounded twice: by the step
timeout (a step failure: the candidate is rolled back, the next one tried) and by the move's
deadline (an interruption: the whole move is rolled back). Both are ``asyncio.timeout`` scopes;
shutdown expires the deadline scope early (``Move.interrupt``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from exporter.config import FailoverConfig
from exporter.failover.hooks import HookError
from exporter.failover.moves import Interrupted, Move, StepFailed
from exporter.failover.protocol import MasterCallError
from exporter.store.sqlite import Store

log = logging.getLogger(__name__)

T = TypeVar("T")
StepCall = Callable[[float], Awaitable[T]]  # called with its timeout in seconds
SLACK = 0.5  # a call that overruns its own timeout is abandoned this much later


class Steps:
    """Runs and records the steps of moves; ``settings`` gives the live failover config."""

    def __init__(self, store: Store, settings: Callable[[], FailoverConfig]) -> None:
        self.store = store
        self.settings = settings

    def begin(self, move: Move, step: str, backup: str | None = None,
              detail: dict[str, Any] | None = None) -> float:
        """Journal ``step`` (write-ahead); returns its start for ``done``."""
        self.store.journal(move.id, step, "begin", backup, detail)
        return time.perf_counter()

    def done(self, move: Move, step: str, started: float, status: str = "ok",
             detail: dict[str, Any] | None = None, backup: str | None = None) -> None:
        """Append the step to the move's record and log it."""
        took = time.perf_counter() - started
        move.steps.append({"step": step, "status": status, "backup": backup,
                           "duration": round(took, 6), "detail": detail or {}})
        error = {"error": detail["error"]} if detail and "error" in detail else {}
        log.log(logging.INFO if status == "ok" else logging.WARNING,
                "%s #%d of %s: step %s %s in %.1f ms%s", move.kind, move.id, move.master, step,
                status, took * 1000, f" (backup {backup})" if backup else "",
                extra={"event": "failover_step", "failover_id": move.id, "master": move.master,
                       "step": step, "status": status, "backup": backup,
                       "duration_seconds": round(took, 6), **error})

    @asynccontextmanager
    async def deadline(self, move: Move, overdue: str | None = None) -> AsyncIterator[None]:
        """Bound the body by the move's deadline; raise Interrupted when it passes or the move
        is interrupted (``overdue`` names what was waited for)."""
        why = overdue or f"deadline of {self.settings().deadline:g}s exceeded"
        if move.stop_reason is not None:
            raise Interrupted(move.stop_reason)
        left = move.deadline - time.monotonic()
        if left <= 0:
            raise Interrupted(why)
        scope = asyncio.timeout(left)
        move.scope = scope
        try:
            async with scope:
                yield
        except TimeoutError:
            if not scope.expired():
                raise
            raise Interrupted(move.stop_reason or why) from None
        finally:
            move.scope = None

    async def call(self, move: Move, call: StepCall[T], timeout: float | None = None) -> T:
        """``call(timeout)`` bounded by the step timeout and the move's deadline."""
        limit = timeout or self.settings().step_timeout
        async with self.deadline(move):
            out = await _guarded(call, limit)
        return out

    async def run(self, move: Move, step: str, backup: str | None, call: StepCall[T],
                  timeout: float | None = None, detail: dict[str, Any] | None = None) -> T:
        """One journalled, timed forward step; a failed call becomes StepFailed."""
        started = self.begin(move, step, backup, detail)
        try:
            out = await self.call(move, call, timeout)
        except (MasterCallError, HookError) as exc:
            reason = exc.reason if isinstance(exc, MasterCallError) else str(exc)
            self.done(move, step, started, "error", {**(detail or {}), "error": reason}, backup)
            raise StepFailed(step, reason) from None
        except Interrupted as exc:
            self.done(move, step, started, "error", {**(detail or {}), "error": str(exc)},
                      backup)
            raise
        self.done(move, step, started, detail=detail, backup=backup)
        return out


async def _guarded(call: StepCall[T], limit: float) -> T:
    """Protocol calls enforce ``limit`` themselves; this catches one that does not."""
    guard = asyncio.timeout(limit + SLACK)
    try:
        async with guard:
            out = await call(limit)
    except TimeoutError:
        if not guard.expired():
            raise
        raise MasterCallError("?", "step", f"timeout after {limit:g}s", kind="timeout") from None
    return out
