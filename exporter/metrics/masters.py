"""The per-master families of /metrics, written straight from the fleet's records.

About 35 samples per master are written by ``FleetCollector`` without a client-library child
object per label set, so 10,000 masters cost one pass over plain Python objects per scrape
(see docs/benchmarks.md). Each master's static line prefixes are cached and rebuilt only when
its config or role changes.

Every sample is computed on its own: a failure gives NaN or drops that sample, and is logged
once per metric per ``THROTTLE_SECONDS``, so one bad value never costs the scrape.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from itertools import accumulate
from typing import TypeVar

from exporter.fleet import PROBE_BUCKETS, RESULTS, STATES, Fleet, MasterRuntime
from exporter.logs import ThrottledLog
from exporter.metrics.exposition import EXACT, THROTTLE_SECONDS, escape, fmt, sample_value

log = logging.getLogger(__name__)

T = TypeVar("T")

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
                if (type(v) is int and -EXACT <= v <= EXACT) or (
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
