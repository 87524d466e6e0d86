"""prometheus_client collectors that can never fail a scrape.

A gauge callback that raises or returns a non-finite value is written NaN; a collector that
raises loses only its own families; a counter read from another component's mapping drops
only the samples it cannot write; the probe engine's figures that do not add up leave out
their own family. Each failure is logged once per ``THROTTLE_SECONDS``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import accumulate, repeat
from typing import Any

from prometheus_client import Gauge
from prometheus_client import exposition as text_exposition
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from exporter.logs import ThrottledLog
from exporter.metrics.exposition import THROTTLE_SECONDS, escape, finite

log = logging.getLogger(__name__)

#: What a counter source hands over: {label value (one label) or a tuple of values: count}.
#: Keys are checked at scrape time (a Mapping's key type is invariant: str and tuple keys both
#: have to fit).
CounterSource = Callable[[], Mapping[Any, float] | None]
#: How many samples one piece of a ``MappingCounter`` holds.
COUNTER_CHUNK = 1000


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

    def chunks(self, openmetrics: bool) -> Iterator[str]:
        """The collector's families as exposition text: in pieces when it writes itself
        (a ``chunks`` method: a family that can hold a sample per master), else through
        prometheus_client in one piece. A failure leaves out the rest of them, logged."""
        try:
            direct = getattr(self.inner, "chunks", None)
            if direct is not None:
                yield from direct(openmetrics)
            elif openmetrics:
                yield om_exposition.generate_latest(self).decode().removesuffix("# EOF\n")
            else:
                yield text_exposition.generate_latest(self).decode()
        except Exception:
            self.errors.error(self.name, "collector %s failed, left out of the scrape", self.name)

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

    def _valid(
        self, items: Iterable[tuple[Any, object]]
    ) -> Iterator[tuple[tuple[str, ...], float]]:
        """The (label values, count) that make a sample; the others are logged."""
        for key, count in items:
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
            yield values, number

    def collect(self) -> list[Metric]:
        counts = self.source()
        if counts is None:
            return []
        family = self._family()
        for values, number in self._valid(list(counts.items())):
            family.add_metric(list(values), number)
        return [family]

    def chunks(self, openmetrics: bool) -> Iterator[str]:
        """The family as prometheus_client writes it (``collect``), byte for byte, but written
        here in pieces of ``COUNTER_CHUNK`` samples: a count per master (checkpoint failures)
        costs prometheus_client about 6 µs a sample, all in one go."""
        counts = self.source()
        if counts is None:
            return
        base = self.name.removesuffix("_total")
        doc = self.documentation.replace("\\", r"\\").replace("\n", r"\n")
        if openmetrics:
            doc = doc.replace('"', r'\"')
            yield f"# HELP {base} {doc}\n# TYPE {base} counter\n"
        else:
            yield f"# HELP {base}_total {doc}\n# TYPE {base}_total counter\n"
        order = sorted(range(len(self.labels)), key=self.labels.__getitem__)
        labels = ",".join(f'{self.labels[i]}="%s"' for i in order)
        line = f"{base}_total{{{labels}}} %s\n" if labels else f"{base}_total %s\n"
        width = len(order)
        items = list(counts.items())
        for start in range(0, len(items), COUNTER_CHUNK):
            out = []
            for key, count in items[start : start + COUNTER_CHUNK]:
                values = (key,) if type(key) is str else key
                if (
                    type(count) is int
                    and 0 <= count < 1_000_000  # written "n.0"; larger ones get an exponent
                    and type(values) is tuple
                    and len(values) == width
                    and all(map(isinstance, values, repeat(str)))
                ):
                    text = f"{count}.0"
                else:
                    checked = next(self._valid([(key, count)]), None)
                    if checked is None:
                        continue
                    values, text = checked[0], floatToGoString(checked[1])
                out.append(line % (*[escape(values[i]) for i in order], text))
            yield "".join(out)

    def describe(self) -> list[Metric]:
        return [self._family()]


#: The probe engine's families: name -> HELP.
PROBE_ENGINE_HELP: dict[str, str] = {
    "ha_probe_schedule_lag_seconds": (
        "How late each probe started against its slot in the exporter's probe schedule. "
        "Lag near the probe interval means the engine is falling behind."
    ),
    "ha_probe_rounds_skipped_total": (
        "Probe slots dropped because the probe engine fell behind: the master's previous "
        "probe was still in flight, or whole rounds passed while the event loop was held."
    ),
}
PROBE_ENGINE_FAMILIES = frozenset(PROBE_ENGINE_HELP)
#: What ``ProbeEngineCollector`` reads from the prober: nothing but these attributes.
EngineSource = Callable[[], object | None]


class ProbeEngineCollector:
    """How late the probe engine runs, read at scrape time from the prober's read-only figures
    (``lag_buckets``, ``lag_counts`` per bucket with +Inf last, ``lag_sum``,
    ``rounds_skipped``), copied in one step so that the histogram adds up.

    No prober yet, or one that does not keep a figure, gives no family for it rather than
    zeros: a histogram of nothing would read as an engine on time. Figures that do not add up
    (lengths, negative or non-integer counts, an infinite sum) leave out their family, logged.
    """

    def __init__(self, source: EngineSource, errors: ThrottledLog) -> None:
        self.source, self.errors = source, errors

    def collect(self) -> list[Metric]:
        engine: Any = self.source()  # read by attribute, each checked: a prober of any version
        if engine is None:
            return []
        out: list[Metric] = []
        lag = "ha_probe_schedule_lag_seconds"
        if all(hasattr(engine, a) for a in ("lag_buckets", "lag_counts", "lag_sum")):
            try:
                # copied before anything else runs: the engine adds to them in place
                counts, total = list(engine.lag_counts), engine.lag_sum
                out.append(_lag_family(tuple(engine.lag_buckets), counts, total))
            except (TypeError, ValueError) as exc:
                self.errors.error(lag, "metric %s left out: %s", lag, exc, exc_info=False)
        skipped = getattr(engine, "rounds_skipped", None)
        if skipped is not None:
            name = "ha_probe_rounds_skipped_total"
            if type(skipped) is int and skipped >= 0:
                out.append(CounterMetricFamily(name, PROBE_ENGINE_HELP[name], value=skipped))
            else:
                msg = "metric %s left out: not a count: %r"
                self.errors.error(name, msg, name, skipped, exc_info=False)
        return out

    def describe(self) -> list[Metric]:
        return [
            HistogramMetricFamily(
                "ha_probe_schedule_lag_seconds",
                PROBE_ENGINE_HELP["ha_probe_schedule_lag_seconds"],
            ),
            CounterMetricFamily(
                "ha_probe_rounds_skipped_total",
                PROBE_ENGINE_HELP["ha_probe_rounds_skipped_total"],
            ),
        ]


def _lag_family(
    bounds: tuple[Any, ...], counts: list[Any], total: object
) -> HistogramMetricFamily:
    """The lag histogram from per-bucket (not cumulative) counts; ValueError if they do not
    make one."""
    if len(counts) != len(bounds) + 1:
        raise ValueError(f"{len(counts)} counts for {len(bounds)} bounds")
    if not all(type(c) is int and c >= 0 for c in counts):
        raise ValueError("counts must be integers >= 0")
    les = [finite(b) for b in bounds]
    if any(b != b for b in les) or les != sorted(set(les)):
        raise ValueError("bounds must be increasing numbers")
    sum_value = finite(total)
    if sum_value != sum_value:
        raise ValueError("lag sum is NaN")
    cumulative = list(accumulate(counts))
    buckets = [(floatToGoString(b), n) for b, n in zip(les, cumulative[:-1], strict=True)]
    buckets.append(("+Inf", cumulative[-1]))
    return HistogramMetricFamily(
        "ha_probe_schedule_lag_seconds",
        PROBE_ENGINE_HELP["ha_probe_schedule_lag_seconds"],
        buckets=buckets,
        sum_value=sum_value,
    )
