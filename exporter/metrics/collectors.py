"""prometheus_client collectors that can never fail a scrape.

A gauge callback that raises or returns a non-finite value is written NaN; a collector that
raises loses only its own families; a counter read from another component's mapping drops
only the samples it cannot write. Each failure is logged once per ``THROTTLE_SECONDS``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client import Gauge
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.logs import ThrottledLog
from exporter.metrics.exposition import THROTTLE_SECONDS, finite

log = logging.getLogger(__name__)

#: What a counter source hands over: {label value (one label) or a tuple of values: count}.
#: Keys are checked at scrape time (a Mapping's key type is invariant: str and tuple keys both
#: have to fit).
CounterSource = Callable[[], Mapping[Any, float] | None]


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


class Isolated:
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


class MappingCounter:
    """A counter family read at scrape time from counts another component keeps (the state
    store's errors by operation, the checkpointer's failures by master and reason): the owner
    keeps plain integers and never imports the metrics code.

    A source that answers None (the component, or its counts, do not exist) gives no family
    at all. A sample whose labels do not fit or whose count is not a finite number >= 0 is
    dropped (a counter may not be NaN), and logged.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str],
        source: CounterSource,
        errors: ThrottledLog,
    ) -> None:
        self.name, self.documentation, self.labels = name, documentation, list(labels)
        self.source, self.errors = source, errors

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labels)

    def collect(self) -> list[Metric]:
        counts = self.source()
        if counts is None:
            return []
        family = self._family()
        for key, count in list(counts.items()):
            values = key if isinstance(key, tuple) else (key,)
            try:
                if len(values) != len(self.labels) or not all(isinstance(v, str) for v in values):
                    raise ValueError(f"labels {values!r} do not fit {self.labels}")
                number = finite(count)
                if not number >= 0:  # NaN included
                    raise ValueError(f"not a count: {number}")
            except ValueError as exc:
                msg = "metric %s: sample %r dropped: %s"
                self.errors.error(self.name, msg, self.name, key, exc, exc_info=False)
                continue
            family.add_metric(list(values), number)
        return [family]

    def describe(self) -> list[Metric]:
        return [self._family()]
