"""A scrape's copy of every master's numbers, taken master by master in pieces.

The per-master families are written family after family (the exposition groups a family's
samples), so the values of one master are read long before its last family is written, and
/metrics hands the event loop back in between. For one master's families to agree with each
other (its histogram with its counters, its state with its probe count), its numbers are
copied in one step into a *row* before anything is written; masters copied in different
pieces may have moved in between, as with any exporter.

A piece holds its rows transposed (one tuple per column, ``cols[UP]`` ...): the renderer
writes a family's column for a few hundred masters in one C-level pass. Rows hold references
to the records' own numbers, never text: about 300 bytes per master, only while the scrape
runs. No object is made per master that outlives its row's copy into the piece, so a scrape
gives the garbage collector no survivors to promote: at 10,000 masters a full collection
holds the event loop for tens to hundreds of milliseconds.

A number that cannot be read is ``FAILED`` in its column, logged (throttled) under its
family's name: the renderer drops that master's samples of a family that cannot have a
stand-in, and writes NaN for a gauge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from exporter.fleet import PROBE_BUCKETS, RESULTS, MasterRuntime
from exporter.logs import ThrottledLog
from exporter.metrics.exposition import escape

log = logging.getLogger(__name__)


class Lines:
    """A master's static labels, built once per (config, role), reused every scrape: its
    ``master="..."`` label and its two lines that carry more than that. Every other line is
    a module-wide %-template the label is formatted into, so the cache costs a few hundred
    bytes per master rather than kilobytes."""

    __slots__ = ("config", "info", "lab", "role", "up")

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


#: How many masters one piece of a scrape covers: the unit between two hand-backs of the
#: event loop (a fraction of a millisecond to about three of rendering, by family).
CHUNK = 500

NB = len(PROBE_BUCKETS) + 1  # bucket counts, the last one +Inf only
NR = len(RESULTS)
#: Columns of a row.
UP, STATE, PROBE_SUM = 0, 1, 2
BUCKETS = 3  # NB columns
PROBES = BUCKETS + NB  # NR columns
(
    CONSECUTIVE_FAILURES,
    LAST_PROBE,
    RECOVERY_TIMED_OUT,
    NEEDS_RESET,
    QUEUE_LENGTH,
    ACTIVE_MESSAGES,
    CPU_PERCENT,
    MEMORY_PERCENT,
    ROUTING_WEIGHT,
    CHECKPOINT_AGE,
) = range(PROBES + NR, PROBES + NR + 10)
WIDTH = CHECKPOINT_AGE + 1


class _Failed:
    """The stand-in for a number that could not be read."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FAILED"


FAILED = _Failed()


@dataclass(frozen=True)
class Inputs:
    """What a scrape reads once for every master; None where the input failed (its family
    then has no samples)."""

    now: float
    recovery_timeout: float | None
    weights: Mapping[str, float] | None
    ages: Mapping[str, float] | None


class Piece:
    """Up to ``CHUNK`` masters: their cached line prefixes (``lines``), ``labs`` (the
    ``master="..."`` label of each) and their rows by column (``cols``)."""

    __slots__ = ("cols", "labs", "lines")

    def __init__(self, lines: list[Lines], cols: list[tuple[Any, ...]]) -> None:
        self.lines = lines
        self.labs: list[str] = list(map(_LAB, lines))
        self.cols = cols


_LAB = attrgetter("lab")


def take(
    masters: Sequence[MasterRuntime], lines: list[Lines], inputs: Inputs, errors: ThrottledLog
) -> Piece:
    """The piece of ``masters`` (with their cached ``lines``), copied now."""
    now, timeout, weights, ages = (
        inputs.now, inputs.recovery_timeout, inputs.weights, inputs.ages
    )
    flat: list[Any] = []  # the rows one after the other: one object for the collector
    extend = flat.extend
    for rt, line in zip(masters, lines, strict=True):
        name = line.config.name
        try:
            h, buckets, probes = rt.health, rt.bucket_counts, rt.result_counts
            if len(buckets) == NB and len(probes) == NR:
                extend((
                    rt.up,
                    h.state,
                    rt.probe_sum,
                    *buckets,
                    *probes,
                    h.consecutive_failures,
                    rt.last_probe_wall,
                    None if timeout is None else (1 if h.recovery_timed_out(now, timeout) else 0),
                    1 if h.needs_reset else 0,
                    rt.queue_length,
                    rt.active_messages,
                    rt.cpu_percent,
                    rt.memory_percent,
                    None if weights is None else weights.get(name, 0.0),
                    None if ages is None else ages.get(name),
                ))
                continue
        except Exception:
            pass  # read again field by field: only what fails is lost
        extend(_careful_row(rt, name, inputs, errors))
    return Piece(lines, [tuple(flat[k::WIDTH]) for k in range(WIDTH)])


_Reader = Callable[[MasterRuntime, str, Inputs], Sequence[object]]


def _counts(values: Sequence[object], width: int) -> Sequence[object]:
    if len(values) != width:
        raise ValueError(f"{len(values)} counts, {width} expected")
    return values


#: (first column, width, family, what a failure costs, how to read it).
_FIELDS: tuple[tuple[int, int, str, str, _Reader], ...] = (
    (UP, 1, "ha_master_up", "drop", lambda rt, n, i: (rt.up,)),
    (STATE, 1, "ha_master_state", "drop", lambda rt, n, i: (rt.health.state,)),
    (
        PROBE_SUM,
        1 + NB,
        "ha_master_probe_duration_seconds",
        "drop",
        lambda rt, n, i: (rt.probe_sum, *_counts(rt.bucket_counts, NB)),
    ),
    (
        PROBES,
        NR,
        "ha_master_probes_total",
        "drop",
        lambda rt, n, i: _counts(rt.result_counts, NR),
    ),
    (
        CONSECUTIVE_FAILURES,
        1,
        "ha_master_consecutive_failures",
        "nan",
        lambda rt, n, i: (rt.health.consecutive_failures,),
    ),
    (LAST_PROBE, 1, "ha_master_last_probe_timestamp_seconds", "nan",
     lambda rt, n, i: (rt.last_probe_wall,)),
    (
        RECOVERY_TIMED_OUT,
        1,
        "ha_master_recovery_timed_out",
        "nan",
        lambda rt, n, i: (
            None
            if i.recovery_timeout is None
            else (1 if rt.health.recovery_timed_out(i.now, i.recovery_timeout) else 0),
        ),
    ),
    (NEEDS_RESET, 1, "ha_master_needs_reset", "nan",
     lambda rt, n, i: (1 if rt.health.needs_reset else 0,)),
    (QUEUE_LENGTH, 1, "ha_master_queue_length", "nan", lambda rt, n, i: (rt.queue_length,)),
    (ACTIVE_MESSAGES, 1, "ha_master_active_messages", "nan",
     lambda rt, n, i: (rt.active_messages,)),
    (CPU_PERCENT, 1, "ha_master_cpu_percent", "nan", lambda rt, n, i: (rt.cpu_percent,)),
    (MEMORY_PERCENT, 1, "ha_master_memory_percent", "nan",
     lambda rt, n, i: (rt.memory_percent,)),
    (
        ROUTING_WEIGHT,
        1,
        "ha_master_routing_weight",
        "nan",
        lambda rt, n, i: (None if i.weights is None else i.weights.get(n, 0.0),),
    ),
    (
        CHECKPOINT_AGE,
        1,
        "ha_master_checkpoint_age_seconds",
        "nan",
        lambda rt, n, i: (None if i.ages is None else i.ages.get(n),),
    ),
)


def _careful_row(
    rt: MasterRuntime, name: str, inputs: Inputs, errors: ThrottledLog
) -> tuple[Any, ...]:
    """A row read field by field, ``FAILED`` where a field cannot be read (logged)."""
    row: list[Any] = [FAILED] * WIDTH
    for first, width, family, cost, read in _FIELDS:
        try:
            values = read(rt, name, inputs)
            if len(values) != width:
                raise ValueError(f"{len(values)} values, {width} expected")
        except Exception:
            what = "samples of %s dropped" if cost == "drop" else "value of %s written as NaN"
            errors.error(family, f"metric %s: {what}", family, name)
            continue
        row[first : first + width] = values
    return tuple(row)
