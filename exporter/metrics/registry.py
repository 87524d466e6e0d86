"""One scrape of /metrics: the fleet-level registry, then the per-master and duty families.

Fleet-level metrics are ordinary prometheus_client metrics in a private registry, together
with the process and platform collectors; every collector is isolated, so a failing one loses
only its own families. The per-master families (``FleetCollector``) and the duty families are
written as text after the registry's. The classic text format 0.0.4 is served by default,
OpenMetrics 1.0 when the Accept header asks.

The duty status is computed once per scrape and shared by the duty families and the
``ha_fleet_health_score`` callback (``duty_status()``), so a scrape costs one pass over the
fleet for duties and nothing is kept per probe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client import exposition as text_exposition
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.failover.moves import DURATION_BUCKETS
from exporter.metrics.collectors import CallbackGauge, CounterSource, Isolated, MappingCounter
from exporter.metrics.duties import DutyStatus, render_duties
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
}

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
                "Failovers by the master failed away from and result.",
                ["master", "result"],
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
        self.registry.register(Isolated(collector, name, self.errors))
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

    def _head(self, generate: Callable[[CollectorRegistry], bytes]) -> bytes:
        try:
            return generate(self.registry)
        except Exception:
            self.errors.error("registry", "fleet-level metrics left out of the scrape")
            return b""

    def _per_master(self, openmetrics: bool) -> str:
        try:
            return self.collector.render(openmetrics)
        except Exception:
            self.errors.error("per-master", "per-master metrics left out of the scrape")
            return ""

    def _duty_families(self) -> str:
        if self._duties is None:
            return ""
        try:
            return render_duties(self.duty_status(), self.errors)
        except Exception:
            self.errors.error("duties", "duty metrics left out of the scrape")
            return ""

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """Body and content type for a scrape, OpenMetrics when the Accept header asks."""
        openmetrics = accept is not None and "application/openmetrics-text" in accept
        if self._duties is not None:
            try:
                self._scrape = self._duties()
            except Exception as exc:  # its readers log it, each under its own name
                self._scrape = exc
        try:
            if openmetrics:
                head = self._head(om_exposition.generate_latest).decode()
                head = head.removesuffix("# EOF\n")
                body = self._per_master(True) + self._duty_families() + "# EOF\n"
                return head.encode() + body.encode(), OM_CONTENT_TYPE
            head_bytes = self._head(text_exposition.generate_latest)
            tail = self._per_master(False) + self._duty_families()
            return head_bytes + tail.encode(), TEXT_CONTENT_TYPE
        finally:
            self._scrape = None
