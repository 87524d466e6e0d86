"""/metrics: fleet-level metrics through prometheus_client, per-master families rendered direct.

Per-master families (about 35 samples per master) are written straight from the MasterRuntime
records by ``FleetCollector``: no client-library child object per label set, so 10,000 masters
cost one pass over plain Python objects per scrape (see docs/benchmarks.md). Both the classic
text format (0.0.4) and OpenMetrics 1.0 are produced; the scraper's Accept header chooses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from itertools import accumulate

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client import exposition as text_exposition
from prometheus_client.openmetrics import exposition as om_exposition

from exporter import __version__
from exporter.failover.moves import DURATION_BUCKETS
from exporter.fleet import PROBE_BUCKETS, RESULTS, STATES, Fleet, MasterRuntime

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the classic format
OM_CONTENT_TYPE = om_exposition.CONTENT_TYPE_LATEST


def escape(value: str) -> str:
    """Label-value escaping shared by both formats."""
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def fmt(value: float) -> str:
    if type(value) is int:  # the common case first: counts
        return str(value)
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


_BUCKET_LABELS = [f'le="{b}"' for b in PROBE_BUCKETS] + ['le="+Inf"']


class _Lines:
    """A master's static line prefixes, built once per (config, role), reused every scrape."""

    __slots__ = (
        "buckets",
        "config",
        "count",
        "info",
        "lab",
        "probes",
        "role",
        "states",
        "sum",
        "up",
    )

    def __init__(self, rt: MasterRuntime, role: str) -> None:
        c = rt.config
        self.config, self.role = c, role
        lab = self.lab = f'master="{escape(c.name)}"'
        region = escape(c.region)
        self.up = f'ha_master_up{{{lab},region="{region}",role="{role}"}} '
        self.info = (
            f'ha_master_info{{{lab},region="{region}",role="{role}",'
            f'priority="{c.priority}"}} 1\n'
        )
        self.states = {
            cur: "".join(
                f'ha_master_state{{{lab},state="{st}"}} {1 if st is cur else 0}\n' for st in STATES
            )
            for cur in STATES
        }
        self.buckets = [
            f"ha_master_probe_duration_seconds_bucket{{{lab},{bl}}} " for bl in _BUCKET_LABELS
        ]
        self.sum = f"ha_master_probe_duration_seconds_sum{{{lab}}} "
        self.count = f"ha_master_probe_duration_seconds_count{{{lab}}} "
        self.probes = [f'ha_master_probes_total{{{lab},result="{res}"}} ' for res in RESULTS]


class FleetCollector:
    """Renders the per-master families from the fleet's live records."""

    def __init__(
        self,
        fleet: Callable[[], Fleet],
        weights: Callable[[], Mapping[str, float]],
        decisions: Callable[[], Mapping[tuple[str, str], int]],
        checkpoint_ages: Callable[[float], Mapping[str, float]],
        recovery_timeout: Callable[[], float],
        role_of: Callable[[str], str],
    ) -> None:
        self._fleet = fleet
        self._role_of = role_of
        self._weights = weights
        self._decisions = decisions
        self._checkpoint_ages = checkpoint_ages
        self._recovery_timeout = recovery_timeout
        self._lines: dict[str, _Lines] = {}

    def _lines_of(self, masters: list[MasterRuntime]) -> list[_Lines]:
        cache, role_of = self._lines, self._role_of
        out = []
        for rt in masters:
            lines = cache.get(rt.config.name)
            role = role_of(rt.config.name)
            if lines is None or lines.config is not rt.config or lines.role != role:
                lines = cache[rt.config.name] = _Lines(rt, role)
            out.append(lines)
        if len(cache) > len(masters):  # masters removed by a reload
            keep = {rt.config.name for rt in masters}
            self._lines = {k: v for k, v in cache.items() if k in keep}
        return out

    def render(self, openmetrics: bool) -> str:
        out: list[str] = []
        add = out.append
        now = time.time()
        masters = list(self._fleet())
        cached = self._lines_of(masters)
        labs = [lines.lab for lines in cached]
        pairs = list(zip(masters, cached, strict=True))

        def family(name: str, kind: str, help_text: str) -> None:
            base = name.removesuffix("_total") if openmetrics and kind == "counter" else name
            add(f"# HELP {base} {help_text}\n# TYPE {base} {kind}\n")

        def gauge_per_master(name: str, help_text: str, values: Iterable[float | None]) -> None:
            family(name, "gauge", help_text)
            for lab, v in zip(labs, values, strict=True):
                if v is not None:
                    add(f"{name}{{{lab}}} {fmt(v)}\n")

        family("ha_master_up", "gauge", "1 if the last probe of the master succeeded, else 0.")
        for rt, lines in pairs:
            add(f"{lines.up}{1 if rt.up else 0}\n")

        family("ha_master_info", "gauge", "Static facts of each master; always 1.")
        for lines in cached:
            add(lines.info)

        family(
            "ha_master_state",
            "gauge",
            "1 for the current health state of the master, 0 for the others.",
        )
        for rt, lines in pairs:
            add(lines.states[rt.health.state])

        family(
            "ha_master_probe_duration_seconds",
            "histogram",
            "Duration of health probes, from the exporter's own probe schedule.",
        )
        for rt, lines in pairs:
            counts = list(accumulate(rt.bucket_counts))
            add("".join([f"{p}{n}\n" for p, n in zip(lines.buckets, counts, strict=True)]))
            add(f"{lines.sum}{fmt(rt.probe_sum)}\n{lines.count}{counts[-1]}\n")

        family("ha_master_probes_total", "counter", "Health probes by result.")
        for rt, lines in pairs:
            add("".join([f"{p}{n}\n" for p, n in zip(lines.probes, rt.result_counts, strict=True)]))

        gauge_per_master(
            "ha_master_consecutive_failures",
            "Consecutive failed probes.",
            (rt.health.consecutive_failures for rt in masters),
        )
        gauge_per_master(
            "ha_master_last_probe_timestamp_seconds",
            "Unix time of the last completed probe. Comes from the exporter's own probe "
            "schedule, not from this scrape: a scrape never triggers a probe.",
            (rt.last_probe_wall for rt in masters),
        )
        timeout = self._recovery_timeout()
        gauge_per_master(
            "ha_master_recovery_timed_out",
            "1 when the master has been failed longer than failover.recovery_timeout.",
            (1 if rt.health.recovery_timed_out(now, timeout) else 0 for rt in masters),
        )
        gauge_per_master(
            "ha_master_needs_reset",
            "1 when max_recovery_attempts ran out: only a manual reset heals it.",
            (1 if rt.health.needs_reset else 0 for rt in masters),
        )
        gauge_per_master(
            "ha_master_queue_length",
            "Queue length the master last reported.",
            (rt.queue_length for rt in masters),
        )
        gauge_per_master(
            "ha_master_active_messages",
            "Messages in flight the master reported.",
            (rt.active_messages for rt in masters),
        )
        gauge_per_master(
            "ha_master_cpu_percent",
            "CPU use the master last reported.",
            (rt.cpu_percent for rt in masters),
        )
        gauge_per_master(
            "ha_master_memory_percent",
            "Memory use the master last reported.",
            (rt.memory_percent for rt in masters),
        )
        weights = self._weights()
        gauge_per_master(
            "ha_master_routing_weight",
            "Effective routing weight; 0 when out of rotation.",
            (weights.get(rt.config.name, 0.0) for rt in masters),
        )
        ages = self._checkpoint_ages(now)
        gauge_per_master(
            "ha_master_checkpoint_age_seconds",
            "Age of the newest state checkpoint kept for the master.",
            (ages.get(rt.config.name) for rt in masters),
        )

        family("ha_route_decisions_total", "counter", "Routing decisions by master and strategy.")
        for (master, strategy), n in sorted(self._decisions().items()):
            add(
                f'ha_route_decisions_total{{master="{escape(master)}",strategy="{strategy}"}} {n}\n'
            )
        return "".join(out)


class ExporterMetrics:
    """The exporter's own registry (fleet-level metrics) plus the per-master collector."""

    def __init__(self, collector: FleetCollector) -> None:
        self.collector = collector
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Gauge(
            "ha_build_info", "Version of the running exporter; always 1.", ["version"], registry=r
        )
        self.build_info.labels(__version__).set(1)
        self.config_reload_success = Gauge(
            "ha_config_last_reload_success", "1 if the last config (re)load succeeded.", registry=r
        )
        self.config_reload_timestamp = Gauge(
            "ha_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config (re)load.",
            registry=r,
        )
        self.fleet_health_score = Gauge(
            "ha_fleet_health_score",
            "0..100: share of masters (maintenance excluded) serving; degraded count half.",
            registry=r,
        )
        self.load_distribution_quality = Gauge(
            "ha_load_distribution_quality",
            "0..100: how evenly queue per unit of weight is spread over routed masters.",
            registry=r,
        )
        self.failovers = Counter(
            "ha_failovers_total",
            "Failovers by the master failed away from and result.",
            ["master", "result"],
            registry=r,
        )
        self.failover_duration = Histogram(
            "ha_failover_duration_seconds",
            "Time from failover start to its final result.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.failover_in_progress = Gauge(
            "ha_failover_in_progress", "Failovers running now.", registry=r
        )
        self.failover_paused = Gauge(
            "ha_failover_paused", "1 while automatic failover is paused or disabled.", registry=r
        )
        self.rebalances = Counter(
            "ha_rebalances_total", "Weight shifts by reason.", ["reason"], registry=r
        )

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """Body and content type for a scrape, OpenMetrics when the Accept header asks."""
        openmetrics = accept is not None and "application/openmetrics-text" in accept
        if openmetrics:
            head = om_exposition.generate_latest(self.registry).decode()
            head = head.removesuffix("# EOF\n")
            body = self.collector.render(True) + "# EOF\n"
            return head.encode() + body.encode(), OM_CONTENT_TYPE
        head_bytes = text_exposition.generate_latest(self.registry)
        return head_bytes + self.collector.render(False).encode(), TEXT_CONTENT_TYPE
