"""Failover decisions that do no I/O: cooldowns, fencing, reconciling a duty to what masters
report, whether a move may go on without state, failback.

The health-event path, the periodic reconcile and operator actions all ask these, so a master
is judged the same way whichever notices it first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from exporter.failover.stats import StateSource

#: Results of a move that did not hand the duty over: a retry waits for the cooldown.
UNSUCCESSFUL = ("failed", "rolled_back", "dry_run")


class Cooldowns:
    """When the last move of each master, and of the fleet, started, and whether it failed.

    A per-master cooldown gates failovers and failbacks of that master; the fleet-wide one
    gates failovers only (a failback is the fleet healing, not a new incident). Both protect a
    duty that is *served* from being moved back and forth. A duty nobody serves is not held
    back by them: only a retry after an attempt that did not succeed waits for the per-master
    cooldown (retrying sooner changes nothing and would record a move every round)."""

    def __init__(self, last: dict[str, float], unsuccessful: dict[str, float] | None = None
                 ) -> None:
        self._last = dict(last)
        self._fleet = max(last.values(), default=0.0)
        tried = unsuccessful or {}
        self._failed = {m for m, ts in last.items() if tried.get(m, -1.0) >= ts}

    def mark(self, master: str, now: float) -> None:
        """A move of ``master`` starts."""
        self._last[master] = now
        self._fleet = now
        self._failed.discard(master)

    def settle(self, master: str, result: str) -> None:
        """The result of the move ``mark`` announced."""
        if result in UNSUCCESSFUL:
            self._failed.add(master)
        else:
            self._failed.discard(master)

    def clear(self, master: str) -> None:
        """Forget the master's last move (manual reset); the fleet-wide mark stays."""
        self._last.pop(master, None)
        self._failed.discard(master)

    def left(self, master: str, now: float, per_master: float, fleet_wide: float,
             include_fleet: bool = True, unserved: bool = False) -> tuple[str, float] | None:
        """Which cooldown still holds ``master`` back, and for how many seconds; None: none.
        ``unserved``: a duty of the master is served by nobody."""
        left = self._last.get(master, 0.0) + per_master - now
        if unserved:
            return ("per-master", left) if left > 0 and master in self._failed else None
        if left > 0:
            return "per-master", left
        if not include_fleet:
            return None
        left = self._fleet + fleet_wide - now
        if fleet_wide > 0 and left > 0:
            return "fleet-wide", left
        return None


def must_fence(reports_active: bool | None, fresh: bool, holder: str | None,
               holder_serves: bool, moving: bool) -> bool:
    """Whether a master that reports serving a duty ``holder`` (another master) holds must stop
    serving it: two masters serving one duty is the split brain failover exists to prevent.

    Only on a *fresh* report, one from a probe sent after the exporter's last control call to
    that master: a probe sent before a release landed still shows the duty it has since let go.
    Only when the holder serves the duty too: otherwise the master's own service is the only
    one there is, and is adopted rather than fenced. Never while either master is being moved:
    that move decides."""
    return (reports_active is True and fresh and holder is not None and holder_serves
            and not moving)


@dataclass(frozen=True, slots=True)
class DutyFix:
    """What reconciling one duty to the masters' reports takes (all empty: nothing).

    ``adopt``: the duty table must say this master holds it (no call to any master);
    ``activate``: ``POST /activate`` the duty on its holder; ``failover``: move the holder's
    duties to a backup; ``stop``: masters to stop serving it, the holder keeps it."""

    adopt: str | None = None
    activate: str | None = None
    failover: str | None = None
    stop: tuple[str, ...] = ()


def fix_duty(duty: str, holder: str, serving: Sequence[str], holder_ready: bool,
             holder_gone: bool) -> DutyFix:
    """How to make ``duty`` served exactly once, given the masters that serve it now.

    * served by its holder alone: nothing;
    * served by one other master alone: that one is adopted as the holder (a master restarted
      from its config, a holder restarted without its duties: what serves is what counts);
    * served by nobody: its holder is activated for it when it answers and is healthy
      (``holder_ready``); its duties are failed over when it is failed or in maintenance
      (``holder_gone``); otherwise the health machine has not decided yet and nothing is done;
    * served by several: the holder keeps it (or the duty's owner, or the first by name, when
      the holder is not among them, and is adopted), every other one stops.
    """
    if len(serving) == 1:
        return DutyFix() if serving[0] == holder else DutyFix(adopt=serving[0])
    if not serving:
        if holder_ready:
            return DutyFix(activate=holder)
        return DutyFix(failover=holder) if holder_gone else DutyFix()
    keep = holder if holder in serving else duty if duty in serving else sorted(serving)[0]
    return DutyFix(adopt=None if keep == holder else keep,
                   stop=tuple(m for m in serving if m != keep))


@dataclass(frozen=True, slots=True)
class StateVerdict:
    """Whether a failover may activate a backup with the state its fetch step found."""

    source: StateSource  # the state the move carries: a too-old checkpoint is not carried
    refused_by: str | None  # the rule refusing the move (a ``failover.`` key), None: go on
    note: str  # what was found and what the rules said, for the record


def judge_state(found: StateSource, checkpoint_age: float | None, require_state: bool,
                max_checkpoint_age: float | None, allow_state_loss: bool) -> StateVerdict:
    """A checkpoint older than ``max_checkpoint_age`` is not moved: activating it would replay
    messages processed since and still lose everything acknowledged after it. A move with no
    state left is refused while ``require_state`` holds, unless an operator allows the loss."""
    if found == "live":
        return StateVerdict("live", None, "live state")
    if found == "checkpoint" and checkpoint_age is not None:
        if max_checkpoint_age is None or checkpoint_age <= max_checkpoint_age:
            return StateVerdict("checkpoint", None, f"checkpoint {checkpoint_age:.1f}s old")
        why = (f"the last checkpoint is {checkpoint_age:.1f}s old, over "
               f"failover.max_checkpoint_age ({max_checkpoint_age:g}s)")
        rule = "max_checkpoint_age"
    else:
        why, rule = "no live state and no usable checkpoint", "require_state"
    if allow_state_loss:
        return StateVerdict("none", None, f"{why}; state loss allowed by the operator")
    if not require_state:
        return StateVerdict("none", None, f"{why}; failover.require_state is false")
    return StateVerdict("none", rule, f"refused by failover.{rule}: {why}, and "
                        "failover.require_state forbids activating a backup without state")


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
