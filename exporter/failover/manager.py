"""Failover orchestration: move a failed master's duties and state to the best backup, once.

A *move* hands a list of duties (a master's own, plus any it had taken over) from one master
to another. Three kinds share one engine:

* ``failover``   — the master failed: fence it (best effort), fetch its state (live, else the
  last checkpoint), import into a backup, verify, activate, update routing, record.
* ``switchover`` — graceful, by an operator: the old master is released only after the new one
  is active (make before break), and its state is fetched live.
* ``failback``   — a recovered master takes its own duty back from the backup that holds it.

Every step is timed and written to the journal *before* it runs; a failing step rolls back the
steps done (in reverse) and the next candidate is tried. Result semantics (one per move, so
``sum(rate(ha_failovers_total))`` is the move rate):

* ``success``          a candidate took over (earlier candidates may have been rolled back);
* ``failed``           no candidate succeeded (none eligible, all failed and were rolled back,
                       or a pre-hook vetoed); nothing is left half-active;
* ``rolled_back``      the move was interrupted from outside (deadline, shutdown, or a crash
                       found by ``recover_journal``) and undone;
* ``skipped_cooldown`` a failure inside the per-master or fleet-wide cooldown; not executed;
* ``dry_run``          ``failover.dry_run``: the plan is recorded, nothing is changed.

Per-candidate rollbacks are counted separately in ``stats.candidate_rollbacks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from exporter.config import Config
from exporter.failover import hooks
from exporter.failover.checkpoints import Checkpointer
from exporter.failover.duties import DutyTable
from exporter.failover.errors import (
    Conflict,
    FailoverRejected,
    InvalidRequest,
    Unavailable,
    UnknownMaster,
)
from exporter.failover.moves import (
    DURATION_BUCKETS,
    EXECUTED,
    RESULTS,
    Aborted,
    FailoverStats,
    Move,
    RoutingCallback,
    StepFailed,
)
from exporter.failover.protocol import MasterCallError, MasterClient, Snapshot, parse_snapshot_async
from exporter.failover.recovery import JournalRecovery
from exporter.failover.selection import Ranking, rank
from exporter.fleet import SERVING, Fleet, MasterRuntime, State, Transition
from exporter.store.sqlite import Store

__all__ = ["DURATION_BUCKETS", "EXECUTED", "RESULTS", "FailoverManager", "FailoverRejected",
           "FailoverStats"]

log = logging.getLogger(__name__)


class FailoverManager(JournalRecovery):
    """Owns failover decisions for one exporter; all methods run on the service's loop."""

    def __init__(self, config: Config, fleet: Fleet, store: Store, duties: DutyTable,
                 session: aiohttp.ClientSession,
                 on_routing_change: RoutingCallback | None = None,
                 publish: Callable[[Transition], None] | None = None) -> None:
        self.config = config
        self.fleet = fleet
        self.store = store
        self.duties = duties
        self.session = session
        self.on_routing_change = on_routing_change
        self.publish = publish
        self.client = MasterClient(session, config.failover.step_timeout)
        self.checkpoints = Checkpointer(store, self.client)
        self.stats = FailoverStats()
        self._paused = store.paused()
        self._inflight: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._moves: dict[int, Move] = {}
        self._busy: dict[str, str] = {}
        self._running = 0
        self._slot_free = asyncio.Condition()
        times = store.last_failover_times(("success", "rolled_back", "failed", "dry_run"))
        self._last_move: dict[str, float] = times
        self._last_fleet_move = max(times.values(), default=0.0)
        self._notify_tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    # --- public state ------------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def automatic(self) -> bool:
        """Whether health events may start failovers now."""
        return self.config.failover.enabled and not self._paused and not self._stopping

    @property
    def in_progress(self) -> int:
        return self.stats.in_progress

    def checkpoint_ts(self, master: str) -> float | None:
        return self.checkpoints.times.get(master)

    def checkpoint_ages(self, now: float | None = None) -> dict[str, float]:
        return self.checkpoints.ages(now)

    def restore(self) -> None:
        """Put masters the store says are in maintenance back into it; called once every
        consumer of the bus is subscribed, so routing learns it too."""
        for name in self.store.maintenance():
            rt = self.fleet.get(name)
            if rt is not None:
                self._publish(rt.health.set_maintenance(True, time.time()))

    def in_maintenance(self) -> list[str]:
        return sorted(rt.name for rt in self.fleet if rt.health.state is State.MAINTENANCE)

    def status(self) -> dict[str, Any]:
        """For the API and status page."""
        return {"enabled": self.config.failover.enabled, "paused": self._paused,
                "dry_run": self.config.failover.dry_run, "in_progress": self.stats.in_progress,
                "running": sorted(self._inflight), "assignments": self.duties.assignments(),
                "maintenance": self.in_maintenance()}

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Recover an interrupted move, then checkpoint and reconcile every interval."""
        await self.recover_journal()
        self._loop_task = asyncio.create_task(self._periodic(), name="failover-periodic")

    async def _periodic(self) -> None:
        while not self._stopping:
            try:
                await self.checkpoint_round()
                await self.reconcile()
            except Exception:
                log.exception("failover periodic round failed")
            await asyncio.sleep(self.config.failover.checkpoint_interval)

    def update_config(self, config: Config) -> None:
        """After a reload (and after the lead's Fleet.update): re-derive roles, timeouts."""
        self.config = config
        self.client.timeout = config.failover.step_timeout
        names = {m.name for m in config.masters}
        self.checkpoints.forget([n for n in self.checkpoints.times if n not in names])

    async def shutdown(self, deadline: float = 8.0) -> None:
        """Stop automatic work; let moves in flight finish within ``deadline`` seconds, else
        abort them (they roll back); flush notifications."""
        self._stopping = True
        end = time.monotonic() + deadline
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        tasks = list(self._inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline * 0.5))
            if pending:
                for move in list(self._moves.values()):
                    self._abort(move, "exporter shutting down")
                await asyncio.wait(pending, timeout=max(0.1, end - time.monotonic()))
        if self._notify_tasks:
            await asyncio.wait(list(self._notify_tasks),
                               timeout=max(0.1, end - time.monotonic()))

    # --- health events -----------------------------------------------------------------------
    async def on_transition(self, t: Transition) -> None:
        """EventBus subscriber: an active master entering failed starts a failover; a master
        returning to serving is kept standby, or gets its duty back with failback auto."""
        rt = self.fleet.get(t.master)
        if rt is None or self._stopping:
            return
        if t.new is State.FAILED and t.old is not State.FAILED:
            if self.duties.role_of(rt.name) == "active":
                await self.auto_failover(t.master, f"health: {t.reason}")
        elif t.new in SERVING and t.old in (State.FAILED, State.RECOVERING):
            await self._on_recovered(rt)

    async def auto_failover(self, master: str, reason: str) -> dict[str, Any] | None:
        """The automatic path: honours enabled/pause, single flight and cooldowns."""
        if master in self._inflight:
            log.info("failover of %s already running; %s ignored", master, reason,
                     extra={"event": "failover_duplicate", "master": master})
            return None
        if not self.automatic:
            why = ("failover disabled by config" if not self.config.failover.enabled
                   else "paused" if self._paused else "shutting down")
            self.store.audit("exporter", "failover_suppressed", master,
                             {"reason": reason, "why": why})
            log.warning("master %s failed but automatic failover is off (%s)", master, why,
                        extra={"event": "failover_suppressed", "master": master, "why": why})
            return None
        if not self.duties.duties_of(master):
            return None
        cool = self._cooldown_left(master)
        if cool is not None:
            scope, left = cool
            return self._record_only(master, "skipped_cooldown", "auto",
                                     f"{reason}; inside {scope} cooldown ({left:.1f}s left)")
        try:
            return await self.failover(master, trigger="auto", reason=reason, actor="exporter")
        except FailoverRejected as exc:  # e.g. it is itself mid-takeover: reconcile retries
            log.warning("automatic failover of %s not started: %s", master, exc,
                        extra={"event": "failover_not_started", "master": master})
            return None

    def _cooldown_left(self, master: str, fleet: bool = True) -> tuple[str, float] | None:
        """Per-master cooldown gates failovers and failbacks of that master; the fleet-wide
        one gates failovers only (a failback is the fleet healing, not a new incident)."""
        now, fo = time.time(), self.config.failover
        left = self._last_move.get(master, 0.0) + fo.cooldown - now
        if left > 0:
            return "per-master", left
        if not fleet:
            return None
        left = self._last_fleet_move + fo.fleet_cooldown - now
        if fo.fleet_cooldown > 0 and left > 0:
            return "fleet-wide", left
        return None

    async def _on_recovered(self, rt: MasterRuntime) -> None:
        name = rt.name
        await self._run_cleanups(only=name)
        holder = self.duties.assigned_away(name)
        if holder is None:
            return
        if not self.duties.duties_of(name):
            # it may have come back believing it is active (restart from its own config)
            try:
                h = await self.client.health(name, rt.config.url)
                if h.get("active"):
                    await self._fence_returning(rt, holder)
            except MasterCallError:
                pass
        if self.config.failover.failback == "auto" and self.automatic:
            if self._cooldown_left(name, fleet=False) is None:
                with contextlib.suppress(FailoverRejected):
                    await self.failback(name, trigger="auto", actor="exporter")
                return
            self.store.audit("exporter", "failback_deferred", name,
                             {"reason": "inside cooldown", "holder": holder})
        log.info("master %s is back and stays standby (its duty is held by %s)", name, holder,
                 extra={"event": "recovered_as_standby", "master": name, "holder": holder})

    async def _fence_returning(self, rt: MasterRuntime, holder: str) -> None:
        """Fence a master that serves as active while ``holder`` has its duty: two active
        masters for one duty is the split brain failover exists to prevent."""
        errors: list[str] = []
        move = Move(0, "fence", rt.name, rt.name, [], "", "", "exporter", time.time(),
                    time.monotonic())
        await self._undo(rt, "fence", None, move, errors)
        self.store.audit("exporter", "fence_returning", rt.name, {"holder": holder})
        log.warning("master %s came back active while %s holds its duty: fenced", rt.name,
                    holder, extra={"event": "failover_fence_returning", "master": rt.name,
                                   "holder": holder})

    # --- operator actions --------------------------------------------------------------------
    def pause(self, actor: str = "api") -> None:
        self._paused = True
        self.store.set_paused(True)
        self.store.audit(actor, "pause", None, {})
        log.warning("automatic failover paused by %s", actor, extra={"event": "failover_pause"})

    def resume(self, actor: str = "api") -> None:
        self._paused = False
        self.store.set_paused(False)
        self.store.audit(actor, "resume", None, {})
        log.info("automatic failover resumed by %s", actor, extra={"event": "failover_resume"})

    async def set_maintenance(self, name: str, on: bool, actor: str = "api",
                              drain: bool = True) -> dict[str, Any]:
        """Maintenance on: first move the master's duties away (switchover) if it holds any,
        then take it out of rotation and out of candidate lists. Off: probes decide again."""
        rt = self._known(name)
        moved = None
        if on and drain and self.duties.duties_of(name) and rt.health.state in SERVING:
            moved = await self.switchover(name, actor=actor, reason="maintenance drain")
        self.store.set_maintenance(name, on)
        self.store.audit(actor, "maintenance_on" if on else "maintenance_off", name,
                         {"drain": moved["id"] if moved else None})
        self._publish(rt.health.set_maintenance(on, time.time()))
        return {"master": name, "maintenance": on, "switchover": moved}

    async def reset(self, name: str, actor: str = "api") -> dict[str, Any]:
        """Manual reset: clear the health counters and attempt limit and the master's
        cooldown; if it is serving and its duty is held by a backup, give it back (manual
        failback)."""
        rt = self._known(name)
        self._publish(rt.health.reset(time.time()))
        self._last_move.pop(name, None)
        moved = None
        if self.duties.assigned_away(name) is not None and rt.health.state in SERVING:
            moved = await self.failback(name, trigger="manual", actor=actor)
        self.store.audit(actor, "reset", name, {"failback": moved["id"] if moved else None})
        return {"master": name, "state": str(rt.health.state), "failback": moved}

    def _known(self, name: str) -> MasterRuntime:
        rt = self.fleet.get(name)
        if rt is None:
            raise UnknownMaster(f"unknown master {name!r}")
        return rt

    def _publish(self, t: Transition | None) -> None:
        if t is not None and self.publish is not None:
            self.publish(t)

    # --- the three kinds of move -----------------------------------------------------------
    async def failover(self, master: str, to: str | None = None, trigger: str = "manual",
                       reason: str = "manual failover", actor: str = "api") -> dict[str, Any]:
        """Fail ``master`` over (fence first). Manual calls ignore pause and cooldown."""
        self._known(master)
        duties = self.duties.duties_of(master)
        if not duties:
            raise Conflict(f"master {master!r} holds no duties (it is standby)")
        return await self._start("failover", master, master, duties, to, trigger, reason, actor)

    async def switchover(self, frm: str, to: str | None = None, actor: str = "api",
                         reason: str = "manual switchover") -> dict[str, Any]:
        """Graceful: ``to`` is activated before ``frm`` is released. A ``frm`` that is not
        serving cannot hand over gracefully, so that becomes a (fencing) failover."""
        rt = self._known(frm)
        duties = self.duties.duties_of(frm)
        if not duties:
            raise Conflict(f"master {frm!r} holds no duties (it is standby)")
        if rt.health.state not in SERVING:
            return await self.failover(frm, to, "manual", f"{reason} (source {rt.health.state})",
                                       actor)
        return await self._start("switchover", frm, frm, duties, to, "manual", reason, actor)

    async def failback(self, name: str, trigger: str = "manual",
                       actor: str = "api") -> dict[str, Any]:
        """``name`` takes its own duty back from its holder (state fetched from the holder)."""
        rt = self._known(name)
        holder = self.duties.assigned_away(name)
        if holder is None:
            raise Conflict(f"master {name!r} already holds its own duty")
        hrt = self.fleet.get(holder)
        if hrt is None or hrt.health.state not in SERVING or rt.health.state not in SERVING:
            raise Conflict(f"failback of {name!r} needs it and its holder "
                                   f"{holder!r} serving")
        return await self._start("failback", name, holder, [name], name, trigger,
                                 f"failback of {name} from {holder}", actor)

    async def _start(self, kind: str, master: str, source: str, duties: list[str],
                     to: str | None, trigger: str, reason: str, actor: str) -> dict[str, Any]:
        if self._stopping:
            raise Unavailable("exporter is shutting down")
        if master in self._inflight or source in self._inflight:
            raise Conflict(f"a failover of {master!r} is already running")
        if master in self._busy:
            raise Conflict(f"master {master!r} is {self._busy[master]}")
        if to is not None:
            self._known(to)
            if to == source:
                raise InvalidRequest("'to' must differ from the master failed from")
            if kind != "failback":
                self._rank(master, to, (source,))  # raises 409 naming why 'to' is not eligible
        if self.config.failover.dry_run:
            return self._dry_run(kind, master, source, duties, to, trigger, reason)
        task = asyncio.create_task(
            self._execute(kind, master, source, duties, to, trigger, reason, actor),
            name=f"{kind}-{master}")
        self._inflight[master] = task
        task.add_done_callback(lambda _t: self._inflight.pop(master, None))
        return await asyncio.shield(task)

    # --- selection ---------------------------------------------------------------------------
    def _rank(self, master: str, to: str | None, exclude: tuple[str, ...] = ()) -> Ranking:
        rt = self.fleet.get(master)
        assert rt is not None
        busy = dict(self._busy)
        for name in self._inflight:
            busy.setdefault(name, "being failed away from")
        for name in exclude:
            busy.setdefault(name, "source of this move")
        regions = rt.config.failover_regions or None
        ranking = rank(rt, self.fleet, self.duties.role_of, busy=busy,
                       allowed_regions=regions)
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

    def _dry_run(self, kind: str, master: str, source: str, duties: list[str],
                 to: str | None, trigger: str, reason: str) -> dict[str, Any]:
        """Record exactly what would be done, touch nothing (no master is called)."""
        t0 = time.perf_counter()
        ranking = self._rank(master, to, (source,)) if kind != "failback" else None
        order = ([r.name for r in ranking.order[:self.config.failover.max_candidates]]
                 if ranking else [master])
        ckpt = self.checkpoints.times.get(source)
        plan: list[dict[str, Any]] = [
            {"step": "select", "status": "planned", "detail": {"order": order}}]
        if self.config.failover.pre_hook:
            plan.append({"step": "pre_hook", "status": "planned",
                         "detail": {"url": self.config.failover.pre_hook.url}})
        if kind == "failover":
            plan.append({"step": "fence", "status": "planned", "detail": {"master": master}})
        plan += [
            {"step": "fetch", "status": "planned",
             "detail": {"from": source, "fallback_checkpoint_ts": ckpt}},
            {"step": "import", "status": "planned", "backup": order[0] if order else None},
            {"step": "verify", "status": "planned"},
            {"step": "activate", "status": "planned", "detail": {"duties": duties}},
            {"step": "routing", "status": "planned"},
        ]
        if kind != "failover":
            plan.append({"step": "release", "status": "planned", "detail": {"master": source}})
        backup = order[0] if order else None
        note = "" if order else "; would fail: no eligible backup"
        return self._record_only(master, "dry_run", trigger, f"{reason}{note}", backup, plan,
                                 ranking.candidates if ranking else [], kind,
                                 time.perf_counter() - t0)

    def _record_only(self, master: str, result: str, trigger: str, reason: str,
                     backup: str | None = None, steps: list[dict[str, Any]] | None = None,
                     candidates: list[dict[str, Any]] | None = None, kind: str = "failover",
                     duration: float = 0.0) -> dict[str, Any]:
        now = time.time()
        fid = self.store.record_failover(master, result, trigger, reason, now, backup,
                                         duration, steps, candidates, kind)
        if result == "dry_run":
            self._last_move[master] = now
            self._last_fleet_move = now
        self.stats.record(master, result, None)
        log.warning("failover of %s: %s (%s)", master, result, reason,
                    extra={"event": "failover_result", "master": master, "result": result,
                           "failover_id": fid, "backup": backup})
        record = self.store.get_failover(fid)
        assert record is not None
        return record

    # --- the engine --------------------------------------------------------------------------
    async def _execute(self, kind: str, master: str, source: str, duties: list[str],
                       to: str | None, trigger: str, reason: str,
                       actor: str) -> dict[str, Any]:
        fo = self.config.failover
        now = time.time()
        self._last_move[master] = now
        self._last_fleet_move = now
        fid = self.store.begin_failover(master, trigger, reason, now, kind)
        move = Move(fid, kind, master, source, duties, trigger, reason, actor, now,
                     time.monotonic() + fo.deadline)
        self._moves[fid] = move
        self.stats.in_progress += 1
        self.store.journal(fid, "plan", "begin", detail={
            "kind": kind, "source": source, "duties": duties, "to": to})
        log.warning("%s of %s started (%s)", kind, master, reason,
                    extra={"event": "failover_start", "master": master, "failover_id": fid,
                           "kind": kind, "trigger": trigger})
        result, why = "failed", ""
        try:
            async with self._slot(move):
                result, why = await self._run(move, to)
        except Aborted as exc:
            result, why = "rolled_back", str(exc)
        except StepFailed as exc:
            result, why = "failed", str(exc)
        except Exception as exc:  # a bug must still close the record
            log.exception("%s of %s crashed", kind, master)
            result, why = "failed", f"internal error: {exc!r}"
        finally:
            self.stats.in_progress -= 1
            self._moves.pop(fid, None)
        return self._finish(move, result, why)

    @contextlib.asynccontextmanager
    async def _slot(self, move: Move) -> Any:
        """At most failover.max_concurrent moves fleet-wide; waiting counts against the
        move's deadline."""
        async with self._slot_free:
            try:
                async with asyncio.timeout(max(0.0, move.deadline - time.monotonic())):
                    await self._slot_free.wait_for(
                        lambda: self._running < self.config.failover.max_concurrent)
            except TimeoutError:
                raise Aborted("deadline exceeded waiting for a failover slot") from None
            self._running += 1
        try:
            yield
        finally:
            async with self._slot_free:
                self._running -= 1
                self._slot_free.notify_all()

    async def _run(self, move: Move, to: str | None) -> tuple[str, str]:
        fo = self.config.failover
        # select
        t = time.perf_counter()
        self.store.journal(move.id, "select", "begin")
        if move.kind == "failback":
            ranking = Ranking(order=[self.fleet.get(move.master)],  # type: ignore[list-item]
                              candidates=[{"name": move.master, "eligible": True, "rank": 1,
                                           "reason": "failback to the duty's owner"}])
        else:
            ranking = self._rank(move.master, to, (move.source,))
        move.ranking = ranking
        order = ranking.order[:fo.max_candidates]
        for extra in ranking.order[fo.max_candidates:]:
            ranking.note(extra.name, f"not tried: failover.max_candidates={fo.max_candidates}")
        self._step_done(move, "select", t, detail={"order": [r.name for r in order]})
        if not order:
            reasons: dict[str, int] = {}
            for c in ranking.candidates:
                reasons[c["reason"]] = reasons.get(c["reason"], 0) + 1
            summary = ", ".join(f"{n}x {r}" for r, n in sorted(reasons.items(),
                                                                key=lambda i: -i[1])[:4])
            return "failed", f"no eligible backup ({summary or 'no other masters'})"
        # pre-hook: a veto before anything is changed
        if fo.pre_hook is not None:
            ctx = self._hook_context(move, "pre", order[0].name, None)
            try:
                await self._step(move, "pre_hook", None, lambda _t: hooks.call_hook(
                    self.session, fo.pre_hook, ctx, "pre"), timeout=fo.pre_hook.timeout)
            except StepFailed as exc:
                return "failed", f"aborted by pre-hook: {exc.reason}"
        # fence (failover only; best effort, bounded)
        src = self.fleet.get(move.source)
        assert src is not None
        if move.kind == "failover":
            move.fenced = True  # attempted: a timed-out fence may still have landed
            try:
                await self._step(move, "fence", None, lambda tt: self.client.deactivate(
                    move.source, src.config.url, None, timeout=tt))
            except StepFailed as exc:
                # a dead master cannot be fenced now: queued, it is fenced when it comes back
                # unless by then it holds duties again (the failover failed)
                self.store.add_cleanup(move.source, "fence", None, move.id, exc.reason)
            except Aborted:
                await self._unfence(move, src)
                raise
        try:
            snapshot = await self._fetch(move, src)
            for cand in order:
                if await self._try_candidate(move, cand, snapshot):
                    if move.kind != "failover":
                        await self._release(move, src)
                    return "success", f"{move.master} -> {cand.name}"
        except (Aborted, asyncio.CancelledError) as exc:
            await self._unfence(move, src)
            raise Aborted(str(exc) or "cancelled") from None
        await self._unfence(move, src)
        return "failed", f"every candidate failed ({len(order)} tried)"

    async def _try_candidate(self, move: Move, cand: MasterRuntime,
                             snapshot: Snapshot | None) -> bool:
        """One candidate: True when it took over; on failure its steps are rolled back."""
        assert move.ranking is not None
        name = cand.name
        self._busy[name] = f"taking over {move.master} (failover #{move.id})"
        had = self.duties.duties_of(name)
        try:
            await self._attempt(move, cand, snapshot)
        except StepFailed as exc:
            self.stats.candidate_rollbacks[move.master] = (
                self.stats.candidate_rollbacks.get(move.master, 0) + 1)
            await self._rollback(move, cand, snapshot is not None, had)
            move.ranking.note(name, f"failed at {exc.step}: {exc.reason}; rolled back")
            return False
        except (Aborted, asyncio.CancelledError) as exc:
            await self._rollback(move, cand, snapshot is not None, had)
            move.ranking.note(name, f"interrupted: {exc}; rolled back")
            raise
        finally:
            self._busy.pop(name, None)
        move.ranking.note(name, "took over")
        move.backup = name
        return True

    async def _fetch(self, move: Move, src: MasterRuntime) -> Snapshot | None:
        t = time.perf_counter()
        self.store.journal(move.id, "fetch", "begin")
        detail: dict[str, Any] = {"from": move.source}
        try:
            snap = await self._bounded(move, lambda tt: self.client.get_state(
                move.source, src.config.url, timeout=tt))
            detail.update(source="live")
        except MasterCallError as exc:
            detail["live_error"] = exc.reason
            snap = None
            if move.kind == "failover":
                ckpt = await self.store.acheckpoint(move.source)
                if ckpt is not None:
                    ts, _checksum, raw = ckpt
                    try:
                        snap = await parse_snapshot_async(raw, move.source, "checkpoint")
                        detail.update(source="checkpoint", checkpoint_age=time.time() - ts)
                    except MasterCallError as bad:
                        detail["checkpoint_error"] = bad.reason
            if snap is None:
                if move.kind != "failover":
                    self._step_done(move, "fetch", t, "error", detail)
                    raise StepFailed("fetch", exc.reason) from None
                detail["source"] = "none"
                log.error("failover of %s proceeds WITHOUT state: %s and no usable checkpoint",
                          move.master, exc.reason, extra={"event": "failover_step",
                                                          "master": move.master})
        if snap is not None:
            detail.update(checksum=snap.checksum, bytes=snap.size, sessions=snap.sessions,
                          pending_messages=snap.pending_messages)
        self._step_done(move, "fetch", t, "ok" if snap is not None else "error", detail)
        return snap

    async def _attempt(self, move: Move, cand: MasterRuntime, snap: Snapshot | None) -> None:
        url, name = cand.config.url, cand.name
        # journalled: recovery must know how to undo this candidate
        had = self.duties.duties_of(name)
        if snap is not None:
            stored = await self._step(move, "import", name, lambda tt: self.client.import_state(
                name, url, snap, timeout=tt), detail={
                    "checksum": snap.checksum, "accept": sorted(snap.import_checksums),
                    "had": had})
            t = time.perf_counter()
            self.store.journal(move.id, "verify", "begin", name)
            if stored not in snap.import_checksums:
                self._step_done(move, "verify", t, "error", {"expected": snap.checksum,
                                                             "stored": stored}, name)
                raise StepFailed("verify", f"{name} stored checksum {stored[:12]}…, "
                                 f"expected {snap.checksum[:12]}…")
            self._step_done(move, "verify", t, detail={"checksum": stored}, backup=name)
        for duty in move.duties:
            await self._step(move, "activate", name, lambda tt, d=duty: self.client.activate(
                name, url, None if d == name else d, timeout=tt),
                detail={"duty": duty, "had": had})
        t = time.perf_counter()
        self.store.journal(move.id, "routing", "begin", name)
        self._commit_routing(move, name)
        self._step_done(move, "routing", t, detail={"duties": move.duties}, backup=name)

    def _commit_routing(self, move: Move, holder: str) -> None:
        self.duties.move(move.duties, holder, time.time(), move.id)
        if self.on_routing_change is not None:
            try:
                self.on_routing_change(move.master, holder)
            except Exception:
                log.exception("routing change callback failed")

    async def _undo(self, rt: MasterRuntime, action: str, arg: str | None,
                    move: Move, errors: list[str]) -> None:
        """One undo call; if the master cannot be reached it is queued (store.cleanup) and
        retried by ``reconcile``, re-checked against the assignments of that time. After one
        timeout or connection failure in this move, further calls to that master are queued
        without waiting again (bounded rollback even against a hanging master)."""
        url, timeout = rt.config.url, self._undo_timeout(move)
        if rt.name in move.unresponsive:
            errors.append(f"{rt.name} unresponsive: {action} queued")
            self.store.add_cleanup(rt.name, action, arg, move.id, errors[-1])
            return
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
        except MasterCallError as exc:
            errors.append(exc.reason)
            self.store.add_cleanup(rt.name, action, arg, move.id, exc.reason)
            if exc.status is None:  # timeout or no connection, not an HTTP answer
                move.unresponsive.add(rt.name)

    async def _rollback(self, move: Move, cand: MasterRuntime, dropped: bool,
                        had: list[str] | None = None) -> None:
        """Undo a candidate's steps in reverse: its activations (a candidate that held nothing
        before is fenced back to an inactive standby), then its import."""
        t = time.perf_counter()
        had = self.duties.duties_of(cand.name) if had is None else had
        self.store.journal(move.id, "rollback", "begin", cand.name)
        errors: list[str] = []
        if not had:
            await self._undo(cand, "fence", None, move, errors)
        else:
            for duty in reversed(move.duties):
                await self._undo(cand, "release", duty, move, errors)
        if dropped:
            await self._undo(cand, "drop_import", move.source, move, errors)
        self.store.journal(move.id, "rollback", "done", cand.name, {"errors": errors})
        self._step_done(move, "rollback", t, "error" if errors else "ok",
                        {"errors": errors} if errors else {}, cand.name)

    async def _unfence(self, move: Move, src: MasterRuntime) -> None:
        """Nobody took over: hand the fenced master its duties back (status quo ante)."""
        if not move.fenced:
            return
        t = time.perf_counter()
        errors: list[str] = []
        await self._undo(src, "unfence", None, move, errors)
        self._step_done(move, "unfence", t, "error" if errors else "ok",
                        {"errors": errors} if errors else {}, None)

    async def _release(self, move: Move, src: MasterRuntime) -> None:
        """Make-before-break: the old holder lets go only now that the new one is active; if
        it holds nothing any more it is fenced to an inactive standby."""
        t = time.perf_counter()
        self.store.journal(move.id, "release", "begin", move.source)
        errors: list[str] = []
        for duty in move.duties:
            if duty != src.name:
                await self._undo(src, "release", duty, move, errors)
                await self._undo(src, "drop_import", duty, move, errors)
        if not self.duties.duties_of(src.name):
            await self._undo(src, "fence", None, move, errors)
        self._step_done(move, "release", t, "error" if errors else "ok",
                        {"errors": errors} if errors else {"master": src.name})

    def _undo_timeout(self, move: Move | None = None) -> float:
        """Undo calls get the step timeout, but at most 1 s once the move was aborted (its
        deadline passed or the exporter is stopping): what does not land is queued."""
        late = self._stopping or (move is not None and (
            move.abort.is_set() or time.monotonic() > move.deadline))
        return min(self.config.failover.step_timeout, 1.0 if late else 30.0)

    # --- steps: journal, bound, time, log ----------------------------------------------------
    async def _bounded(self, move: Move, call: Callable[[float], Awaitable[Any]],
                       timeout: float | None = None) -> Any:
        """Run ``call(timeout)`` bounded by the step timeout, the move's deadline and an
        abort (shutdown)."""
        if move.abort.is_set():
            raise Aborted(move.abort_reason)
        left = move.deadline - time.monotonic()
        if left <= 0:
            raise Aborted(f"deadline of {self.config.failover.deadline:g}s exceeded")
        limit = min(timeout or self.config.failover.step_timeout, left)
        task = asyncio.ensure_future(call(limit))
        waiter = asyncio.ensure_future(move.abort.wait())
        try:
            done, _ = await asyncio.wait({task, waiter}, timeout=limit + 0.5,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if move.abort.is_set():
            raise Aborted(move.abort_reason)
        raise MasterCallError("?", "step", f"timeout after {limit:g}s")

    async def _step(self, move: Move, step: str, backup: str | None,
                    call: Callable[[float], Awaitable[Any]], timeout: float | None = None,
                    detail: dict[str, Any] | None = None) -> Any:
        self.store.journal(move.id, step, "begin", backup, detail)
        t = time.perf_counter()
        try:
            out = await self._bounded(move, call, timeout)
        except (MasterCallError, hooks.HookError) as exc:
            reason = exc.reason if isinstance(exc, MasterCallError) else str(exc)
            self._step_done(move, step, t, "error", {**(detail or {}), "error": reason}, backup)
            raise StepFailed(step, reason) from None
        except Aborted as exc:
            self._step_done(move, step, t, "error", {**(detail or {}), "error": str(exc)},
                            backup)
            raise
        self._step_done(move, step, t, detail=detail, backup=backup)
        return out

    def _step_done(self, move: Move, step: str, t: float, status: str = "ok",
                   detail: dict[str, Any] | None = None, backup: str | None = None) -> None:
        took = time.perf_counter() - t
        entry = {"step": step, "status": status, "backup": backup,
                 "duration": round(took, 6), "detail": detail or {}}
        move.steps.append(entry)
        log.log(logging.INFO if status == "ok" else logging.WARNING,
                "%s #%d of %s: step %s %s in %.1f ms%s", move.kind, move.id, move.master, step,
                status, took * 1000, f" (backup {backup})" if backup else "",
                extra={"event": "failover_step", "failover_id": move.id, "master": move.master,
                       "step": step, "status": status, "backup": backup,
                       "duration_seconds": round(took, 6),
                       **({"error": detail["error"]} if detail and "error" in detail else {})})

    def _abort(self, move: Move, reason: str) -> None:
        move.abort_reason = reason
        move.abort.set()

    # --- finishing ---------------------------------------------------------------------------
    def _finish(self, move: Move, result: str, why: str) -> dict[str, Any]:
        duration = time.monotonic() - move.t0
        candidates = move.ranking.candidates if move.ranking else []
        self.store.finish_failover(move.id, result, move.backup, time.time(), duration,
                                   move.steps, candidates, f"{move.reason}; {why}")
        self.stats.record(move.master, result, duration)
        self.store.audit(move.actor, move.kind, move.master, {
            "failover_id": move.id, "result": result, "backup": move.backup, "why": why})
        log.log(logging.WARNING if result == "success" else logging.ERROR,
                "%s #%d of %s: %s in %.1f ms (%s)", move.kind, move.id, move.master, result,
                duration * 1000, why,
                extra={"event": "failover_result", "failover_id": move.id,
                       "master": move.master, "backup": move.backup, "result": result,
                       "duration_seconds": round(duration, 6)})
        record = self.store.get_failover(move.id)
        assert record is not None
        self._notify(record)
        return record

    def _hook_context(self, move: Move, phase: str, backup: str | None,
                      result: str | None) -> dict[str, Any]:
        return {"phase": phase, "id": move.id, "kind": move.kind, "master": move.master,
                "backup": backup, "result": result, "trigger": move.trigger,
                "reason": move.reason, "duties": move.duties, "started": move.started,
                "candidates": [c["name"] for c in (move.ranking.candidates if move.ranking
                                                   else []) if c.get("eligible")]}

    def _notify(self, record: dict[str, Any]) -> None:
        """Post-hook and Alertmanager, off the failover's critical path."""
        fo, am = self.config.failover, self.config.alertmanager
        if record["result"] not in EXECUTED or (fo.post_hook is None and am is None):
            return

        async def run() -> None:
            if fo.post_hook is not None:
                ctx = {**record, "phase": "post",
                       "candidates": [c["name"] for c in record["candidates"]
                                      if c.get("eligible")]}
                try:
                    await hooks.call_hook(self.session, fo.post_hook, ctx, "post")
                except hooks.HookError as exc:
                    log.warning("post-failover hook failed: %s", exc,
                                extra={"event": "failover_hook", "phase": "post", "ok": False})
                    self.store.audit("exporter", "post_hook_failed", record["master"],
                                     {"failover_id": record["id"], "error": str(exc)})
            if am is not None:
                await hooks.post_alert(self.session, am, record)

        task = asyncio.create_task(run())
        self._notify_tasks.add(task)
        task.add_done_callback(self._notify_tasks.discard)

    async def drain_notifications(self, timeout: float = 10.0) -> None:
        if self._notify_tasks:
            await asyncio.wait(list(self._notify_tasks), timeout=timeout)

    # --- periodic work -----------------------------------------------------------------------
    async def checkpoint_round(self) -> dict[str, bool]:
        """Pull GET /state from every serving active master not mid-move; keep the latest."""
        busy = set(self._inflight) | set(self._busy)
        active = [rt for rt in self.fleet if self.duties.role_of(rt.name) == "active"]
        return await self.checkpoints.round(active, self.config.failover.step_timeout,
                                            skip=busy.__contains__)

    async def reconcile(self) -> None:
        """Fence masters that came back active without their duty, retry queued undo calls,
        and do the automatic work a cooldown or failed attempt left:
        an active master still failed gets another failover once its cooldown is over; a
        recovered master with failback auto gets its duty back."""
        await self._run_cleanups()
        for rt in self.fleet:  # safety, even while paused: fence a returning split brain
            holder = self.duties.assigned_away(rt.name)
            if (rt.reported_active and holder is not None and rt.name not in self._inflight
                    and not self.duties.duties_of(rt.name)):
                await self._fence_returning(rt, holder)
                rt.reported_active = None  # until the next probe says otherwise
        if not self.automatic:
            return
        for rt in self.fleet:
            name = rt.name
            if name in self._inflight:
                continue
            if rt.health.state is State.FAILED and self.duties.duties_of(name):
                if self._cooldown_left(name) is None:
                    await self.auto_failover(name, "still failed after cooldown; retrying")
            elif (self.config.failover.failback == "auto"
                  and self.duties.assigned_away(name) is not None
                  and rt.health.state in SERVING
                  and self._cooldown_left(name, fleet=False) is None):
                with contextlib.suppress(FailoverRejected):
                    await self.failback(name, trigger="auto", actor="exporter")

    async def _run_cleanups(self, only: str | None = None) -> None:
        """Each queued undo is re-checked against the current assignments before it runs, so a
        late undo never deactivates a duty that has legitimately moved since."""
        for item in self.store.cleanups():
            rt = self.fleet.get(item["master"])
            if rt is None:
                self.store.cleanup_done(item["id"])
                continue
            name, action, arg = rt.name, item["action"], item["arg"]
            if only is not None and name != only:
                continue
            still_needed = {
                "fence": not self.duties.duties_of(name),
                "release": arg is not None and self.duties.holder_of(arg) != name,
                "drop_import": arg is not None and self.duties.holder_of(arg) != name,
                "unfence": bool(self.duties.duties_of(name)),
            }.get(action, False)
            if still_needed:
                errors: list[str] = []
                move = Move(int(item["failover_id"] or 0), "cleanup", name, name, [], "", "",
                             "exporter", time.time(), time.monotonic())
                self.store.cleanup_done(item["id"])  # _undo re-queues it if it fails again
                await self._undo(rt, action, arg, move, errors)
                if errors:
                    continue
            else:
                self.store.cleanup_done(item["id"])
            log.info("queued %s on %s %s", action, name, "done" if still_needed else "obsolete",
                     extra={"event": "failover_cleanup", "master": name, "action": action})
