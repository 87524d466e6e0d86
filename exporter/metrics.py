"""/metrics: fleet-level metrics through prometheus_client, per-master families rendered direct.

Per-master families (about 35 samples per master) are written straight from the MasterRuntime
records by ``FleetCollector``: no client-library child object per label set, so 10,000 masters
cost one pass over plain Python objects per scrape (see docs/benchmarks.md). Both the classic
text format (0.0.4) and OpenMetrics 1.0 are produced; the scraper's Accept header chooses.

One bad value never breaks a scrape: Prometheus drops a whole scrape it cannot parse, and a 500
loses every series at once. So every value is written finite or NaN, each per-master sample and
each gauge callback is computed on its own (a failure gives NaN or drops that sample), every
collector of the registry is isolated, and the failure is logged once per metric per
``THROTTLE_SECONDS``, not on every scrape.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from itertools import accumulate
from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client import exposition as text_exposition
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.failover.moves import DURATION_BUCKETS
from exporter.fleet import PROBE_BUCKETS, RESULTS, STATES, Fleet, MasterRuntime
from exporter.logs import ThrottledLog

log = logging.getLogger(__name__)

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the classic format
OM_CONTENT_TYPE = om_exposition.CONTENT_TYPE_LATEST
#: A failing metric is logged at most once per this many seconds.
THROTTLE_SECONDS = 300.0
#: Integers up to this are written exactly; larger ones as floats (float64 is what is stored).
_EXACT = 2**53
T = TypeVar("T")
C = TypeVar("C", bound=Collector)


def escape(value: str) -> str:
    """Label-value escaping shared by both formats."""
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def fmt(value: float) -> str:
    """A number in the exposition's float syntax; a huge integer becomes a float (never a
    400-digit literal, which Prometheus refuses)."""
    if type(value) is int:  # the common case first: counts
        if -_EXACT <= value <= _EXACT:
            return str(value)
        try:
            value = float(value)
        except OverflowError:
            value = math.inf if value > 0 else -math.inf
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def finite(value: object) -> float:
    """A sample value, finite or NaN. Raises ValueError for infinities, numbers beyond
    float64 and non-numbers (bools are numbers here: 0/1 gauges), so that the caller logs the
    bug and writes NaN."""
    if not isinstance(value, int | float):
        raise ValueError(f"not a number: {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError("beyond float64") from None
    if number in (math.inf, -math.inf):
        raise ValueError(f"not finite: {number}")
    return number


def sample_value(value: object) -> str:
    """``finite(value)`` as exposition text; integers in float64's exact range as they are."""
    if type(value) is int and -_EXACT <= value <= _EXACT:
        return str(value)
    number = finite(value)
    return "NaN" if number != number else repr(number)


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
        errors: ThrottledLog | None = None,
    ) -> None:
        self._fleet = fleet
        self._role_of = role_of
        self._weights = weights
        self._decisions = decisions
        self._checkpoint_ages = checkpoint_ages
        self._recovery_timeout = recovery_timeout
        self._lines: dict[str, _Lines] = {}
        self.errors = errors or ThrottledLog(log, THROTTLE_SECONDS)

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

    def _fetch(self, name: str, fn: Callable[[], T]) -> T | None:
        """A family's input, or None (the family's samples dropped) if it cannot be had."""
        try:
            return fn()
        except Exception:
            self.errors.error(name, "metric %s: its input failed, samples dropped", name)
            return None

    def _checked(self, name: str, value: object, labels: str) -> str:
        """``sample_value``, or NaN (logged, throttled) for a value no sample may have."""
        try:
            return sample_value(value)
        except ValueError as exc:
            msg = "metric %s{%s} written as NaN: %s"
            self.errors.error(name, msg, name, labels, exc, exc_info=False)
            return "NaN"

    def render(self, openmetrics: bool) -> str:
        errors = self.errors
        now = time.time()
        try:
            masters = list(self._fleet())
            cached = self._lines_of(masters)
        except Exception:
            errors.error("fleet", "per-master metrics dropped: the fleet could not be read")
            return ""
        out: list[str] = []
        add = out.append
        pairs = list(zip(masters, cached, strict=True))

        def family(name: str, kind: str, help_text: str) -> None:
            base = name.removesuffix("_total") if openmetrics and kind == "counter" else name
            add(f"# HELP {base} {help_text}\n# TYPE {base} {kind}\n")

        def each(name: str, lines_of: Callable[[MasterRuntime, _Lines], str]) -> None:
            """A family written master by master: a master whose lines fail is left out."""
            try:
                add("".join([lines_of(rt, lines) for rt, lines in pairs]))
                return
            except Exception:
                pass  # found again, master by master, below: only the failing ones are lost
            for rt, lines in pairs:
                try:
                    add(lines_of(rt, lines))
                except Exception:
                    errors.error(name, "metric %s: samples of %s dropped", name, rt.name)

        def gauge_per_master(
            name: str, help_text: str, value: Callable[[MasterRuntime], object]
        ) -> None:
            """One sample per master (None: no sample); a failing value is written NaN."""
            family(name, "gauge", help_text)
            values: list[object] = []
            try:
                values = [value(rt) for rt in masters]
            except Exception:
                pass  # found again, master by master, below: only the failing ones are NaN
            if len(values) != len(masters):
                for rt in masters:
                    try:
                        values.append(value(rt))
                    except Exception:
                        errors.error(name, "metric %s: value of %s written as NaN", name, rt.name)
                        values.append(math.nan)
            for lines, v in zip(cached, values, strict=True):
                if v is None:
                    continue
                if (type(v) is int and -_EXACT <= v <= _EXACT) or (
                    type(v) is float and v - v == 0.0
                ):
                    add(f"{name}{{{lines.lab}}} {v}\n")  # the common case, kept cheap
                else:
                    add(f"{name}{{{lines.lab}}} {self._checked(name, v, lines.lab)}\n")

        def gauge_from(
            name: str,
            help_text: str,
            fetch: Callable[[], T],
            value: Callable[[T, MasterRuntime], object],
        ) -> None:
            """gauge_per_master over an input fetched once per scrape; without the input the
            family has no samples."""
            data = self._fetch(name, fetch)
            if data is None:
                family(name, "gauge", help_text)
            else:
                gauge_per_master(name, help_text, lambda rt: value(data, rt))

        family("ha_master_up", "gauge", "1 if the last probe of the master succeeded, else 0.")
        each("ha_master_up", lambda rt, lines: f"{lines.up}{1 if rt.up else 0}\n")

        family("ha_master_info", "gauge", "Static facts of each master; always 1.")
        each("ha_master_info", lambda rt, lines: lines.info)

        family(
            "ha_master_state",
            "gauge",
            "1 for the current health state of the master, 0 for the others.",
        )
        each("ha_master_state", lambda rt, lines: lines.states[rt.health.state])

        family(
            "ha_master_probe_duration_seconds",
            "histogram",
            "Duration of health probes, from the exporter's own probe schedule.",
        )

        def histogram(rt: MasterRuntime, lines: _Lines) -> str:
            counts = list(accumulate(rt.bucket_counts))
            return "".join(
                [
                    *[f"{p}{n}\n" for p, n in zip(lines.buckets, counts, strict=True)],
                    f"{lines.sum}{fmt(rt.probe_sum)}\n{lines.count}{counts[-1]}\n",
                ]
            )

        each("ha_master_probe_duration_seconds", histogram)

        family("ha_master_probes_total", "counter", "Health probes by result.")
        each(
            "ha_master_probes_total",
            lambda rt, lines: "".join(
                [f"{p}{n}\n" for p, n in zip(lines.probes, rt.result_counts, strict=True)]
            ),
        )

        gauge_per_master(
            "ha_master_consecutive_failures",
            "Consecutive failed probes.",
            lambda rt: rt.health.consecutive_failures,
        )
        gauge_per_master(
            "ha_master_last_probe_timestamp_seconds",
            "Unix time of the last completed probe. Comes from the exporter's own probe "
            "schedule, not from this scrape: a scrape never triggers a probe.",
            lambda rt: rt.last_probe_wall,
        )
        gauge_from(
            "ha_master_recovery_timed_out",
            "1 when the master has been failed longer than failover.recovery_timeout.",
            self._recovery_timeout,
            lambda timeout, rt: 1 if rt.health.recovery_timed_out(now, timeout) else 0,
        )
        gauge_per_master(
            "ha_master_needs_reset",
            "1 when max_recovery_attempts ran out: only a manual reset heals it.",
            lambda rt: 1 if rt.health.needs_reset else 0,
        )
        gauge_per_master(
            "ha_master_queue_length",
            "Queue length the master last reported.",
            lambda rt: rt.queue_length,
        )
        gauge_per_master(
            "ha_master_active_messages",
            "Messages in flight the master reported.",
            lambda rt: rt.active_messages,
        )
        gauge_per_master(
            "ha_master_cpu_percent",
            "CPU use the master last reported.",
            lambda rt: rt.cpu_percent,
        )
        gauge_per_master(
            "ha_master_memory_percent",
            "Memory use the master last reported.",
            lambda rt: rt.memory_percent,
        )
        gauge_from(
            "ha_master_routing_weight",
            "Effective routing weight; 0 when out of rotation.",
            self._weights,
            lambda weights, rt: weights.get(rt.config.name, 0.0),
        )
        gauge_from(
            "ha_master_checkpoint_age_seconds",
            "Age of the newest state checkpoint kept for the master.",
            lambda: self._checkpoint_ages(now),
            lambda ages, rt: ages.get(rt.config.name),
        )

        family("ha_route_decisions_total", "counter", "Routing decisions by master and strategy.")
        decisions = self._fetch(
            "ha_route_decisions_total", lambda: sorted(self._decisions().items())
        )
        for (master, strategy), n in decisions or ():
            lab = f'master="{escape(master)}",strategy="{escape(strategy)}"'
            text = self._checked("ha_route_decisions_total", n, lab)
            if text != "NaN":  # a counter must not be NaN (OpenMetrics): dropped instead
                add(f"ha_route_decisions_total{{{lab}}} {text}\n")
        return "".join(out)


class CallbackGauge(Gauge):
    """A Gauge whose ``set_function`` callback can never fail a scrape: an exception, or a
    value that is not a finite number, is written NaN and logged (throttled)."""

    errors: ThrottledLog = ThrottledLog(log, THROTTLE_SECONDS)  # ExporterMetrics sets its own

    def set_function(self, f: Callable[[], float]) -> None:
        errors, name = self.errors, self._name

        def guarded() -> float:
            try:
                return finite(f())
            except Exception:
                errors.error(name, "metric %s: callback failed, written as NaN", name)
                return math.nan

        super().set_function(guarded)


class _Isolated:
    """One registered collector: if it fails, its own families are left out of the scrape."""

    def __init__(self, inner: Collector, name: str, errors: ThrottledLog) -> None:
        self.inner, self.name, self.errors = inner, name, errors

    def collect(self) -> list[Metric]:
        try:
            return list(self.inner.collect())
        except Exception:
            self.errors.error(self.name, "collector %s failed, left out of the scrape", self.name)
            return []

    def describe(self) -> list[Metric]:
        describe = getattr(self.inner, "describe", None)
        return list(describe()) if describe is not None else self.collect()


class ExporterMetrics:
    """The exporter's own registry (fleet-level metrics) plus the per-master collector."""

    def __init__(self, collector: FleetCollector) -> None:
        self.collector = collector
        self.errors = collector.errors
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
        self.fleet_health_score = self._gauge(
            "ha_fleet_health_score",
            "0..100: share of masters (maintenance excluded) serving; degraded count half.",
        )
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
        self.registry.register(_Isolated(collector, name, self.errors))
        return collector

    def _gauge(self, name: str, help_text: str, labels: Iterable[str] = ()) -> CallbackGauge:
        gauge = CallbackGauge(name, help_text, labels, registry=None)
        gauge.errors = self.errors
        return self.add_collector(gauge, name)

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

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """Body and content type for a scrape, OpenMetrics when the Accept header asks."""
        openmetrics = accept is not None and "application/openmetrics-text" in accept
        if openmetrics:
            head = self._head(om_exposition.generate_latest).decode()
            head = head.removesuffix("# EOF\n")
            body = self._per_master(True) + "# EOF\n"
            return head.encode() + body.encode(), OM_CONTENT_TYPE
        head_bytes = self._head(text_exposition.generate_latest)
        return head_bytes + self._per_master(False).encode(), TEXT_CONTENT_TYPE
