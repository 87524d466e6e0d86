"""Undo calls: rollback of a candidate, un-fencing, make-before-break release, fencing.

Each call is bounded; one that does not land is queued in the store (``cleanup``) and retried by
``retry_queued``, re-checked against the assignments of that time, so a late undo never
deactivates a duty that has legitimately moved since. Undo work runs outside every deadline
scope: once started it completes, quickly when the move is late (1 s per call at most).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from exporter.config import FailoverConfig
from exporter.failover.duties import DutyTable
from exporter.failover.moves import Move
from exporter.failover.protocol import MasterCallError, MasterClient, StaleEpoch
from exporter.failover.steps import Steps
from exporter.fleet import Fleet, MasterRuntime
from exporter.store.sqlite import Store

log = logging.getLogger(__name__)

LATE_TIMEOUT = 1.0  # per undo call once the move is late, and for background retries
NORMAL_TIMEOUT = 30.0


class Undoer:
    """Runs undo calls for moves and queued retries; ``hurry`` makes every call short
    (set when the exporter stops)."""

    def __init__(self, client: MasterClient, store: Store, fleet: Fleet, duties: DutyTable,
                 steps: Steps, settings: Callable[[], FailoverConfig]) -> None:
        self.client = client
        self.store = store
        self.fleet = fleet
        self.duties = duties
        self.steps = steps
        self.settings = settings
        self.hurry = False

    def timeout(self, move: Move | None) -> float:
        """The step timeout, but at most 1 s for a late move, while stopping, and outside a
        move (retries run on the periodic loop and must not stall it)."""
        late = self.hurry or move is None or move.late
        return min(self.settings().step_timeout, LATE_TIMEOUT if late else NORMAL_TIMEOUT)

    async def undo(self, rt: MasterRuntime, action: str, arg: str | None, errors: list[str],
                   move: Move | None = None, failover_id: int = 0) -> None:
        """One undo call; queued if it fails. After one timeout or connection failure in a
        move, further calls to that master are queued without waiting again."""
        fid = move.id if move is not None else failover_id
        if move is not None and rt.name in move.unresponsive:
            errors.append(f"{rt.name} unresponsive: {action} queued")
            self.store.add_cleanup(rt.name, action, arg, fid, errors[-1])
            return
        url, timeout = rt.config.url, self.timeout(move)
        try:
            if action == "fence":
                await self.client.deactivate(rt.name, url, None, timeout=timeout)
            elif action == "release":
                await self.client.deactivate(rt.name, url, arg, timeout=timeout)
            elif action == "drop_import":
                await self.client.drop_import(rt.name, url, str(arg), timeout=timeout)
            elif action == "unfence":
                for duty in self.duties.duties_of(rt.name):
                    await self.client.activate(rt.name, url, None if duty == rt.name else duty,
                                               timeout=timeout)
        except StaleEpoch as exc:
            # another controller is in charge of this master: a retry could never land
            errors.append(exc.reason)
            log.warning("%s on %s not queued: %s", action, rt.name, exc.reason,
                        extra={"event": "failover_undo_stale", "master": rt.name})
        except MasterCallError as exc:
            errors.append(exc.reason)
            self.store.add_cleanup(rt.name, action, arg, fid, exc.reason)
            if move is not None and exc.status is None:  # timeout or no connection
                move.unresponsive.add(rt.name)

    async def rollback(self, move: Move, cand: MasterRuntime, dropped: bool,
                       had: list[str]) -> None:
        """Undo a candidate's steps in reverse: its activations (a candidate that held nothing
        before is fenced back to an inactive standby), then its import."""
        started = self.steps.begin(move, "rollback", cand.name)
        errors: list[str] = []
        if not had:
            await self.undo(cand, "fence", None, errors, move)
        else:
            for duty in reversed(move.duties):
                await self.undo(cand, "release", duty, errors, move)
        if dropped:
            await self.undo(cand, "drop_import", move.source, errors, move)
        self.store.journal(move.id, "rollback", "done", cand.name, {"errors": errors})
        self.steps.done(move, "rollback", started, "error" if errors else "ok",
                        {"errors": errors} if errors else {}, cand.name)

    async def unfence(self, move: Move, src: MasterRuntime) -> None:
        """Nobody took over: hand the fenced master its duties back (status quo ante)."""
        if not move.fenced:
            return
        started = time.perf_counter()
        errors: list[str] = []
        await self.undo(src, "unfence", None, errors, move)
        self.steps.done(move, "unfence", started, "error" if errors else "ok",
                        {"errors": errors} if errors else {}, None)

    async def release(self, move: Move, src: MasterRuntime) -> None:
        """Make-before-break: the old holder lets go only now that the new one is active; if
        it holds nothing any more it is fenced to an inactive standby."""
        started = self.steps.begin(move, "release", move.source)
        errors: list[str] = []
        for duty in move.duties:
            if duty != src.name:
                await self.undo(src, "release", duty, errors, move)
                await self.undo(src, "drop_import", duty, errors, move)
        if not self.duties.duties_of(src.name):
            await self.undo(src, "fence", None, errors, move)
        self.steps.done(move, "release", started, "error" if errors else "ok",
                        {"errors": errors} if errors else {"master": src.name})

    async def fence_returning(self, rt: MasterRuntime, holder: str | None) -> None:
        """Fence a master that serves as active while ``holder`` has its duty: two active
        masters for one duty is the split brain failover exists to prevent."""
        await self.undo(rt, "fence", None, [])
        self.store.audit("exporter", "fence_returning", rt.name, {"holder": holder})
        log.warning("master %s came back active while %s holds its duty: fenced", rt.name,
                    holder, extra={"event": "failover_fence_returning", "master": rt.name,
                                   "holder": holder})

    async def retry_queued(self, only: str | None = None) -> None:
        """Retry queued undo calls (of master ``only``, or all) that are still needed."""
        for item in self.store.cleanups():
            rt = self.fleet.get(item["master"])
            if rt is None:
                self.store.cleanup_done(item["id"])
                continue
            name, action, arg = rt.name, item["action"], item["arg"]
            if only is not None and name != only:
                continue
            needed = self._still_needed(name, action, arg)
            if needed:
                errors: list[str] = []
                await self.undo(rt, action, arg, errors, failover_id=int(item["failover_id"] or 0))
                if errors:
                    continue  # ``undo`` queued it again: the same row, its error updated
            self.store.cleanup_done(item["id"])
            log.info("queued %s on %s %s", action, name, "done" if needed else "obsolete",
                     extra={"event": "failover_cleanup", "master": name, "action": action})

    def _still_needed(self, name: str, action: str, arg: str | None) -> bool:
        """Whether a queued undo still matches the assignments: a fence only while the master
        holds nothing, a release or drop only while another master holds that duty."""
        if action == "fence":
            return not self.duties.duties_of(name)
        if action in ("release", "drop_import"):
            return arg is not None and self.duties.holder_of(arg) != name
        if action == "unfence":
            return bool(self.duties.duties_of(name))
        return False
