"""The move engine: hand a list of duties from one master to another, once.

A *move* hands the duties a master holds (its own, plus any it had taken over) to another
master. Three kinds share the steps:

* ``failover``   — the master failed: fence it (best effort), fetch its state (live, else the
  last checkpoint young enough), import into a backup, verify, activate, commit routing; with
  no state left it is refused while ``failover.require_state`` holds (``policy.judge_state``);
* ``switchover`` — graceful: the old master is released only after the new one is active (make
  before break), and its state is fetched live;
* ``failback``   — a recovered master takes its own duty back from the backup that holds it.

Every step is journalled before it runs (``Steps``); a failing step rolls the candidate back
(``Undoer``) and the next candidate is tried. A move interrupted by its deadline or by shutdown
is undone and recorded ``rolled_back`` (``Ledger``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import aiohttp

from exporter.config import FailoverConfig
from exporter.failover import hooks
from exporter.failover.duties import DutyTable
from exporter.failover.errors import Conflict
from exporter.failover.ledger import Ledger
from exporter.failover.moves import Interrupted, Move, MoveRequest, RoutingCallback, StepFailed
from exporter.failover.policy import StateVerdict, judge_state
from exporter.failover.protocol import MasterCallError, MasterClient, Snapshot, parse_snapshot_async
from exporter.failover.records import FailoverRecord, HookContext
from exporter.failover.selection import Ranking, rank
from exporter.failover.stats import FailoverStats, StateSource
from exporter.failover.steps import Steps
from exporter.failover.undo import Undoer
from exporter.fleet import Fleet, MasterRuntime
from exporter.store.sqlite import Store

log = logging.getLogger(__name__)


class MoveEngine:
    """Runs moves: one task per master, at most ``max_concurrent`` fleet-wide. Whether a move
    may start is the caller's decision; the engine only refuses an ineligible backup."""

    def __init__(self, fleet: Fleet, duties: DutyTable, store: Store, client: MasterClient,
                 session: aiohttp.ClientSession, steps: Steps, undo: Undoer, ledger: Ledger,
                 stats: FailoverStats, settings: Callable[[], FailoverConfig],
                 on_routing_change: RoutingCallback | None = None) -> None:
        self.fleet = fleet
        self.duties = duties
        self.store = store
        self.client = client
        self.session = session
        self.steps = steps
        self.undo = undo
        self.ledger = ledger
        self.stats = stats
        self.settings = settings
        self.on_routing_change = on_routing_change
        self.busy: dict[str, str] = {}  # candidate -> what it is taking over
        self._tasks: dict[str, asyncio.Task[FailoverRecord]] = {}  # by master moved
        self._moves: dict[int, Move] = {}
        self._running = 0
        self._slot_free = asyncio.Condition()

    # --- what is running ---------------------------------------------------------------------
    def running(self) -> list[str]:
        """Masters whose duties are being moved now."""
        return sorted(self._tasks)

    def is_running(self, master: str) -> bool:
        return master in self._tasks

    def involved(self) -> set[str]:
        """Masters a move is using now: moved away from, or taking over."""
        return set(self._tasks) | set(self.busy)

    def moving_duties(self) -> set[str]:
        """Duties a move in flight is handing over."""
        return {duty for move in self._moves.values() for duty in move.duties}

    def tasks(self) -> list[asyncio.Task[FailoverRecord]]:
        return list(self._tasks.values())

    def interrupt_all(self, reason: str) -> None:
        for move in list(self._moves.values()):
            move.interrupt(reason)

    def launch(self, req: MoveRequest, started: float,
               allow_state_loss: bool = False) -> asyncio.Task[FailoverRecord]:
        """Start ``req`` as a task, registered until it ends."""
        task = asyncio.create_task(self.execute(req, started, allow_state_loss),
                                   name=f"{req.kind}-{req.master}")
        self._tasks[req.master] = task

        def forget(done: asyncio.Task[FailoverRecord]) -> None:
            if self._tasks.get(req.master) is done:
                del self._tasks[req.master]

        task.add_done_callback(forget)
        return task

    # --- selection ---------------------------------------------------------------------------
    def rank(self, master: str, to: str | None, exclude: tuple[str, ...] = ()) -> Ranking:
        """Backups for ``master``; with ``to``, only that one, or Conflict naming why not."""
        rt = self.fleet.get(master)
        assert rt is not None
        busy = dict(self.busy)
        for name in self._tasks:
            busy.setdefault(name, "being failed away from")
        for name in exclude:
            busy.setdefault(name, "source of this move")
        ranking = rank(rt, self.fleet, self.duties.role_of, busy=busy,
                       allowed_regions=rt.config.failover_regions or None)
        if to is not None:
            entry = next((c for c in ranking.candidates if c["name"] == to), None)
            if entry is None or not entry["eligible"]:
                why = entry["reason"] if entry else "unknown"
                raise Conflict(f"requested backup {to!r} is not eligible: {why}")
            for c in ranking.candidates:
                if c["name"] != to and c["eligible"]:
                    c["reason"] = f"operator asked for {to}"
            entry["reason"] = "requested by the operator"
            ranking.order = [r for r in ranking.order if r.name == to]
        return ranking

    # --- one move ----------------------------------------------------------------------------
    async def execute(self, req: MoveRequest, started: float,
                      allow_state_loss: bool = False) -> FailoverRecord:
        """Run the move and close its record; an unexpected error closes it as failed.
        ``allow_state_loss``: an operator lets a failover go on without state."""
        fid = self.store.begin_failover(req.master, req.trigger, req.reason, started, req.kind)
        move = Move(fid, req.kind, req.master, req.source, list(req.duties), req.trigger,
                    req.reason, req.actor, started, time.monotonic() + self.settings().deadline)
        self._moves[fid] = move
        self.stats.in_progress += 1
        self.store.journal(fid, "plan", "begin", detail={
            "kind": req.kind, "source": req.source, "duties": move.duties, "to": req.to})
        log.warning("%s of %s started (%s)", req.kind, req.master, req.reason,
                    extra={"event": "failover_start", "master": req.master, "failover_id": fid,
                           "kind": req.kind, "trigger": req.trigger})
        result, why = "failed", ""
        try:
            async with self._slot(move):
                result, why = await self._run(move, req.to, allow_state_loss)
        except Interrupted as exc:
            result, why = "rolled_back", str(exc)
        except StepFailed as exc:
            result, why = "failed", str(exc)
        except Exception as exc:  # a bug must still close the record
            log.exception("%s of %s crashed", req.kind, req.master)
            result, why = "failed", f"internal error: {exc!r}"
        finally:
            self.stats.in_progress -= 1
            self._moves.pop(fid, None)
        return self.ledger.finish(move, result, why)

    @asynccontextmanager
    async def _slot(self, move: Move) -> AsyncIterator[None]:
        """At most failover.max_concurrent moves fleet-wide; waiting counts against the
        move's deadline."""
        async with self._slot_free:
            async with self.steps.deadline(move, "deadline exceeded waiting for a failover slot"):
                await self._slot_free.wait_for(
                    lambda: self._running < self.settings().max_concurrent)
            self._running += 1
        try:
            yield
        finally:
            async with self._slot_free:
                self._running -= 1
                self._slot_free.notify_all()

    async def _run(self, move: Move, to: str | None, allow_state_loss: bool) -> tuple[str, str]:
        fo = self.settings()
        order = self._select(move, to, fo.max_candidates)
        if not order:
            return "failed", f"no eligible backup ({_why_none(move.ranking)})"
        if fo.pre_hook is not None:  # a veto before anything is changed
            hook, ctx = fo.pre_hook, pre_hook_context(move, order[0].name)
            try:
                await self.steps.run(move, "pre_hook", None, lambda _t: hooks.call_hook(
                    self.session, hook, ctx, "pre"), timeout=hook.timeout)
            except StepFailed as exc:
                return "failed", f"aborted by pre-hook: {exc.reason}"
        src = self.fleet.get(move.source)
        assert src is not None
        winner = None
        try:
            if move.kind == "failover":
                await self._fence(move, src)
            snapshot, verdict = await self._fetch(move, src, allow_state_loss)
            if verdict.refused_by is not None:
                await self.undo.unfence(move, src)
                self._refused(move, verdict)
                return "failed", verdict.note
            for cand in order:
                if await self._try_candidate(move, cand, snapshot):
                    winner = cand
                    break
        except (Interrupted, asyncio.CancelledError) as exc:
            await self.undo.unfence(move, src)
            raise Interrupted(str(exc) or "cancelled") from None
        if winner is None:
            await self.undo.unfence(move, src)
            return "failed", f"every candidate failed ({len(order)} tried)"
        if move.kind != "failover":
            await self.undo.release(move, src)
        elif verdict.source == "none":
            self._state_lost(move, winner.name, verdict, allow_state_loss)
        return "success", f"{move.master} -> {winner.name}; {verdict.note}"

    def _select(self, move: Move, to: str | None, limit: int) -> list[MasterRuntime]:
        started = self.steps.begin(move, "select")
        if move.kind == "failback":
            owner = self.fleet.get(move.master)
            assert owner is not None
            ranking = Ranking(order=[owner], candidates=[
                {"name": move.master, "eligible": True, "rank": 1,
                 "reason": "failback to the duty's owner"}])
        else:
            ranking = self.rank(move.master, to, (move.source,))
        move.ranking = ranking
        order = ranking.order[:limit]
        for extra in ranking.order[limit:]:
            ranking.note(extra.name, f"not tried: failover.max_candidates={limit}")
        self.steps.done(move, "select", started, detail={"order": [r.name for r in order]})
        return order

    async def _fence(self, move: Move, src: MasterRuntime) -> None:
        """Best effort: a dead master cannot be fenced now, so the fence is queued and lands
        when it comes back, unless by then it holds duties again (the move failed)."""
        move.fenced = True  # attempted: a timed-out fence may still have landed
        try:
            await self.steps.run(move, "fence", None, partial(
                self.client.deactivate, move.source, src.config.url, None))
        except StepFailed as exc:
            self.store.add_cleanup(move.source, "fence", None, move.id, exc.reason)

    async def _fetch(self, move: Move, src: MasterRuntime,
                     allow_state_loss: bool) -> tuple[Snapshot | None, StateVerdict]:
        """The source's state, live; a failover falls back to the last checkpoint, and whether
        it may go on with what was found is judged here (``judge_state``), so the fetch step
        of the record says where the state came from (``source``) and what the rules said."""
        started = self.steps.begin(move, "fetch")
        detail: dict[str, Any] = {"from": move.source}
        snap: Snapshot | None
        found: StateSource = "live"
        age: float | None = None
        try:
            snap = await self.steps.call(move, partial(
                self.client.get_state, move.source, src.config.url))
        except MasterCallError as exc:
            detail["live_error"] = exc.reason
            if move.kind != "failover":
                self.steps.done(move, "fetch", started, "error", detail)
                raise StepFailed("fetch", exc.reason) from None
            snap, age = await self._checkpoint(move, detail)
            found = "checkpoint" if snap is not None else "none"
        fo = self.settings()
        verdict = judge_state(found, age, fo.require_state, fo.max_checkpoint_age,
                              allow_state_loss)
        if verdict.source == "none":
            snap = None
        detail.update(source=verdict.source, state=verdict.note)
        if snap is not None:
            detail.update(checksum=snap.checksum, bytes=snap.size, sessions=snap.sessions,
                          pending_messages=snap.pending_messages)
        self.steps.done(move, "fetch", started, "ok" if snap is not None else "error", detail)
        self.store.journal(move.id, "fetch", "done", detail={"source": verdict.source})
        self.stats.state_moved(move.master, verdict.source)
        return snap, verdict

    async def _checkpoint(self, move: Move, detail: dict[str, Any]
                          ) -> tuple[Snapshot | None, float | None]:
        """The last checkpoint of the source, verified, and its age in seconds."""
        ckpt = await self.store.acheckpoint(move.source)
        if ckpt is None:
            return None, None
        ts, _checksum, raw = ckpt
        try:
            snap = await parse_snapshot_async(raw, move.source, "checkpoint")
        except MasterCallError as bad:
            detail["checkpoint_error"] = bad.reason
            return None, None
        age = time.time() - ts
        detail["checkpoint_age"] = age
        return snap, age

    def _refused(self, move: Move, verdict: StateVerdict) -> None:
        """Nobody was activated: the failed master keeps its duties, and an operator decides
        (bring it back, or fail over with ``allow_state_loss``)."""
        rule = verdict.refused_by or "require_state"
        self.stats.refused(move.master, rule)
        self.store.audit("exporter", "failover_refused", move.master, {
            "failover_id": move.id, "rule": f"failover.{rule}", "why": verdict.note})
        log.error("%s of %s refused: %s", move.kind, move.master, verdict.note,
                  extra={"event": "failover_refused", "master": move.master,
                         "failover_id": move.id, "rule": rule})

    def _state_lost(self, move: Move, backup: str, verdict: StateVerdict,
                    allowed_by_operator: bool) -> None:
        """A backup serves the duties without their state: every session and pending message
        of the failed master is gone. Audited under whoever allowed it."""
        actor = move.actor if allowed_by_operator else "exporter"
        self.store.audit(actor, "state_lost", move.master, {
            "failover_id": move.id, "backup": backup, "why": verdict.note})
        log.error("%s of %s activated %s WITHOUT state: %s", move.kind, move.master, backup,
                  verdict.note, extra={"event": "failover_state_lost", "master": move.master,
                                       "failover_id": move.id, "backup": backup})

    async def _try_candidate(self, move: Move, cand: MasterRuntime,
                             snapshot: Snapshot | None) -> bool:
        """One candidate: True when it took over; on failure its steps are rolled back."""
        assert move.ranking is not None
        name = cand.name
        self.busy[name] = f"taking over {move.master} (failover #{move.id})"
        had = self.duties.duties_of(name)
        try:
            await self._attempt(move, cand, snapshot, had)
        except StepFailed as exc:
            self.stats.candidate_rolled_back(move.master)
            await self.undo.rollback(move, cand, snapshot is not None, had)
            move.ranking.note(name, f"failed at {exc.step}: {exc.reason}; rolled back")
            return False
        except (Interrupted, asyncio.CancelledError) as exc:
            await self.undo.rollback(move, cand, snapshot is not None, had)
            move.ranking.note(name, f"interrupted: {exc}; rolled back")
            raise
        finally:
            self.busy.pop(name, None)
        move.ranking.note(name, "took over")
        move.backup = name
        return True

    async def _attempt(self, move: Move, cand: MasterRuntime, snap: Snapshot | None,
                       had: list[str]) -> None:
        name = cand.name
        if snap is not None:  # the journal's "had" and "accept" tell recovery how to undo
            stored = await self.steps.run(
                move, "import", name, partial(self.client.import_state, name, cand.config.url,
                                              snap),
                detail={"checksum": snap.checksum, "accept": sorted(snap.import_checksums),
                        "had": had})
            started = self.steps.begin(move, "verify", name)
            if stored not in snap.import_checksums:
                self.steps.done(move, "verify", started, "error",
                                {"expected": snap.checksum, "stored": stored}, name)
                raise StepFailed("verify", f"{name} stored checksum {stored[:12]}…, "
                                 f"expected {snap.checksum[:12]}…")
            self.steps.done(move, "verify", started, detail={"checksum": stored}, backup=name)
        await self.activate(move, cand, had)
        started = self.steps.begin(move, "routing", name)
        self.commit_routing(move, name)
        self.steps.done(move, "routing", started, detail={"duties": move.duties}, backup=name)

    async def activate(self, move: Move, cand: MasterRuntime, had: list[str] | None) -> None:
        """One journalled activate step per duty of the move."""
        for duty in move.duties:
            taken_over = None if duty == cand.name else duty
            await self.steps.run(move, "activate", cand.name, partial(
                self.client.activate, cand.name, cand.config.url, taken_over),
                detail={"duty": duty, "had": had})

    def commit_routing(self, move: Move, holder: str) -> None:
        """``holder`` now holds the move's duties: persisted, then routing is told."""
        self.duties.move(move.duties, holder, time.time(), move.id)
        if self.on_routing_change is not None:
            try:
                self.on_routing_change(move.master, holder)
            except Exception:
                log.exception("routing change callback failed")


def pre_hook_context(move: Move, backup: str | None) -> HookContext:
    candidates = move.ranking.candidates if move.ranking else []
    return {"phase": "pre", "id": move.id, "kind": move.kind, "master": move.master,
            "backup": backup, "result": None, "trigger": move.trigger, "reason": move.reason,
            "duties": move.duties, "started": move.started,
            "candidates": [c["name"] for c in candidates if c.get("eligible")]}


def _why_none(ranking: Ranking | None) -> str:
    """The commonest reasons masters were passed over, for the record's reason."""
    reasons: dict[str, int] = {}
    for c in ranking.candidates if ranking else []:
        reason = c["reason"] or ""
        reasons[reason] = reasons.get(reason, 0) + 1
    top = sorted(reasons.items(), key=lambda item: -item[1])[:4]
    return ", ".join(f"{n}x {r}" for r, n in top) or "no other masters"
