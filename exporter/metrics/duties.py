"""Duties as the masters report them: the fleet's truth, next to the exporter's belief.

A duty is named after each master configured ``role: active``. Who serves it is read from the
masters' own ``/health`` (``reported_holders``), not from the exporter's ``DutyTable``: the
point is to see the two drift apart (a master deactivated behind the exporter's back, two
actives after a partition). Nothing is kept per probe: ``duty_status`` is computed from the
records when a scrape, the API or the status page asks, once per scrape for /metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import repeat
from operator import mod
from typing import Literal

from exporter.fleet import MasterRuntime, reported_holders
from exporter.logs import ThrottledLog
from exporter.metrics.exposition import escape

log = logging.getLogger(__name__)

DutyState = Literal["served", "unserved", "split"]

#: HELP text of each duty family, as /metrics writes it.
DUTY_HELP: dict[str, str] = {
    "ha_duty_served": (
        "1 when exactly one reachable master reports serving the duty, else 0 (none: "
        "unserved; several: split brain). Read from the masters' own /health, not from the "
        "exporter's belief."
    ),
    "ha_duty_holders": (
        "How many reachable masters report serving the duty; 2 or more is a split brain."
    ),
    "ha_duty_holder": "1 for each reachable master that reports serving the duty.",
}
DUTY_FAMILIES = frozenset(DUTY_HELP)


@dataclass(frozen=True)
class DutyStatus:
    """Every configured duty with the masters that report serving it (sorted by name)."""

    holders: Mapping[str, tuple[str, ...]]

    def state(self, duty: str) -> DutyState:
        n = len(self.holders.get(duty, ()))
        return "served" if n == 1 else "unserved" if n == 0 else "split"

    @property
    def served(self) -> list[str]:
        return [d for d, names in self.holders.items() if len(names) == 1]

    @property
    def unserved(self) -> list[str]:
        return [d for d, names in self.holders.items() if not names]

    @property
    def split(self) -> list[str]:
        return [d for d, names in self.holders.items() if len(names) > 1]

    def served_share(self) -> float:
        """Share of duties served by exactly one master; 1.0 with no duty to serve."""
        return len(self.served) / len(self.holders) if self.holders else 1.0


def duty_status(masters: Iterable[MasterRuntime], duties: Iterable[str]) -> DutyStatus:
    """The status of ``duties`` from the masters' last answers."""
    return DutyStatus(reported_holders(masters, duties))


def health_score(master_score: float, status: DutyStatus) -> float:
    """``ha_fleet_health_score``: the worse of the masters' score and the share of duties
    served (both 0..100). A fleet of healthy masters that serves only half its duties is at
    50, not 100; a failed active master whose duty went unserved counts once, not twice."""
    return min(master_score, 100.0 * status.served_share())


def render_duties(status: DutyStatus, errors: ThrottledLog) -> str:
    """The three duty families as one text (``iter_duties`` joined)."""
    return "".join(iter_duties(status, errors))


def iter_duties(status: DutyStatus, errors: ThrottledLog, chunk: int = 500) -> Iterator[str]:
    """The three duty families as exposition text (gauges read the same in both formats), in
    pieces of ``chunk`` duties, so that /metrics can hand the event loop back in between (an
    empty piece is only that chance); a duty whose lines cannot be written is left out, and
    logged (throttled)."""
    labs: list[str] = []  # each duty's label, holders, whether served and holder lines
    counts: list[int] = []
    served: list[int] = []
    holders: list[str] = []
    for i, (duty, names) in enumerate(sorted(status.holders.items()), 1):
        try:
            lab = f'duty="{escape(duty)}"'
            lines = "".join([f'ha_duty_holder{{{lab},master="{escape(m)}"}} 1\n' for m in names])
        except Exception:
            errors.error("ha_duty", "duty metrics: samples of %r dropped", duty)
        else:
            labs.append(lab)
            counts.append(len(names))
            served.append(1 if len(names) == 1 else 0)
            holders.append(lines)
        if i % chunk == 0:
            yield ""
    for name in ("ha_duty_served", "ha_duty_holders", "ha_duty_holder"):
        yield f"# HELP {name} {DUTY_HELP[name]}\n# TYPE {name} gauge\n"
        for start in range(0, len(labs), chunk):
            end = start + chunk
            if name == "ha_duty_holder":
                yield "".join(holders[start:end])
                continue
            values = (served if name == "ha_duty_served" else counts)[start:end]
            line = repeat(f"{name}{{%s}} %s\n")
            yield "".join(map(mod, line, zip(labs[start:end], values, strict=True)))
