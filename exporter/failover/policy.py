"""Failover decisions that do no I/O: cooldowns, fencing a returning master, failback.

The health-event path and the periodic reconcile both ask these, so a master is judged the same
way whichever notices it first.
"""

from __future__ import annotations

from enum import StrEnum


class Cooldowns:
    """When the last move of each master, and of the fleet, started. A per-master cooldown
    gates failovers and failbacks of that master; the fleet-wide one gates failovers only (a
    failback is the fleet healing, not a new incident)."""

    def __init__(self, last: dict[str, float]) -> None:
        self._last = dict(last)
        self._fleet = max(last.values(), default=0.0)

    def mark(self, master: str, now: float) -> None:
        self._last[master] = now
        self._fleet = now

    def clear(self, master: str) -> None:
        """Forget the master's last move (manual reset); the fleet-wide mark stays."""
        self._last.pop(master, None)

    def left(self, master: str, now: float, per_master: float, fleet_wide: float,
             include_fleet: bool = True) -> tuple[str, float] | None:
        """Which cooldown still holds ``master`` back, and for how many seconds; None: none."""
        left = self._last.get(master, 0.0) + per_master - now
        if left > 0:
            return "per-master", left
        if not include_fleet:
            return None
        left = self._fleet + fleet_wide - now
        if fleet_wide > 0 and left > 0:
            return "fleet-wide", left
        return None


def must_fence(reports_active: bool | None, holder: str | None, holds_duties: bool,
               moving: bool) -> bool:
    """Whether a returning master must be fenced: it says it is active while ``holder`` has its
    duty and it holds none itself (two actives for one duty is a split brain). A master whose
    own move is under way is left to that move."""
    return reports_active is True and holder is not None and not holds_duties and not moving


class Failback(StrEnum):
    NO = "no"
    NOW = "now"
    AFTER_COOLDOWN = "after_cooldown"


def failback_decision(mode: str, automatic: bool, holder: str | None, serving: bool,
                      moving: bool, cooling: bool) -> Failback:
    """Whether a master gets its own duty back from ``holder`` now. Only with
    ``failback: auto`` while automatic failover is on, and only a serving master not being
    moved; inside its per-master cooldown it waits (the periodic reconcile retries)."""
    if mode != "auto" or not automatic or holder is None or not serving or moving:
        return Failback.NO
    return Failback.AFTER_COOLDOWN if cooling else Failback.NOW
