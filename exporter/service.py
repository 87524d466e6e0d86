"""The running exporter: wires config, fleet, probes, health events, routing, failover, web.

One asyncio loop owns everything, so components talk by plain calls and the EventBus; the
only shared mutable state is the fleet records: the probe handler writes their figures and
health, failover writes their roles, and everything else only reads them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from exporter.config import Config, ConfigError, load_config, read_token
from exporter.failover.manager import FailoverManager
from exporter.fleet.health import RESULTS, EventBus, Result, Transition
from exporter.fleet.runtime import Fleet, MasterRuntime
from exporter.metrics import ExporterMetrics, FleetCollector
from exporter.probing.prober import Outcome, Prober, new_session
from exporter.routing.router import Router
from exporter.store.sqlite import Store
from exporter.web import failover as api_failover
from exporter.web import routing as api_routing
from exporter.web import statuspage

log = logging.getLogger(__name__)
_RESULT_INDEX = {r: i for i, r in enumerate(RESULTS)}


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
        self.store = Store(config.state_path)
        self.router = Router(config.balancing, config.masters)
        saved_strategy = self.store.flag("strategy")
        if saved_strategy and saved_strategy != config.balancing.strategy:
            self.router.set_strategy(saved_strategy)  # a run-time choice survives restarts
            log.info("routing strategy %s restored from the store", saved_strategy)
        self.failover: FailoverManager | None = None
        self.metrics = ExporterMetrics(
            FleetCollector(
                fleet=lambda: self.fleet,
                weights=self.routing_weights,
                decisions=lambda: self.router.decisions,
                checkpoint_ages=self._checkpoint_ages,
                recovery_timeout=lambda: self.config.failover.recovery_timeout,
            )
        )
        m = self.metrics
        m.config_reload_success.set(1)
        m.config_reload_timestamp.set(self.started_at)
        m.fleet_health_score.set_function(self.fleet_health_score)
        m.load_distribution_quality.set_function(self.router.distribution_quality)
        m.failover_in_progress.set_function(
            lambda: self.failover.in_progress if self.failover else 0
        )
        m.failover_paused.set_function(
            lambda: 0 if self.failover is not None and self.failover.automatic else 1
        )
        self.session: aiohttp.ClientSession | None = None
        self.prober: Prober | None = None
        self.runner: web.AppRunner | None = None
        self.bound_port: int | None = None
        self._reload_lock = asyncio.Lock()
        self._rebalance_task: asyncio.Task[None] | None = None

    # --- what the API, status page and metrics read ----------------------------------------
    def fleet_health_score(self) -> float:
        return self.fleet.health_score()

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

    def route_modules(self) -> list[Callable[[web.Application], None]]:
        return [statuspage.add_routes, api_routing.add_routes, api_failover.add_routes]

    def sync_roles(self) -> None:
        """Failover changes roles in the fleet records; routing follows them."""
        for rt in self.fleet:
            self.router.set_role(rt.name, rt.role)

    def _on_routing_change(self, failed: str, backup: str | None) -> None:
        self.sync_roles()
        log.info(
            "routing updated: duties of %s now with %s",
            failed,
            backup or "nobody",
            extra={"event": "routing_change", "master": failed, "backup": backup},
        )

    def _on_failover_result(self, master: str, result: str, duration: float | None) -> None:
        self.metrics.failovers.labels(master, result).inc()
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
                self.rebalance()
            except Exception:
                log.exception("rebalance evaluation failed")

    # --- probe results -----------------------------------------------------------------
    def on_probe(self, rt: MasterRuntime, outcome: Outcome) -> None:
        """Fold one probe into the master's record and its health machine."""
        now = time.time()
        rt.last_probe_wall = now
        rt.last_latency = outcome.latency
        rt.record_latency(outcome.latency)
        rt.result_counts[_RESULT_INDEX[outcome.result]] += 1
        ok = outcome.result is Result.SUCCESS
        rt.up = ok
        rt.last_status = str(outcome.result)
        rt.last_error = "" if ok else outcome.detail
        payload = outcome.payload
        if payload is not None:
            rt.queue_length = payload.get("queue_length", rt.queue_length)
            rt.active_messages = payload.get("active_messages", rt.active_messages)
            rt.cpu_percent = payload.get("cpu_percent", rt.cpu_percent)
            rt.memory_percent = payload.get("memory_percent", rt.memory_percent)
            active = payload.get("active")
            rt.reported_active = active if isinstance(active, bool) else None
        else:
            rt.reported_active = None  # no answer is no evidence that it is (still) active
        reason = str(outcome.result) + (f": {outcome.detail}" if outcome.detail else "")
        transition = rt.health.observe(ok, outcome.degraded, reason, now)
        if not ok:
            log.debug("probe of %s failed: %s", rt.name, reason)
        router = self.router
        if ok or transition is not None:  # a failed probe under the threshold must not
            router.set_state(rt.name, rt.health.state)  # re-admit an ejected master
        router.set_load(rt.name, rt.queue_length)
        if transition is not None:
            self.bus.publish(transition)

    def publish(self, transition: Transition | None) -> None:
        if transition is not None:
            self.bus.publish(transition)

    # --- lifecycle -------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.prober is not None and self.prober.first_round_done.is_set()

    async def start(self, host: str | None = None, port: int | None = None) -> None:
        from exporter.web.app import create_app  # web imports service types

        self.session = new_session(self.config.probe)
        self.prober = Prober(self.fleet, self.config.probe, self.session, self.on_probe)
        self.failover = FailoverManager(
            self.config,
            self.fleet,
            self.store,
            self.session,
            on_routing_change=self._on_routing_change,
            publish=self.publish,
        )
        self.failover.stats.listeners.append(self._on_failover_result)
        self.bus.subscribe(self._on_transition)
        self.bus.subscribe(self.failover.on_transition)
        self.sync_roles()
        await self.failover.start()  # completes or rolls back a failover a crash interrupted
        self.sync_roles()
        self.router.warm()
        self.prober.start()
        self._rebalance_task = asyncio.create_task(self._rebalance_loop(), name="rebalance")
        self.runner = web.AppRunner(
            create_app(self), access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        await self.runner.setup()
        host = host or self.config.listen.host
        site = web.TCPSite(self.runner, host, self.config.listen.port if port is None else port)
        await site.start()
        server = site._server  # the only way to learn an ephemeral port (port=0 in tests)
        sockets = getattr(server, "sockets", None) or []
        self.bound_port = sockets[0].getsockname()[1] if sockets else port
        log.info(
            "ha-exporter listening on http://%s:%s with %d masters",
            host,
            self.bound_port,
            len(self.fleet),
        )

    def _on_transition(self, t: Transition) -> None:
        self.router.set_state(t.master, t.new)

    async def stop(self) -> None:
        """Clean shutdown: stop probing, finish or roll back failovers, flush, close."""
        if self.prober is not None:
            await self.prober.stop()
        if self._rebalance_task is not None:
            self._rebalance_task.cancel()
        if self.failover is not None:
            await self.failover.shutdown(deadline=7.0)
        await self.bus.drain()
        if self.runner is not None:
            await self.runner.cleanup()
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
                self.metrics.config_reload_success.set(0)
                for err in exc.errors:
                    log.error("config reload rejected, keeping the running config: %s", err)
                return False, exc.errors
            self.apply_config(new)
            if token is not None:  # a reload never drops the token the service started with
                self.token = token
            self.metrics.config_reload_success.set(1)
            self.metrics.config_reload_timestamp.set(time.time())
            return True, []

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
        if self.failover is not None:
            self.failover.update_config(new)
        self.sync_roles()
        log.info(
            "config reloaded: %d masters (added %s, removed %s, changed %s)",
            len(self.fleet),
            added or "none",
            removed or "none",
            changed or "none",
        )
