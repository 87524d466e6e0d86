"""What a failover engine shares with its recovery: the move record, outcomes, statistics.

Kept apart from the engine so that crash recovery (exporter/recovery.py) and the engine
(exporter/failover.py) can both use them without importing each other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from exporter.failover.selection import Ranking

log = logging.getLogger(__name__)

RESULTS = ("success", "rolled_back", "failed", "skipped_cooldown", "dry_run")
EXECUTED = ("success", "rolled_back", "failed")
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RoutingCallback = Callable[[str, str | None], None]
ResultListener = Callable[[str, str, float | None], None]


class StepFailed(Exception):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


class Aborted(Exception):
    """The move must stop now (deadline or shutdown): roll back, record rolled_back."""


@dataclass
class FailoverStats:
    """What /metrics needs, kept as plain numbers (the lead's collector reads them) and pushed
    to ``listeners(master, result, duration_or_None)`` for prometheus_client objects."""

    results: dict[tuple[str, str], int] = field(default_factory=dict)
    bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0
    duration_count: int = 0
    in_progress: int = 0
    candidate_rollbacks: dict[str, int] = field(default_factory=dict)
    listeners: list[ResultListener] = field(default_factory=list)

    def record(self, master: str, result: str, duration: float | None) -> None:
        self.results[(master, result)] = self.results.get((master, result), 0) + 1
        if duration is not None:
            self.duration_sum += duration
            self.duration_count += 1
            i = next((i for i, b in enumerate(DURATION_BUCKETS) if duration <= b),
                     len(DURATION_BUCKETS))
            self.bucket_counts[i] += 1
        for fn in self.listeners:
            try:
                fn(master, result, duration)
            except Exception:
                log.exception("failover metrics listener failed")


@dataclass
class Move:
    id: int
    kind: str
    master: str  # whose duties move: the subject of the record
    source: str  # where the state comes from
    duties: list[str]
    trigger: str
    reason: str
    actor: str
    started: float
    deadline: float  # monotonic
    t0: float = field(default_factory=time.monotonic)
    steps: list[dict[str, Any]] = field(default_factory=list)
    ranking: Ranking | None = None
    backup: str | None = None
    fenced: bool = False
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    abort_reason: str = ""
    unresponsive: set[str] = field(default_factory=set)
