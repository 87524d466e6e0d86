"""Drive a master's health the way probes do: through its HealthMachine, never by assignment."""

from __future__ import annotations

import time

from exporter.fleet import MasterRuntime, State, Transition

# the probe result (ok, degraded) that moves a machine towards each state
_TOWARDS = {State.HEALTHY: (True, False), State.DEGRADED: (True, True),
            State.FAILED: (False, False)}


def drive(rt: MasterRuntime, target: State, reason: str = "test",
          now: float | None = None) -> Transition | None:
    """Feed probe results until ``rt`` is in ``target`` (maintenance: the operator's switch);
    the transition that got it there, None if it already was."""
    h = rt.health
    now = time.time() if now is None else now
    if target is State.MAINTENANCE:
        return h.set_maintenance(True, now)
    ok, degraded = _TOWARDS[target]
    last = None
    for _ in range(h.failure_threshold + h.recovery_threshold + 2):
        if h.state is target:
            break
        last = h.observe(ok, degraded, reason, now) or last
    assert h.state is target, f"{rt.name} is {h.state}, not {target}"
    return last
