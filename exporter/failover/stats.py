"""Failover statistics as plain numbers, pushed to listeners that feed prometheus_client.

Every result is counted under the state its move carried (``state_source``): ``live`` (read
from the source master), ``checkpoint`` (its last checkpoint) or ``none`` (no state moved: the
move was not executed, failed before a state was found, or activated a backup without state).
A successful move with ``none`` is the one that lost state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger(__name__)

StateSource = Literal["live", "checkpoint", "none"]
STATE_SOURCES: tuple[StateSource, ...] = ("live", "checkpoint", "none")
#: Rules that refuse a move for want of state (``failover.<rule>``).
REFUSAL_RULES = ("require_state", "max_checkpoint_age")

ResultListener = Callable[[str, str, float | None], None]
SourcedResultListener = Callable[[str, str, float | None, StateSource], None]


@dataclass
class FailoverStats:
    """Counts per (master, result, state_source), read-only for metrics; every result is also
    pushed to ``source_listeners(master, result, duration_or_None, state_source)`` and to
    ``listeners(master, result, duration_or_None)``, so metrics need not poll.

    The engine announces the state of each master's move in flight (``state_moved``; moves
    are single-flight per master) and the result is filed under it when recorded."""

    results: dict[tuple[str, str, StateSource], int] = field(default_factory=dict)
    duration_count: int = 0  # results that carry a duration (moves that ran)
    in_progress: int = 0
    candidate_rollbacks: dict[str, int] = field(default_factory=dict)
    # (master, rule) -> moves refused by failover.require_state / max_checkpoint_age
    refusals: dict[tuple[str, str], int] = field(default_factory=dict)
    listeners: list[ResultListener] = field(default_factory=list)
    source_listeners: list[SourcedResultListener] = field(default_factory=list)
    _moving: dict[str, StateSource] = field(default_factory=dict, repr=False)

    def state_moved(self, master: str, source: StateSource) -> None:
        """The move of ``master`` now running carries state from ``source``."""
        self._moving[master] = source

    def record(self, master: str, result: str, duration: float | None,
               state_source: StateSource | None = None) -> None:
        """Count one result, under ``state_source`` or else what its move announced."""
        announced = self._moving.pop(master, "none")
        source: StateSource = state_source or announced
        key = (master, result, source)
        self.results[key] = self.results.get(key, 0) + 1
        if duration is not None:
            self.duration_count += 1
        for fn in self.listeners:
            try:
                fn(master, result, duration)
            except Exception:
                log.exception("failover metrics listener failed")
        for sourced in self.source_listeners:
            try:
                sourced(master, result, duration, source)
            except Exception:
                log.exception("failover metrics listener failed")

    def refused(self, master: str, rule: str) -> None:
        self.refusals[(master, rule)] = self.refusals.get((master, rule), 0) + 1

    def candidate_rolled_back(self, master: str) -> None:
        self.candidate_rollbacks[master] = self.candidate_rollbacks.get(master, 0) + 1
