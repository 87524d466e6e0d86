"""The per-master families of /metrics, written straight from the fleet's records.

About 35 samples per master are written by ``FleetCollector`` without a client-library child
object per label set: at 10,000 masters prometheus_client's children cost about 20 KiB per
master to keep and some fifteen times the render time (``bench/bench_scrape_stream.py``).
Each master's labels are cached (``Lines``) and rebuilt only when its config or role changes.

A scrape is a generator of text pieces (``FleetCollector.chunks``): a snapshot of every
master's numbers, ``CHUNK`` masters at a time (``exporter.metrics.snapshot``), then every
family, ``CHUNK`` masters per piece. The caller may hand the event loop back between two
pieces and write each piece out as it comes, so that a scrape of 10,000 masters neither holds
the probes' schedule nor builds its 25 MB body in memory.

A family's piece is written column-wise with C-level passes (``map``, ``%``) over cached
prefixes; anything unusual in a column (a value that is not a plain finite number, one that
could not be read) sends that piece of that family down a master-by-master path, where a
failure gives NaN or drops that sample and is logged once per metric per
``THROTTLE_SECONDS``. One bad value never costs the scrape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import accumulate, chain, repeat
from operator import add, attrgetter, mod
from typing import Any, TypeVar

from exporter.fleet import PROBE_BUCKETS, RESULTS, STATES, MasterRuntime
from exporter.logs import ThrottledLog
from exporter.metrics import snapshot as snap
from exporter.metrics.exposition import EXACT, THROTTLE_SECONDS, escape, fmt, sample_value
from exporter.metrics.snapshot import CHUNK, FAILED, Inputs, Lines, Piece

log = logging.getLogger(__name__)

T = TypeVar("T")

_BUCKET_LABELS = [f'le="{b}"' for b in PROBE_BUCKETS] + ['le="+Inf"']
#: How many route-decision samples one piece holds.
DECISIONS_CHUNK = 2000


#: A master's state lines by its current state; formatted with its label once per state.
_STATE_TEXT: dict[str, str] = {
    cur: "".join(
        f'ha_master_state{{%s,state="{st}"}} {1 if st is cur else 0}\n' for st in STATES
    )
    for cur in STATES
}
#: A master's histogram; formatted with (label, cumulative count) per bucket, then (label,
#: sum) and (label, count).
_HIST = "".join(
    [
        *[f"ha_master_probe_duration_seconds_bucket{{%s,{bl}}} %s\n" for bl in _BUCKET_LABELS],
        "ha_master_probe_duration_seconds_sum{%s} %s\n",
        "ha_master_probe_duration_seconds_count{%s} %s\n",
    ]
)
#: A master's probe counts; formatted with (label, count) per result.
_PROBES = "".join(f'ha_master_probes_total{{%s,result="{res}"}} %s\n' for res in RESULTS)
_UP = attrgetter("up")
_INFO = attrgetter("info")
_UP_TEXT = {True: "1\n", False: "0\n"}
_NUMBER_TYPES = frozenset({int, float})
_GAUGE_TYPES = frozenset({int, float, type(None)})
_INT_TYPES = frozenset({int})


def _with_labels(labs: list[str], cols: list[Any]) -> list[Any]:
    """The iterables of (label, value) pairs, column after column, for a %-template."""
    out: list[Any] = []
    for col in cols:
        out += (labs, col)
    return out


def _plain_numbers(values: tuple[Any, ...], types: set[type]) -> bool:
    """True if every value (ints and floats only) is written as it is: finite, and integers
    in float64's exact range."""
    try:
        total = sum(values)
    except (OverflowError, TypeError):
        return False
    if total - total != 0.0:  # an infinity or a NaN among them
        return False
    return int not in types or (min(values) >= -EXACT and max(values) <= EXACT)


def _cumulative(cols: list[tuple[Any, ...]]) -> list[Any]:
    """Cumulative bucket counts, column by column: one list per bucket."""
    return list(accumulate(cols, lambda a, b: list(map(add, a, b))))


class FleetCollector:
    """Renders the per-master families from the fleet's live records."""

    def __init__(
        self,
        fleet: Callable[[], Iterable[MasterRuntime]],
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
        self._lines: dict[str, Lines] = {}
        self.errors = errors or ThrottledLog(log, THROTTLE_SECONDS)

    def _lines_of(self, masters: list[MasterRuntime]) -> list[Lines]:
        cache, role_of = self._lines, self._role_of
        out = []
        for rt in masters:
            lines = cache.get(rt.config.name)
            role = role_of(rt.config.name)
            if lines is None or lines.config is not rt.config or lines.role != role:
                lines = cache[rt.config.name] = Lines(rt, role)
            out.append(lines)
        return out

    def _forget_removed(self, masters: list[MasterRuntime]) -> None:
        """Drop the cached lines of masters a reload removed."""
        if len(self._lines) > len(masters):
            keep = {rt.config.name for rt in masters}
            self._lines = {k: v for k, v in self._lines.items() if k in keep}

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
        """The whole per-master text at once (tests, tools); /metrics streams ``chunks``."""
        return "".join(self.chunks(openmetrics))

    def chunks(self, openmetrics: bool) -> Iterator[str]:
        """The per-master families as pieces of text; the caller may hand the event loop back
        between two pieces (an empty piece is only that chance)."""
        errors = self.errors
        now = time.time()
        try:
            masters = list(self._fleet())
        except Exception:
            errors.error("fleet", "per-master metrics dropped: the fleet could not be read")
            return
        inputs = Inputs(
            now,
            self._fetch("ha_master_recovery_timed_out", self._recovery_timeout),
            self._fetch("ha_master_routing_weight", self._weights),
            self._fetch("ha_master_checkpoint_age_seconds", lambda: self._checkpoint_ages(now)),
        )
        pieces: list[Piece] = []
        for start in range(0, len(masters), CHUNK):
            some = masters[start : start + CHUNK]
            try:
                lines = self._lines_of(some)
            except Exception:
                errors.error("fleet", "per-master metrics dropped: the fleet could not be read")
                return
            pieces.append(snap.take(some, lines, inputs, errors))
            yield ""
        self._forget_removed(masters)
        del masters

        def family(name: str, kind: str, help_text: str) -> str:
            base = name.removesuffix("_total") if openmetrics and kind == "counter" else name
            return f"# HELP {base} {help_text}\n# TYPE {base} {kind}\n"

        yield family(
            "ha_master_up", "gauge", "1 if the last probe of the master succeeded, else 0."
        )
        for p in pieces:
            yield self._each(p, "ha_master_up", _fast_up, _one_up)
        yield family("ha_master_info", "gauge", "Static facts of each master; always 1.")
        for p in pieces:
            yield "".join(map(_INFO, p.lines))
        yield family(
            "ha_master_state",
            "gauge",
            "1 for the current health state of the master, 0 for the others.",
        )
        for p in pieces:
            yield self._each(p, "ha_master_state", _fast_state, _one_state)
        yield family(
            "ha_master_probe_duration_seconds",
            "histogram",
            "Duration of health probes, from the exporter's own probe schedule.",
        )
        for p in pieces:
            yield self._each(p, "ha_master_probe_duration_seconds", _fast_hist, _one_hist)
        yield family("ha_master_probes_total", "counter", "Health probes by result.")
        for p in pieces:
            yield self._each(p, "ha_master_probes_total", _fast_probes, _one_probes)
        for name, column, help_text in GAUGES:
            yield family(name, "gauge", help_text)
            for p in pieces:
                yield self._gauge(p, name, column)
        del pieces
        yield family(
            "ha_route_decisions_total", "counter", "Routing decisions by master and strategy."
        )
        yield from self._route_decisions()

    def _each(
        self,
        piece: Piece,
        name: str,
        fast: Callable[[Piece], str],
        one: Callable[[Lines, list[Any]], str],
    ) -> str:
        """A family's piece: at C speed, or master by master if anything in it is unusual;
        a master whose lines cannot be written is left out (a FAILED one is, silently: it
        was logged when it could not be read)."""
        try:
            return fast(piece)
        except Exception:
            pass  # found again, master by master, below: only the failing ones are lost
        out = []
        for i, lines in enumerate(piece.lines):
            row = [col[i] for col in piece.cols]
            try:
                out.append(one(lines, row))
            except Exception:
                self.errors.error(
                    name, "metric %s: samples of %s dropped", name, lines.config.name
                )
        return "".join(out)

    def _gauge(self, piece: Piece, name: str, column: int) -> str:
        """One sample per master (None: no sample); a value that is not a plain finite
        number is written NaN (logged, throttled)."""
        values = piece.cols[column]
        labs: Iterator[str] | list[str] = piece.labs
        types = set(map(type, values))
        if types <= _GAUGE_TYPES:
            if type(None) in types:
                keep = [v is not None for v in values]
                values = tuple(v for v in values if v is not None)
                labs = (lab for lab, k in zip(piece.labs, keep, strict=True) if k)
            if not values or _plain_numbers(values, types):
                return "".join(
                    chain.from_iterable(
                        zip(repeat(f"{name}{{"), labs, repeat("} "), map(str, values),
                            repeat("\n"))
                    )
                )
        out = []
        for lab, v in zip(piece.labs, piece.cols[column], strict=True):
            if v is None:
                continue
            if v is FAILED:
                out.append(f"{name}{{{lab}}} NaN\n")
            elif (type(v) is int and -EXACT <= v <= EXACT) or (
                type(v) is float and v - v == 0.0
            ):
                out.append(f"{name}{{{lab}}} {v}\n")
            else:
                out.append(f"{name}{{{lab}}} {self._checked(name, v, lab)}\n")
        return "".join(out)

    def _route_decisions(self) -> Iterator[str]:
        decisions = self._fetch(
            "ha_route_decisions_total", lambda: sorted(self._decisions().items())
        )
        items = decisions or []
        for start in range(0, len(items), DECISIONS_CHUNK):
            out = []
            for (master, strategy), n in items[start : start + DECISIONS_CHUNK]:
                lab = f'master="{escape(master)}",strategy="{escape(strategy)}"'
                text = self._checked("ha_route_decisions_total", n, lab)
                if text != "NaN":  # a counter must not be NaN (OpenMetrics): dropped instead
                    out.append(f"ha_route_decisions_total{{{lab}}} {text}\n")
            yield "".join(out)


#: The single-sample gauges, in the order they are written: (name, column, HELP).
GAUGES: tuple[tuple[str, int, str], ...] = (
    ("ha_master_consecutive_failures", snap.CONSECUTIVE_FAILURES, "Consecutive failed probes."),
    (
        "ha_master_last_probe_timestamp_seconds",
        snap.LAST_PROBE,
        "Unix time of the last completed probe. Comes from the exporter's own probe "
        "schedule, not from this scrape: a scrape never triggers a probe.",
    ),
    (
        "ha_master_recovery_timed_out",
        snap.RECOVERY_TIMED_OUT,
        "1 when the master has been failed longer than failover.recovery_timeout.",
    ),
    (
        "ha_master_needs_reset",
        snap.NEEDS_RESET,
        "1 when max_recovery_attempts ran out: only a manual reset heals it.",
    ),
    ("ha_master_queue_length", snap.QUEUE_LENGTH, "Queue length the master last reported."),
    (
        "ha_master_active_messages",
        snap.ACTIVE_MESSAGES,
        "Messages in flight the master reported.",
    ),
    ("ha_master_cpu_percent", snap.CPU_PERCENT, "CPU use the master last reported."),
    ("ha_master_memory_percent", snap.MEMORY_PERCENT, "Memory use the master last reported."),
    (
        "ha_master_routing_weight",
        snap.ROUTING_WEIGHT,
        "Effective routing weight; 0 when out of rotation.",
    ),
    (
        "ha_master_checkpoint_age_seconds",
        snap.CHECKPOINT_AGE,
        "Age of the newest state checkpoint kept for the master.",
    ),
)


# --- each family's piece: at C speed, or one master at a time ----------------------------------

def _fast_up(p: Piece) -> str:
    return "".join(map(add, map(_UP, p.lines), map(_UP_TEXT.__getitem__, p.cols[snap.UP])))


def _one_up(lines: Lines, row: list[Any]) -> str:
    up = row[snap.UP]
    return "" if up is FAILED else f"{lines.up}{1 if up else 0}\n"


def _fast_state(p: Piece) -> str:
    texts = map(_STATE_TEXT.__getitem__, p.cols[snap.STATE])
    return "".join(map(mod, texts, zip(*repeat(p.labs, len(STATES)), strict=True)))


def _one_state(lines: Lines, row: list[Any]) -> str:
    state = row[snap.STATE]
    return "" if state is FAILED else _STATE_TEXT[state] % ((lines.lab,) * len(STATES))


def _fast_hist(p: Piece) -> str:
    sums = p.cols[snap.PROBE_SUM]
    types = set(map(type, sums))
    if not types <= _NUMBER_TYPES or not _plain_numbers(sums, types):
        raise ValueError("probe sums need fmt()")
    counts = _cumulative(p.cols[snap.BUCKETS : snap.BUCKETS + snap.NB])
    values = _with_labels(p.labs, [*counts, list(map(str, sums)), counts[-1]])
    return "".join(map(mod, repeat(_HIST), zip(*values, strict=True)))


def _one_hist(lines: Lines, row: list[Any]) -> str:
    total = row[snap.PROBE_SUM]
    if total is FAILED:
        return ""
    counts = list(accumulate(row[snap.BUCKETS : snap.BUCKETS + snap.NB]))
    values = [*counts, fmt(total), counts[-1]]
    return _HIST % tuple(chain.from_iterable(zip(repeat(lines.lab), values)))


def _fast_probes(p: Piece) -> str:
    cols = p.cols[snap.PROBES : snap.PROBES + snap.NR]
    if any(not set(map(type, col)) <= _INT_TYPES for col in cols):
        raise ValueError("not plain counts")
    return "".join(map(mod, repeat(_PROBES), zip(*_with_labels(p.labs, cols), strict=True)))


def _one_probes(lines: Lines, row: list[Any]) -> str:
    counts = row[snap.PROBES : snap.PROBES + snap.NR]
    if any(c is FAILED for c in counts):
        return ""
    return _PROBES % tuple(chain.from_iterable(zip(repeat(lines.lab), counts)))
