"""The running exporter: wires config, fleet, probes, health events, routing, failover, web.

One asyncio loop owns everything, so components talk by plain calls and the EventBus; the
only shared mutable state is the fleet records, written by the probe handler alone.
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
from exporter.fleet import Fleet, MasterRuntime
from exporter.health import RESULTS, EventBus, Result, Transition
from exporter.metrics import ExporterMetrics, FleetCollector
from exporter.probing import Outcome, Prober, new_session

log = logging.getLogger("exporter.service")
_RESULT_INDEX = {r: i for i, r in enumerate(RESULTS)}


class Service:
    """Owns the components for the lifetime of one exporter process."""

    def __init__(self, config: Config, config_path: str | Path | None = None,
                 token: str | None = None, insecure_no_auth: bool = False) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self.token = token
        self.insecure_no_auth = insecure_no_auth
        self.started_at = time.time()
        self.bus = EventBus()
        self.fleet = Fleet(config.masters, config.probe, config.failover.max_recovery_attempts)
        self.metrics = ExporterMetrics(FleetCollector(
            fleet=lambda: self.fleet,
            weights=self._weights,
            decisions=self._decisions,
            checkpoint_ages=self._checkpoint_ages,
            recovery_timeout=lambda: self.config.failover.recovery_timeout,
        ))
        self.metrics.config_reload_success.set(1)
        self.metrics.config_reload_timestamp.set(self.started_at)
        self.metrics.fleet_health_score.set_function(self.fleet_health_score)
        self.session: aiohttp.ClientSession | None = None
        self.prober: Prober | None = None
        self.runner: web.AppRunner | None = None
        self.bound_port: int | None = None
        self._reload_lock = asyncio.Lock()

    # --- metric sources (overridden as routing and failover are wired in) -------------
    def fleet_health_score(self) -> float:
        return self.fleet.health_score()

    def _weights(self) -> dict[str, float]:
        return {}

    def _decisions(self) -> dict[tuple[str, str], int]:
        return {}

    def _checkpoint_ages(self, now: float) -> dict[str, float]:
        return {}

    def route_modules(self) -> list[Callable[[web.Application], None]]:
        """Extra route groups (status page, routing, failover) added to the web app."""
        return []

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
        reason = str(outcome.result) + (f": {outcome.detail}" if outcome.detail else "")
        transition = rt.health.observe(ok, outcome.degraded, reason, now)
        if not ok:
            log.debug("probe of %s failed: %s", rt.name, reason)
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
        from exporter.web import create_app  # web imports service types

        self.session = new_session(self.config.probe)
        self.prober = Prober(self.fleet, self.config.probe, self.session, self.on_probe)
        await self.start_components()
        self.prober.start()
        self.runner = web.AppRunner(create_app(self), access_log=None, handle_signals=False,
                                    shutdown_timeout=2.0)
        await self.runner.setup()
        host = host or self.config.listen.host
        site = web.TCPSite(self.runner, host, self.config.listen.port if port is None else port)
        await site.start()
        server = site._server  # noqa: SLF001 - the only way to learn an ephemeral port
        sockets = getattr(server, "sockets", None) or []
        self.bound_port = sockets[0].getsockname()[1] if sockets else port
        log.info("ha-exporter listening on http://%s:%s with %d masters", host, self.bound_port,
                 len(self.fleet))

    async def start_components(self) -> None:
        """Hook for routing, store and failover (they need the session and the loop)."""

    async def stop(self) -> None:
        """Clean shutdown: stop probing, finish or roll back failovers, flush, close."""
        if self.prober is not None:
            await self.prober.stop()
        await self.stop_components()
        await self.bus.drain()
        if self.runner is not None:
            await self.runner.cleanup()
        if self.session is not None:
            await self.session.close()
        log.info("ha-exporter stopped")

    async def stop_components(self) -> None:
        """Hook for failover/store shutdown."""

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
            new.masters, new.probe, new.failover.max_recovery_attempts)
        if self.prober is not None:
            self.prober.update(new.probe)
        self.config = new
        log.info("config reloaded: %d masters (added %s, removed %s, changed %s)",
                 len(self.fleet), added or "none", removed or "none", changed or "none")
