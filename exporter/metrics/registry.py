"""One scrape of /metrics: the fleet-level registry, then the per-master and duty families.

Fleet-level metrics are ordinary prometheus_client metrics in a private registry, together
with the process and platform collectors and the probe engine's lateness; every collector is
isolated, so a failing one loses only its own families. The per-master families
(``FleetCollector``) and the duty families are written as text after the registry's. The
classic text format 0.0.4 is served by default, OpenMetrics 1.0 when the Accept header asks.

A scrape is a sequence of text pieces (``chunks``): /metrics streams them (``stream``), writing
each out as it comes and handing the event loop back every ``SLICE`` seconds, so that a scrape
of 10,000 masters never holds the probes' schedule for long nor keeps its body in memory.
``render`` joins them, for tests and tools.

The duty status is computed once per scrape and shared by the duty families and the
``ha_fleet_health_score`` callback (``duty_status()``), so a scrape costs one pass over the
fleet for duties and nothing is kept per probe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Sequence
from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.failover.moves import DURATION_BUCKETS
from exporter.metrics.collectors import (
    CallbackGauge,
    CounterSource,
    EngineSource,
    Isolated,
    MappingCounter,
    ProbeEngineCollector,
)
from exporter.metrics.duties import DutyStatus, iter_duties
from exporter.metrics.exposition import OM_CONTENT_TYPE, TEXT_CONTENT_TYPE
from exporter.metrics.masters import FleetCollector

log = logging.getLogger(__name__)

C = TypeVar("C", bound=Collector)

#: Counters whose counts another component keeps and /metrics only reads: name -> (HELP,
#: labels). The owner's mapping is keyed by the label value, or a tuple of them.
OWNED_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ha_state_store_errors_total": (
        "Reads or writes of the state store that failed, by operation.",
        ("op",),
    ),
    "ha_master_checkpoint_failures_total": (
        "State checkpoints of a master that could not be taken, by reason.",
        ("master", "reason"),
    ),
    "ha_failover_refusals_total": (
        "Failovers away from a master refused for want of state, by the rule that refused "
        "them (require_state, max_checkpoint_age).",
        ("master", "rule"),
    ),
    "ha_notification_failures_total": (
        "Notifications of finished moves that could not be delivered, by kind (post_hook, "
        "alertmanager).",
        ("kind",),
    ),
}

#: A streamed scrape hands the event loop back at the first piece boundary after this long
#: (seconds): under the probe scheduler's 5 ms tick.
SLICE = 0.002
#: A streamed scrape writes out what it holds once it holds this many characters.
WRITE_SIZE = 64 * 1024

HEALTH_SCORE_HELP = (
    "0..100: the lower of two shares: masters serving (maintenance excluded, degraded count "
    "half) and duties served by exactly one master (an unserved or split duty is an outage)."
)


class ExporterMetrics:
    """The exporter's own registry (fleet-level metrics), the per-master collector and, with
    a ``duties`` source, the duty families."""

    def __init__(
        self, collector: FleetCollector, duties: Callable[[], DutyStatus] | None = None
    ) -> None:
        self.collector = collector
        self.errors = collector.errors
        self._duties = duties
        self._scrape: DutyStatus | Exception | None = None  # set only while rendering
        self.registry = CollectorRegistry(auto_describe=True)
        self._collectors: list[Isolated] = []  # the registry's, in its order
        self.add_collector(ProcessCollector(registry=None), "process")
        self.add_collector(PlatformCollector(registry=None), "platform")
        self.build_info = self._gauge(
            "ha_build_info", "Version of the running exporter; always 1.", ["version"]
        )
        self.build_info.labels(__version__).set(1)
        self.config_reload_success = self._gauge(
            "ha_config_last_reload_success", "1 if the last config (re)load succeeded."
        )
        self.config_reload_timestamp = self._gauge(
            "ha_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config (re)load.",
        )
        self.fleet_health_score = self._gauge("ha_fleet_health_score", HEALTH_SCORE_HELP)
        self.load_distribution_quality = self._gauge(
            "ha_load_distribution_quality",
            "0..100: how evenly queue per unit of weight is spread over routed masters.",
        )
        self.failovers = self.add_collector(
            Counter(
                "ha_failovers_total",
                "Failovers by the master failed away from, result, and where the state the "
                "backup got came from (live, checkpoint, none).",
                ["master", "result", "state_source"],
                registry=None,
            ),
            "ha_failovers_total",
        )
        self.failover_duration = self.add_collector(
            Histogram(
                "ha_failover_duration_seconds",
                "Time from failover start to its final result.",
                buckets=DURATION_BUCKETS,
                registry=None,
            ),
            "ha_failover_duration_seconds",
        )
        self.failover_in_progress = self._gauge("ha_failover_in_progress", "Failovers running now.")
        self.failover_paused = self._gauge(
            "ha_failover_paused", "1 while automatic failover is paused or disabled."
        )
        self.rebalances = self.add_collector(
            Counter("ha_rebalances_total", "Weight shifts by reason.", ["reason"], registry=None),
            "ha_rebalances_total",
        )

    def add_collector(self, collector: C, name: str) -> C:
        """Register ``collector``, isolated: if it fails, only its own families are lost."""
        isolated = Isolated(collector, name, self.errors)
        self.registry.register(isolated)
        self._collectors.append(isolated)
        return collector

    def add_counter(
        self, name: str, help_text: str, labels: Sequence[str], source: CounterSource
    ) -> MappingCounter:
        """A counter family read from ``source`` at every scrape (see ``MappingCounter``)."""
        counter = MappingCounter(name, help_text, labels, source, self.errors)
        return self.add_collector(counter, name)

    def add_owned_counter(self, name: str, source: CounterSource) -> MappingCounter:
        """One of ``OWNED_COUNTERS``, read from its owner's ``source``."""
        help_text, labels = OWNED_COUNTERS[name]
        return self.add_counter(name, help_text, labels, source)

    def _gauge(self, name: str, help_text: str, labels: Iterable[str] = ()) -> CallbackGauge:
        gauge = CallbackGauge(name, help_text, labels, registry=None)
        gauge.errors = self.errors
        return self.add_collector(gauge, name)

    def duty_status(self) -> DutyStatus:
        """The duty status of the scrape being rendered (computed once for all its readers),
        or a fresh one outside a scrape; raises what the source raised."""
        scrape = self._scrape
        if isinstance(scrape, Exception):
            raise scrape
        if scrape is not None:
            return scrape
        return self._duties() if self._duties is not None else DutyStatus({})

    def add_probe_engine(self, source: EngineSource) -> ProbeEngineCollector:
        """The probe engine's lateness (``ha_probe_schedule_lag_seconds``,
        ``ha_probe_rounds_skipped_total``), read from what ``source`` returns at each scrape:
        the prober, or None before it exists."""
        engine = ProbeEngineCollector(source, self.errors)
        return self.add_collector(engine, "probe_engine")

    def _head(self, openmetrics: bool, status: DutyStatus | Exception | None) -> Iterator[str]:
        """The registry's families, collector by collector in its order, each in pieces;
        ``duty_status()`` answers ``status`` while (and only while) they are being written."""
        for collector in self._collectors:
            pieces = collector.chunks(openmetrics)
            while True:
                self._scrape = status
                try:
                    piece = next(pieces, None)
                finally:
                    self._scrape = None
                if piece is None:
                    break
                yield piece

    def _per_master(self, openmetrics: bool) -> Iterator[str]:
        try:
            yield from self.collector.chunks(openmetrics)
        except Exception:
            self.errors.error("per-master", "per-master metrics left out of the scrape")

    def _duty_families(self, status: DutyStatus | Exception | None) -> Iterator[str]:
        if status is None:
            return
        try:
            if isinstance(status, Exception):
                raise status
            yield from iter_duties(status, self.errors)
        except Exception:
            self.errors.error("duties", "duty metrics left out of the scrape")

    def chunks(self, openmetrics: bool) -> Iterator[str]:
        """One scrape as pieces of text; the caller may hand the event loop back between
        two of them (an empty piece is only that chance). Never raises: whatever fails is
        left out and logged, so that the pieces always make a valid exposition."""
        status: DutyStatus | Exception | None = None
        if self._duties is not None:
            try:
                status = self._duties()
            except Exception as exc:  # its readers log it, each under its own name
                status = exc
            yield ""  # that was a pass over the fleet: a chance for the loop
        yield from self._head(openmetrics, status)
        yield from self._per_master(openmetrics)
        yield from self._duty_families(status)
        if openmetrics:
            yield "# EOF\n"

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """Body and content type for a scrape, OpenMetrics when the Accept header asks."""
        openmetrics = wants_openmetrics(accept)
        return "".join(self.chunks(openmetrics)).encode(), content_type(openmetrics)

    async def stream(self, openmetrics: bool) -> AsyncGenerator[bytes, None]:
        """One scrape as bytes to write out as they come, about ``WRITE_SIZE`` at a time;
        the event loop is handed back every ``SLICE`` seconds of rendering."""
        pending: list[str] = []
        size = 0
        clock = time.perf_counter
        handed_back = clock()
        for piece in self.chunks(openmetrics):
            if piece:
                pending.append(piece)
                size += len(piece)
                if size >= WRITE_SIZE:
                    yield "".join(pending).encode()
                    pending.clear()
                    size = 0
            if clock() - handed_back >= SLICE:
                await asyncio.sleep(0)
                handed_back = clock()
        if pending:
            yield "".join(pending).encode()


def wants_openmetrics(accept: str | None) -> bool:
    """Whether a scraper's Accept header asks for OpenMetrics."""
    return accept is not None and "application/openmetrics-text" in accept


def content_type(openmetrics: bool) -> str:
    return OM_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE
