"""A move in flight: the request that starts one, its running record, and how one stops.

Kept apart from the engine so that crash recovery and the ledger can use them without importing
the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from exporter.failover.records import StepEntry
from exporter.failover.selection import Ranking

# The results a move that ran can end with (skipped_cooldown and dry_run are recorded only).
EXECUTED = ("success", "rolled_back", "failed")
# Bounds of the ha_failover_duration_seconds histogram.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

RoutingCallback = Callable[[str, str | None], None]


class StepFailed(Exception):
    """A step of the current candidate failed: roll the candidate back, try the next."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


class Interrupted(Exception):
    """The move must stop now (deadline or shutdown): roll back, record rolled_back."""


@dataclass(frozen=True, slots=True)
class MoveRequest:
    """What an operator or the policy asked for; the engine turns it into a Move."""

    kind: str  # failover, switchover or failback
    master: str  # whose duties move: the subject of the record
    source: str  # where the state comes from
    duties: tuple[str, ...]
    to: str | None
    trigger: str
    reason: str
    actor: str


@dataclass
class Move:
    """A move being executed (or recovered): what it moves and what it has done so far."""

    id: int
    kind: str
    master: str
    source: str
    duties: list[str]
    trigger: str
    reason: str
    actor: str
    started: float
    deadline: float  # monotonic
    t0: float = field(default_factory=time.monotonic)
    steps: list[StepEntry] = field(default_factory=list)
    ranking: Ranking | None = None
    backup: str | None = None
    fenced: bool = False  # a fence was attempted: a failed move must un-fence
    stop_reason: str | None = None  # set by ``interrupt``
    scope: asyncio.Timeout | None = None  # the deadline of the forward step running now
    unresponsive: set[str] = field(default_factory=set)

    def interrupt(self, reason: str) -> None:
        """Stop the move at its running forward step, or before its next one. Undo work is
        never inside that scope, so a rollback under way completes."""
        self.stop_reason = reason
        if self.scope is not None and not self.scope.expired():
            self.scope.reschedule(asyncio.get_running_loop().time())

    @property
    def late(self) -> bool:
        """Interrupted or past its deadline: what is left to do should be quick."""
        return self.stop_reason is not None or time.monotonic() > self.deadline
