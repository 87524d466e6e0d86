"""Health state per master: a hysteresis state machine fed by probe results.

The machine is pure (no I/O, the caller passes the clock) so that it can be checked
property-based over random probe sequences, and cheap (``__slots__``) so that 10,000 masters
cost little memory. Every transition is returned to the caller, which logs and publishes it.
"""

from __future__ import annotations

from exporter.fleet.events import Transition
from exporter.fleet.states import SERVING, State


class HealthMachine:
    """Hysteresis: ``failure_threshold`` consecutive failures to fail, ``recovery_threshold``
    consecutive successes to heal; one failure while recovering sends it back to failed and
    counts a recovery attempt; past ``max_recovery_attempts`` it stays failed until reset."""

    __slots__ = (
        "consecutive_failures",
        "consecutive_successes",
        "failed_since",
        "failure_threshold",
        "max_recovery_attempts",
        "name",
        "needs_reset",
        "recovery_attempts",
        "recovery_threshold",
        "state",
    )

    def __init__(
        self,
        name: str,
        failure_threshold: int,
        recovery_threshold: int,
        max_recovery_attempts: int = 5,
        state: State = State.HEALTHY,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.recovery_threshold = recovery_threshold
        self.max_recovery_attempts = max_recovery_attempts
        self.state = state
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.recovery_attempts = 0
        self.failed_since: float | None = None
        self.needs_reset = False

    def observe(self, ok: bool, degraded: bool, reason: str, now: float) -> Transition | None:
        """Feed one probe result; return the transition it caused, if any."""
        if ok:
            self.consecutive_failures = 0
            self.consecutive_successes += 1
        else:
            self.consecutive_successes = 0
            self.consecutive_failures += 1
        state = self.state
        if state is State.MAINTENANCE:
            return None
        target: State = state
        if not ok:
            if state is State.RECOVERING:
                self.recovery_attempts += 1
                if self.recovery_attempts >= self.max_recovery_attempts:
                    self.needs_reset = True
                target = State.FAILED
            elif state in SERVING and self.consecutive_failures >= self.failure_threshold:
                target = State.FAILED
        elif state is State.FAILED:
            if not self.needs_reset:
                target = (
                    self._serving(degraded)
                    if self.consecutive_successes >= self.recovery_threshold
                    else State.RECOVERING
                )
        elif state is State.RECOVERING:
            if self.consecutive_successes >= self.recovery_threshold:
                target = self._serving(degraded)
        elif state is State.HEALTHY and degraded:
            target = State.DEGRADED
        elif state is State.DEGRADED and not degraded:
            target = State.HEALTHY
        return self._move(target, reason, now)

    def _serving(self, degraded: bool) -> State:
        return State.DEGRADED if degraded else State.HEALTHY

    def _move(self, target: State, reason: str, now: float) -> Transition | None:
        if target is self.state:
            return None
        old, self.state = self.state, target
        if target is State.FAILED and old is not State.RECOVERING:
            self.failed_since = now
        elif target in SERVING:
            self.failed_since = None
            self.recovery_attempts = 0
        return Transition(self.name, old, target, reason, now)

    def assume(self, state: State, reason: str, now: float) -> Transition | None:
        """Take a state decided elsewhere (a cluster's quorum of observers, each running a
        machine of its own on its probes). Maintenance is a fact of its own and is kept."""
        if self.state is State.MAINTENANCE or state is State.MAINTENANCE:
            return None
        return self._move(state, reason, now)

    def set_maintenance(self, on: bool, now: float) -> Transition | None:
        """Drain (on) or hand back to the probes (off: it must earn healthy again)."""
        if on:
            return self._move(State.MAINTENANCE, "maintenance requested", now)
        if self.state is not State.MAINTENANCE:
            return None
        self.consecutive_successes = 0
        return self._move(State.RECOVERING, "maintenance ended", now)

    def reset(self, now: float) -> Transition | None:
        """Manual reset: clear counters and the attempt limit; the probes decide from here."""
        self.needs_reset = False
        self.recovery_attempts = 0
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        if self.state in (State.FAILED, State.MAINTENANCE):
            return self._move(State.RECOVERING, "manual reset", now)
        return None

    def recovery_timed_out(self, now: float, recovery_timeout: float) -> bool:
        return self.failed_since is not None and now - self.failed_since > recovery_timeout
