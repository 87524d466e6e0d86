"""Failover statistics as plain numbers, pushed to listeners that feed prometheus_client."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

ResultListener = Callable[[str, str, float | None], None]


@dataclass
class FailoverStats:
    """Counts per (master, result); every result is also pushed to
    ``listeners(master, result, duration_or_None)`` so metrics need not poll."""

    results: dict[tuple[str, str], int] = field(default_factory=dict)
    duration_count: int = 0  # results that carry a duration (moves that ran)
    in_progress: int = 0
    candidate_rollbacks: dict[str, int] = field(default_factory=dict)
    listeners: list[ResultListener] = field(default_factory=list)

    def record(self, master: str, result: str, duration: float | None) -> None:
        self.results[(master, result)] = self.results.get((master, result), 0) + 1
        if duration is not None:
            self.duration_count += 1
        for fn in self.listeners:
            try:
                fn(master, result, duration)
            except Exception:
                log.exception("failover metrics listener failed")

    def candidate_rolled_back(self, master: str) -> None:
        self.candidate_rollbacks[master] = self.candidate_rollbacks.get(master, 0) + 1
