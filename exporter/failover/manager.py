"""Failover policy: when a master's duties move, and the operator's actions on failover.

``FailoverManager`` decides; the parts it composes act:

* ``MoveEngine`` runs a move (``engine.py``), with ``Steps`` (journal, bounds, timing),
  ``Undoer`` (rollback and queued undo calls) and ``Ledger`` (records, statistics);
* ``CrashRecovery`` closes the moves a crash left open (``recovery.py``);
* ``RealityCheck`` makes the duty table agree with what the masters serve (``reality.py``);
* ``Notifier`` posts finished moves to the post-hook and Alertmanager (``notify.py``);
* ``Checkpointer`` keeps the last state of every active master (``checkpoints.py``).

The manager owns the triggers (health events, the periodic reconcile), the switches (enabled,
pause, dry run), single flight per master, and the per-master and fleet-wide cooldowns. A
cooldown never holds back the failover of a duty nobody serves. Manual actions ignore pause and
cooldowns; only a shutdown refuses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from exporter.config import Config, FailoverConfig
from exporter.failover.checkpoints import Checkpointer
from exporter.failover.duties import DutyTable
from exporter.failover.engine import MoveEngine
from exporter.failover.errors import (
    Conflict,
    FailoverRejected,
    InvalidRequest,
    Unavailable,
    UnknownMaster,
)
from exporter.failover.ledger import Ledger
from exporter.failover.moves import MoveRequest, RoutingCallback
from exporter.failover.notify import Notifier
from exporter.failover.plan import planned_steps
from exporter.failover.policy import UNSUCCESSFUL, Cooldowns, Failback, failback_decision
from exporter.failover.reality import ControlMarks, RealityCheck, WatchedClient
from exporter.failover.records import FailoverRecord
from exporter.failover.recovery import CrashRecovery
from exporter.failover.stats import FailoverStats
from exporter.failover.steps import Steps
from exporter.failover.undo import Undoer
from exporter.fleet import SERVING, Fleet, MasterRuntime, State, Transition
from exporter.store.sqlite import Store

__all__ = ["FailoverManager", "FailoverRejected"]

log = logging.getLogger(__name__)

COOLDOWN_RESULTS = ("success", "rolled_back", "failed", "dry_run")  # what starts a cooldown


class FailoverManager:
    """Decides failovers for one exporter; all methods run on the service's loop."""

    def __init__(self, config: Config, fleet: Fleet, store: Store, duties: DutyTable,
                 session: aiohttp.ClientSession,
                 on_routing_change: RoutingCallback | None = None,
                 publish: Callable[[Transition], None] | None = None) -> None:
        self.config = config
        self.fleet = fleet
        self.store = store
        self.duties = duties
        self.publish = publish
        self.marks = ControlMarks(fleet)
        # one new fencing epoch per start: this exporter outranks any older one still running
        self.client = WatchedClient(session, config.failover.step_timeout, store.next_epoch(),
                                    self.marks.touch)
        log.info("fencing epoch %d", self.client.epoch, extra={"event": "fencing_epoch",
                                                               "epoch": self.client.epoch})
        self.checkpoints = Checkpointer(store, self.client)
        self.stats = FailoverStats()
        self.notifier = Notifier(session, store, lambda: self.config)
        self.ledger = Ledger(store, self.stats, self.notifier)
        steps = Steps(store, self._settings)
        self.undo = Undoer(self.client, store, fleet, duties, steps, self._settings)
        self.engine = MoveEngine(fleet, duties, store, self.client, session, steps, self.undo,
                                 self.ledger, self.stats, self._settings, on_routing_change)
        self.recovery = CrashRecovery(self.engine, self.undo, self.ledger, self.client, store,
                                      fleet, self._settings)
        self.reality = RealityCheck(fleet, duties, store, self.engine, self.undo, self.marks)
        self.cooldowns = Cooldowns(store.last_failover_times(COOLDOWN_RESULTS),
                                   store.last_failover_times(UNSUCCESSFUL))
        _warn_on_state_rules(config)
        self._paused = store.paused()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        # None while this exporter may act; else why not (a cluster follower, a lost lease)
        self.leading: Callable[[], str | None] = lambda: None
        self.on_reset: Callable[[str], None] = lambda _name: None  # cluster: observers too

    def _settings(self) -> FailoverConfig:
        return self.config.failover

    # --- public state ------------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def automatic(self) -> bool:
        """Whether health events may start failovers now."""
        return (self.config.failover.enabled and not self._paused and not self._stopping
                and self.leading() is None)

    def take_over(self, epoch: int) -> None:
        """A cluster member that just became leader: its fencing epoch, and the pause and
        cooldowns of the facts it loaded from etcd into its store."""
        self.client.epoch = epoch
        self._paused = self.store.paused()
        self.cooldowns = Cooldowns(self.store.last_failover_times(COOLDOWN_RESULTS),
                                   self.store.last_failover_times(UNSUCCESSFUL))
        log.info("fencing epoch %d (cluster leader)", epoch,
                 extra={"event": "fencing_epoch", "epoch": epoch})

    def adopt_paused(self, paused: bool) -> None:
        """A follower learns the leader's pause switch (persisted by the caller)."""
        self._paused = paused

    @property
    def in_progress(self) -> int:
        return self.stats.in_progress

    def running(self) -> list[str]:
        """Masters whose duties are being moved now."""
        return self.engine.running()

    def checkpoint_ts(self, master: str) -> float | None:
        return self.checkpoints.times.get(master)

    def checkpoint_ages(self, now: float | None = None) -> dict[str, float]:
        return self.checkpoints.ages(now)

    def in_maintenance(self) -> list[str]:
        return sorted(rt.name for rt in self.fleet if rt.health.state is State.MAINTENANCE)

    def status(self) -> dict[str, Any]:
        """For the API and status page."""
        return {"enabled": self.config.failover.enabled, "paused": self._paused,
                "dry_run": self.config.failover.dry_run, "in_progress": self.stats.in_progress,
                "running": self.running(), "assignments": self.duties.assignments(),
                "maintenance": self.in_maintenance()}

    # --- lifecycle ---------------------------------------------------------------------------
    def restore(self) -> None:
        """Put masters the store says are in maintenance back into it; called once every
        consumer of the bus is subscribed, so routing learns it too."""
        for name in self.store.maintenance():
            rt = self.fleet.get(name)
            if rt is not None:
                self._publish(rt.health.set_maintenance(True, time.time()))

    async def start(self, recover: bool = True) -> None:
        """Recover an interrupted move (or, ``recover`` off, close it untouched: a cluster
        leader recovers it from etcd), then checkpoint and reconcile every interval."""
        if recover:
            await self.recover_journal()
        else:
            for row in self.store.unfinished_failovers():
                self.ledger.close_unrecoverable(
                    row, "left open by a crash; the cluster leader recovers it from etcd")
        self._loop_task = asyncio.create_task(self._periodic(), name="failover-periodic")

    async def recover_journal(self) -> list[dict[str, Any]]:
        """Close every move a crash left open (see ``recovery.py``); their records."""
        return [dict(record) for record in await self.recovery.recover_all()]

    async def _periodic(self) -> None:
        """Checkpoints every ``checkpoint_interval``. The reconcile every probe interval too,
        so that a duty found unserved is seen to within one probe round; never before every
        master has been probed, and right after that first round, so that a duty table the
        fleet no longer matches (a state file from an earlier run) is corrected before anything
        is done on its word (a queued fence, a failover)."""
        next_checkpoint = 0.0
        while not self._stopping:
            try:
                if time.monotonic() >= next_checkpoint:
                    next_checkpoint = time.monotonic() + self.config.failover.checkpoint_interval
                    await self.checkpoint_round()
                if self.reality.complete() and self.leading() is None:
                    await self.reconcile()
            except Exception:
                log.exception("failover periodic round failed")
            # until the next checkpoint is due, or one probe interval: a long round does not
            # push the next one a whole interval further out
            pause = max(0.05, min(next_checkpoint - time.monotonic(), self.config.probe.interval))
            await (asyncio.sleep(pause) if self.reality.complete()
                   else self.reality.wait_complete(pause))

    def update_config(self, config: Config) -> None:
        """After a reload (the fleet is updated first): new timeouts and switches apply to the
        next step; checkpoints of removed masters are forgotten."""
        self.config = config
        self.client.timeout = config.failover.step_timeout
        names = {m.name for m in config.masters}
        self.checkpoints.forget([n for n in self.checkpoints.times if n not in names])
        _warn_on_state_rules(config)

    async def shutdown(self, deadline: float = 8.0) -> None:
        """Stop automatic work; let moves in flight finish within half of ``deadline``
        seconds, then interrupt them (they roll back); flush notifications."""
        self._stopping = True
        self.undo.hurry = True
        end = time.monotonic() + deadline
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        tasks = self.engine.tasks()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline * 0.5))
            if pending:
                self.engine.interrupt_all("exporter shutting down")
                await asyncio.wait(pending, timeout=max(0.1, end - time.monotonic()))
        await self.notifier.flush(max(0.1, end - time.monotonic()))

    # --- health events -----------------------------------------------------------------------
    async def on_transition(self, t: Transition) -> None:
        """EventBus subscriber: an active master entering failed starts a failover; a master
        returning to serving is kept standby, or gets its duty back with failback auto."""
        rt = self.fleet.get(t.master)
        if rt is None or self._stopping or self.leading() is not None:
            return
        if t.new is State.FAILED and t.old is not State.FAILED:
            if self.duties.role_of(rt.name) == "active":
                await self.auto_failover(t.master, f"health: {t.reason}")
        elif t.new in SERVING and t.old in (State.FAILED, State.RECOVERING):
            await self._on_recovered(rt)

    async def auto_failover(self, master: str, reason: str,
                            unserved: bool | None = None) -> dict[str, Any] | None:
        """The automatic path: honours enabled/pause, single flight and cooldowns (but no
        cooldown holds back a duty nobody serves; ``unserved``: already known)."""
        if self.leading() is not None:
            return None  # a cluster follower: the leader acts on the same verdicts
        if self.engine.is_running(master):
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
        if unserved is None:
            unserved = self.reality.unserved(master)
        cool = self._cooldown_left(master, unserved=unserved)
        if cool is not None:
            scope, left = cool
            return dict(self.ledger.record_only(
                master, "skipped_cooldown", "auto",
                f"{reason}; inside {scope} cooldown ({left:.1f}s left)"))
        try:
            return await self.failover(master, trigger="auto", reason=reason, actor="exporter")
        except FailoverRejected as exc:  # e.g. it is itself mid-takeover: reconcile retries
            log.warning("automatic failover of %s not started: %s", master, exc,
                        extra={"event": "failover_not_started", "master": master})
            return None

    def _cooldown_left(self, master: str, fleet: bool = True,
                       unserved: bool = False) -> tuple[str, float] | None:
        fo = self.config.failover
        return self.cooldowns.left(master, time.time(), fo.cooldown, fo.fleet_cooldown, fleet,
                                   unserved)

    async def _on_recovered(self, rt: MasterRuntime) -> None:
        """What it serves is reconciled first (it may have come back active by its own
        config), then its queued undo calls (checked against the reconciled table), then
        failback."""
        name = rt.name
        await self._reconcile_reality()
        await self.undo.retry_queued(only=name)
        holder = self.duties.assigned_away(name)
        if holder is None:
            return
        decision = self._failback_decision(rt)
        if decision is Failback.NOW:
            with contextlib.suppress(FailoverRejected):
                await self.failback(name, trigger="auto", actor="exporter")
            return
        if decision is Failback.AFTER_COOLDOWN:
            self.store.audit("exporter", "failback_deferred", name,
                             {"reason": "inside cooldown", "holder": holder})
        log.info("master %s is back and stays standby (its duty is held by %s)", name, holder,
                 extra={"event": "recovered_as_standby", "master": name, "holder": holder})

    async def _reconcile_reality(self) -> set[str]:
        """``RealityCheck.reconcile``: a dry run calls no master (it only corrects the table)."""
        fo = self.config.failover
        return await self.reality.reconcile(self.automatic and not fo.dry_run,
                                            fo.enabled and not fo.dry_run)

    def _failback_decision(self, rt: MasterRuntime) -> Failback:
        return failback_decision(
            self.config.failover.failback, self.automatic, self.duties.assigned_away(rt.name),
            rt.health.state in SERVING, self.engine.is_running(rt.name),
            self._cooldown_left(rt.name, fleet=False) is not None)

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
        """Manual reset: clear the health counters, the attempt limit and the master's
        cooldown; if it is serving and its duty is held by a backup, give it back (manual
        failback)."""
        rt = self._known(name)
        self.on_reset(name)
        self._publish(rt.health.reset(time.time()))
        self.cooldowns.clear(name)
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

    async def failover(self, master: str, to: str | None = None, trigger: str = "manual",
                       reason: str = "manual failover", actor: str = "api",
                       allow_state_loss: bool = False) -> dict[str, Any]:
        """Fail ``master`` over (fence first). Manual calls ignore pause and cooldown;
        ``allow_state_loss`` lets it activate a backup without state where
        ``failover.require_state`` would refuse (audited under ``actor``)."""
        self._known(master)
        duties = self.duties.duties_of(master)
        if not duties:
            raise Conflict(f"master {master!r} holds no duties (it is standby)")
        return await self._start(MoveRequest("failover", master, master, tuple(duties), to,
                                             trigger, reason, actor), allow_state_loss)

    async def switchover(self, frm: str, to: str | None = None, actor: str = "api",
                         reason: str = "manual switchover",
                         allow_state_loss: bool = False) -> dict[str, Any]:
        """Graceful: ``to`` is activated before ``frm`` is released. A ``frm`` that is not
        serving cannot hand over gracefully, so that becomes a (fencing) failover, which
        ``allow_state_loss`` lets go on without state."""
        rt = self._known(frm)
        duties = self.duties.duties_of(frm)
        if not duties:
            raise Conflict(f"master {frm!r} holds no duties (it is standby)")
        if rt.health.state not in SERVING:
            return await self.failover(frm, to, "manual", f"{reason} (source {rt.health.state})",
                                       actor, allow_state_loss)
        return await self._start(MoveRequest("switchover", frm, frm, tuple(duties), to,
                                             "manual", reason, actor))

    async def failback(self, name: str, trigger: str = "manual",
                       actor: str = "api") -> dict[str, Any]:
        """``name`` takes its own duty back from its holder (state fetched from the holder)."""
        rt = self._known(name)
        holder = self.duties.assigned_away(name)
        if holder is None:
            raise Conflict(f"master {name!r} already holds its own duty")
        hrt = self.fleet.get(holder)
        if hrt is None or hrt.health.state not in SERVING or rt.health.state not in SERVING:
            raise Conflict(f"failback of {name!r} needs it and its holder {holder!r} serving")
        return await self._start(MoveRequest("failback", name, holder, (name,), name, trigger,
                                             f"failback of {name} from {holder}", actor))

    async def _start(self, req: MoveRequest, allow_state_loss: bool = False) -> dict[str, Any]:
        """Single flight, a valid ``to``, then a dry run's record or the move's."""
        if self._stopping:
            raise Unavailable("exporter is shutting down")
        if self.engine.is_running(req.master) or self.engine.is_running(req.source):
            raise Conflict(f"a failover of {req.master!r} is already running")
        if req.master in self.engine.busy:
            raise Conflict(f"master {req.master!r} is {self.engine.busy[req.master]}")
        if req.to is not None:
            self._known(req.to)
            if req.to == req.source:
                raise InvalidRequest("'to' must differ from the master failed from")
            if req.kind != "failback":
                self.engine.rank(req.master, req.to, (req.source,))  # Conflict saying why not
        if self.config.failover.dry_run:
            return self._dry_run(req)
        now = time.time()
        self.cooldowns.mark(req.master, now)
        task = self.engine.launch(req, now, allow_state_loss)

        def settle(done: asyncio.Task[FailoverRecord]) -> None:
            if not done.cancelled() and done.exception() is None:
                self.cooldowns.settle(req.master, done.result()["result"])

        task.add_done_callback(settle)
        return dict(await asyncio.shield(task))

    def _dry_run(self, req: MoveRequest) -> dict[str, Any]:
        """Record exactly what would be done, touch nothing (no master is called)."""
        t0 = time.perf_counter()
        fo = self.config.failover
        ranking = (self.engine.rank(req.master, req.to, (req.source,))
                   if req.kind != "failback" else None)
        order = ([r.name for r in ranking.order[:fo.max_candidates]] if ranking
                 else [req.master])
        steps = planned_steps(req, order, fo.pre_hook.url if fo.pre_hook else None,
                              self.checkpoints.times.get(req.source))
        note = "" if order else "; would fail: no eligible backup"
        record = self.ledger.record_only(
            req.master, "dry_run", req.trigger, f"{req.reason}{note}",
            backup=order[0] if order else None, steps=steps,
            candidates=ranking.candidates if ranking else [], kind=req.kind,
            duration=time.perf_counter() - t0)
        self.cooldowns.mark(req.master, record["started"])
        self.cooldowns.settle(req.master, "dry_run")
        return dict(record)

    # --- periodic work -----------------------------------------------------------------------
    async def checkpoint_round(self) -> dict[str, bool]:
        """Pull GET /state from every serving active master not mid-move; keep the latest."""
        busy = self.engine.involved()
        active = [rt for rt in self.fleet if self.duties.role_of(rt.name) == "active"]
        return await self.checkpoints.round(active, self.config.failover.step_timeout,
                                            skip=busy.__contains__)

    async def reconcile(self) -> None:
        """Reconcile the duty table to what the masters serve (a second holder is stopped even
        while paused), retry queued undo calls (each checked against the reconciled table),
        and do the automatic work a cooldown or a failed attempt left: the duties of a failed
        holder nobody serves are failed over now, those of an active master still failed once
        its cooldown is over; a recovered master with failback auto gets its duty back."""
        gone = await self._reconcile_reality()
        await self.undo.retry_queued()
        if not self.automatic:
            return
        serving = self.reality.serving()
        for rt in self.fleet:
            name = rt.name
            if self.engine.is_running(name):
                continue
            if (rt.health.state is State.FAILED or name in gone) and self.duties.duties_of(name):
                unserved = self.reality.unserved(name, serving)
                if self._cooldown_left(name, unserved=unserved) is None:
                    await self.auto_failover(name, "its duties are served by nobody" if unserved
                                             else "still failed after cooldown; retrying",
                                             unserved)
            elif self._failback_decision(rt) is Failback.NOW:
                with contextlib.suppress(FailoverRejected):
                    await self.failback(name, trigger="auto", actor="exporter")


def _warn_on_state_rules(config: Config) -> None:
    """A ``max_checkpoint_age`` shorter than a checkpoint is old when a failure is detected
    refuses failovers from a checkpoint that are on time: said once at start and reload."""
    fo, probe = config.failover, config.probe
    limit = fo.max_checkpoint_age
    detect = probe.failure_threshold * probe.interval * (1 + probe.jitter) + probe.timeout
    if limit is not None and limit < fo.checkpoint_interval + detect:
        log.warning("failover.max_checkpoint_age (%gs) is shorter than checkpoint_interval plus "
                    "the detection time (%.1fs): failovers from a checkpoint may be refused",
                    limit, fo.checkpoint_interval + detect,
                    extra={"event": "config_warning"})
