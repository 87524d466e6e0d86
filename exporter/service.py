"""The running exporter: wires config, fleet, probes, events, routing and failover.

One asyncio loop owns everything. Data flows one way: a probe's outcome is folded into its
master's record (``MasterRuntime.apply``), and what changed goes out on the event bus, the
only input of routing and failover. Every consumer subscribes in ``__init__``; state restored
from the store is published in ``start``, after the wiring, so nobody misses it. The HTTP
surface lives in ``exporter.web`` and reads this object; nothing here imports it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import aiohttp

from exporter.cluster.facts import Owners
from exporter.cluster.node import ClusterNode
from exporter.cluster.replicated import ReplicatedStore
from exporter.config import Config, ConfigError, load_config, read_token
from exporter.failover import DutyTable, FailoverManager
from exporter.fleet import (
    EventBus,
    Fleet,
    MasterRuntime,
    Outcome,
    RoleChanged,
    Sample,
    Transition,
    log_transition,
)
from exporter.metrics import (
    DutyStatus,
    ExporterMetrics,
    FleetCollector,
    duty_status,
    health_score,
)
from exporter.metrics.cluster import ClusterCollector
from exporter.probing.prober import Prober, new_session
from exporter.routing import Router
from exporter.store import Store

log = logging.getLogger(__name__)


class Service:
    """Owns the components for the lifetime of one exporter process."""

    def __init__(
        self,
        config: Config,
        config_path: str | Path | None = None,
        token: str | None = None,
        insecure_no_auth: bool = False,
    ) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self.token = token
        self.insecure_no_auth = insecure_no_auth
        self.started_at = time.time()
        self.bus = EventBus()
        self.fleet = Fleet(config.masters, config.probe, config.failover.max_recovery_attempts)
        self.store = (ReplicatedStore(config.state_path) if config.cluster is not None
                      else Store(config.state_path))
        self.duties = DutyTable(config.masters, self.store, self.bus.publish)
        self.router = Router(config.balancing, config.masters)
        saved_strategy = self.store.flag("strategy")
        if saved_strategy and saved_strategy != config.balancing.strategy:
            self.router.set_strategy(saved_strategy)  # a run-time choice survives restarts
            log.info("routing strategy %s restored from the store", saved_strategy)
        self.failover: FailoverManager | None = None
        self.cluster: ClusterNode | None = None  # set by join_cluster in cluster mode
        self.metrics = ExporterMetrics(
            FleetCollector(
                fleet=self.exported_masters,
                weights=self.routing_weights,
                decisions=lambda: self.router.decisions,
                checkpoint_ages=self._checkpoint_ages,
                recovery_timeout=lambda: self.config.failover.recovery_timeout,
                role_of=self.duties.role_of,
            ),
            duties=self.duty_status,
        )
        m = self.metrics
        m.config_reload_success.set(1)
        m.config_reload_timestamp.set(self.started_at)
        m.fleet_health_score.set_function(lambda: self.fleet_health_score(m.duty_status()))
        m.add_owned_counter(
            "ha_state_store_errors_total", lambda: getattr(self.store, "errors", None)
        )
        m.add_owned_counter("ha_master_checkpoint_failures_total", self._checkpoint_failures)
        m.add_owned_counter(  # FailoverStats.refusals; none before the manager exists
            "ha_failover_refusals_total",
            lambda: self.failover.stats.refusals if self.failover is not None else None,
        )
        m.add_owned_counter(  # Notifier.failures, by kind; none before the manager exists
            "ha_notification_failures_total",
            lambda: self.failover.notifier.failures if self.failover is not None else None,
        )
        m.add_probe_engine(lambda: self.prober)
        m.add_collector(ClusterCollector(
            lambda: self.cluster.figures() if self.cluster is not None else None), "cluster")
        m.load_distribution_quality.set_function(self.router.distribution_quality)
        m.failover_in_progress.set_function(
            lambda: self.failover.in_progress if self.failover else 0
        )
        m.failover_paused.set_function(
            lambda: 0 if self.failover is not None and self.failover.automatic else 1
        )
        self.session: aiohttp.ClientSession | None = None
        self.prober: Prober | None = None
        self._reload_lock = asyncio.Lock()
        self._rebalance_task: asyncio.Task[None] | None = None
        bus = self.bus
        bus.subscribe(Transition, log_transition)
        bus.subscribe(Transition, self.router.on_transition)
        bus.subscribe(Sample, self.router.on_sample)
        bus.subscribe(RoleChanged, self.router.on_role)
        bus.subscribe(RoleChanged, _log_role)

    # --- what the API, status page and metrics read ----------------------------------------
    def exported_masters(self) -> Iterable[MasterRuntime]:
        """The masters whose per-master series this replica exports: all of them, or in
        cluster mode its own shard (each master's series come from its observers)."""
        node = self.cluster
        if node is None:  # a single node, or a replica that has not joined yet: no shard
            return self.fleet if self.config.cluster is None else []
        mine = node.observing.mine
        return [rt for rt in self.fleet if rt.name in mine]

    def configured_duties(self) -> list[str]:
        """Every duty: one per master configured ``role: active``, named after it."""
        return [m.name for m in self.config.masters if m.role == "active"]

    def duty_status(self) -> DutyStatus:
        """Who serves each duty, as the masters' last answers say (not the duty table)."""
        return duty_status(self.fleet, self.configured_duties())

    def fleet_health_score(self, duties: DutyStatus | None = None) -> float:
        """``ha_fleet_health_score``: the lower of the masters' score and the share of duties
        served by exactly one master (``exporter.metrics.health_score``), so a fleet of
        healthy masters that leaves a duty unserved does not read 100."""
        status = self.duty_status() if duties is None else duties
        return health_score(self.fleet.health_score(), status)

    def routing_weights(self) -> dict[str, float]:
        return self.router.effective_weights()

    def strategy(self) -> str:
        return self.router.strategy

    def failover_mode(self) -> str:
        fo = self.failover
        if fo is None or not self.config.failover.enabled:
            return "disabled"
        if fo.paused:
            return "paused"
        return "dry run" if self.config.failover.dry_run else "automatic"

    def recent_failovers(self, limit: int) -> list[dict]:
        return self.store.list_failovers(limit=limit, brief=True)

    def _checkpoint_ages(self, now: float) -> dict[str, float]:
        return self.failover.checkpoint_ages(now) if self.failover else {}

    def _checkpoint_failures(self) -> Mapping[tuple[str, str], int] | None:
        """The checkpointer's failure counts; None before the failover manager exists."""
        if self.failover is None:
            return None
        failures: Mapping[tuple[str, str], int] | None = getattr(
            self.failover.checkpoints, "failures", None
        )
        return failures

    def _on_routing_change(self, failed: str, backup: str | None) -> None:
        log.info(
            "routing updated: duties of %s now with %s",
            failed,
            backup or "nobody",
            extra={"event": "routing_change", "master": failed, "backup": backup},
        )

    def _on_failover_result(
        self, master: str, result: str, duration: float | None, state_source: str
    ) -> None:
        self.metrics.failovers.labels(master, result, state_source).inc()
        if duration is not None:
            self.metrics.failover_duration.observe(duration)

    def set_strategy(self, name: str, actor: str) -> None:
        """Run-time strategy switch, persisted so a restart keeps it."""
        old = self.router.strategy
        self.router.set_strategy(name)
        self.router.warm()
        self.store.set_flag("strategy", name)
        self.store.audit(actor, "strategy", None, {"from": old, "to": name})
        log.info(
            "routing strategy %s -> %s by %s",
            old,
            name,
            actor,
            extra={"event": "strategy", "from": old, "to": name},
        )

    def on_ejected(self, master: str) -> None:
        self.store.audit("exporter", "ejected", master, {"reason": "consecutive failed reports"})
        log.warning(
            "master %s ejected from rotation after failed routed messages",
            master,
            extra={"event": "ejected", "master": master},
        )

    def rebalance(self) -> None:
        """One evaluation of load imbalance; every weight shift is logged, audited, counted."""
        for ev in self.router.evaluate_rebalance():
            self.metrics.rebalances.labels(ev.reason).inc()
            detail = {"old_factor": ev.old_factor, "new_factor": ev.new_factor, "ratio": ev.ratio}
            self.store.audit("exporter", f"rebalance_{ev.reason}", ev.master, detail)
            log.info(
                "rebalance (%s): %s weight factor %.2f -> %.2f (imbalance ratio %.2f)",
                ev.reason,
                ev.master,
                ev.old_factor,
                ev.new_factor,
                ev.ratio,
                extra={"event": "rebalance", "master": ev.master, "reason": ev.reason},
            )

    async def _rebalance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.probe.interval)
            try:
                if self.cluster is None or self.cluster.not_leading() is None:
                    self.rebalance()
            except Exception:
                log.exception("rebalance evaluation failed")

    # --- probe results -----------------------------------------------------------------
    def on_probe(self, rt: MasterRuntime, outcome: Outcome) -> None:
        """One probe: folded into the record, then its consequences published. A cluster
        member's probe is its own verdict; the record's health follows the quorum."""
        if self.cluster is not None:
            self.cluster.observing.observe(rt, outcome, self.config.probe,
                                           self.config.failover.max_recovery_attempts)
            return
        transition = rt.apply(outcome, time.time())
        if not rt.up:
            log.debug("probe of %s failed: %s", rt.name, rt.last_error)
        self.bus.publish(Sample(rt.name, rt.up, rt.health.state, rt.queue_length))
        if transition is not None:
            self.bus.publish(transition)

    # --- lifecycle -------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.prober is not None and self.prober.first_round_done.is_set()

    @property
    def not_ready_reason(self) -> str | None:
        """Why /readyz answers 503, None when ready: the first probe round is not done, or the
        state store fails (failover goes on, but what it records is only in memory: a restart
        or a second replica must not be routed to as if all were well)."""
        if not self.ready:
            return "first probe round not done yet"
        if self.cluster is not None and (why := self.cluster.not_ready()) is not None:
            return why
        failing = self.store.failing
        return f"state store failing: {failing}" if failing is not None else None

    async def start(self) -> None:
        """Open the session, restore what the store remembers, recover an interrupted
        failover, then start probing and rebalancing."""
        self.session = new_session(self.config.probe)
        self.prober = Prober(self.fleet, self.config.probe, self.session, self.on_probe)
        self.failover = FailoverManager(
            self.config,
            self.fleet,
            self.store,
            self.duties,
            self.session,
            on_routing_change=self._on_routing_change,
            publish=self.bus.publish,
        )
        self.failover.stats.source_listeners.append(self._on_failover_result)
        self.bus.subscribe(Transition, self.failover.on_transition)
        self.duties.restore()
        self.failover.restore()
        # completes or rolls back a failover a crash interrupted; a cluster member leaves that
        # to the leader, which adopts the move from etcd
        await self.failover.start(recover=self.config.cluster is None)
        self.router.warm()
        if self.config.cluster is None:
            self.prober.start()
        else:  # probes and acts once it is a member (join_cluster)
            self.failover.leading = lambda: "not a cluster member yet"
        self._rebalance_task = asyncio.create_task(self._rebalance_loop(), name="rebalance")
        log.info("ha-exporter started with %d masters", len(self.fleet))

    async def join_cluster(self, url: str) -> None:
        """Cluster mode, once the API listens at ``url``: register, probe the shard, and
        act when leading (see exporter.cluster)."""
        cfg = self.config.cluster
        if cfg is None or self.failover is None or self.prober is None:
            return
        assert isinstance(self.store, ReplicatedStore)
        member = cfg.member or url.split("://", 1)[-1]
        owners = Owners(assignments=self.duties.reload, maintenance=self._take_maintenance,
                        paused=self.failover.adopt_paused, strategy=self._take_strategy,
                        reset=lambda master: node.observing.reset(master))
        node = ClusterNode(cfg, member, cfg.url or url, self.fleet, self.store, owners,
                           self.bus.publish)
        node.attach(self.failover, self.prober)
        self.prober.name_observer(member)
        self.cluster = node
        node.start()
        self.prober.start()
        log.info("cluster member %s at %s (etcd %s, prefix %s)", member, cfg.url or url,
                 ", ".join(cfg.etcd.endpoints), cfg.etcd.prefix)

    def _take_maintenance(self, master: str, on: bool) -> None:
        rt = self.fleet.get(master)
        if rt is not None and (t := rt.health.set_maintenance(on, time.time())) is not None:
            self.bus.publish(t)

    def _take_strategy(self, name: str | None) -> None:
        self.router.set_strategy(name or self.config.balancing.strategy)
        self.router.warm()

    async def stop(self) -> None:
        """Stop probing and rebalancing, let failovers finish or roll back, flush events.
        ``close`` releases the session and the store afterwards."""
        if self.cluster is not None:
            await self.cluster.stop()
        if self.prober is not None:
            await self.prober.stop()
        if self._rebalance_task is not None:
            self._rebalance_task.cancel()
        if self.failover is not None:
            await self.failover.shutdown(deadline=7.0)
        await self.bus.drain()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        self.store.close()
        log.info("ha-exporter stopped")

    # --- reload ------------------------------------------------------------------------
    async def reload(self) -> tuple[bool, list[str]]:
        """Re-read the config file; a bad file is rejected and the running config kept."""
        async with self._reload_lock:
            if self.config_path is None:
                return False, ["(file): the exporter was started without a config file"]
            try:
                new = load_config(self.config_path)
                token = read_token(new.api)
            except ConfigError as exc:
                return self._reload_rejected(exc.errors)
            if new.cluster != self.config.cluster:  # membership is fixed for a process's life
                return self._reload_rejected(
                    ["cluster: the cluster section cannot change on reload; restart the replica"])
            self.apply_config(new)
            if token is not None:  # a reload never drops the token the service started with
                self.token = token
            self.metrics.config_reload_success.set(1)
            self.metrics.config_reload_timestamp.set(time.time())
            return True, []

    def _reload_rejected(self, errors: list[str]) -> tuple[bool, list[str]]:
        self.metrics.config_reload_success.set(0)
        for err in errors:
            log.error("config reload rejected, keeping the running config: %s", err)
        return False, errors

    def apply_config(self, new: Config) -> None:
        added, removed, changed = self.fleet.update(
            new.masters, new.probe, new.failover.max_recovery_attempts
        )
        if self.prober is not None:
            self.prober.update(new.probe)
        if new.balancing.strategy != self.config.balancing.strategy:
            self.store.set_flag("strategy", None)  # the file's new choice wins over the API's
        self.config = new
        self.router.update_config(new.balancing, new.masters)
        self.duties.update_config(new.masters)
        if self.failover is not None:
            self.failover.update_config(new)
        if self.cluster is not None:  # masters added or removed: the shards are drawn again
            self.cluster.reshard()
        log.info(
            "config reloaded: %d masters (added %s, removed %s, changed %s)",
            len(self.fleet),
            added or "none",
            removed or "none",
            changed or "none",
        )


def _log_role(e: RoleChanged) -> None:
    log.info("master %s is now %s (was %s)", e.master, e.new, e.old,
             extra={"event": "role", "master": e.master, "from": e.old, "to": e.new})
