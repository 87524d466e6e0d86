"""The fleet as the exporter sees it at run time: one compact record per master.

A probe's outcome is folded into its master's record in one place (``MasterRuntime.apply``),
which also feeds the health machine; metrics, the API and failover only read the records.
``__slots__`` and flat fields keep 10,000 masters cheap.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from exporter.config import MasterConfig, ProbeConfig
from exporter.fleet.events import Transition
from exporter.fleet.health import HealthMachine
from exporter.fleet.states import RESULTS, Outcome, Result, State

_RESULT_INDEX = {r: i for i, r in enumerate(RESULTS)}

# Probe latency buckets (seconds), from loopback to past the default 2 s timeout: the bounds of
# MasterRuntime.bucket_counts and of the ha_master_probe_duration_seconds histogram.
PROBE_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class MasterRuntime:
    """Live facts about one master; ``config`` is replaced on reload, the rest survives."""

    __slots__ = (
        "active_messages",
        "bucket_counts",
        "config",
        "cpu_percent",
        "health",
        "in_flight",
        "last_error",
        "last_latency",
        "last_probe_wall",
        "last_status",
        "memory_percent",
        "probe_sum",
        "queue_length",
        "remote_views",
        "reported_active",
        "reported_duties",
        "result_counts",
        "up",
    )

    def __init__(
        self, config: MasterConfig, probe: ProbeConfig, max_recovery_attempts: int
    ) -> None:
        self.config = config
        self.health = HealthMachine(
            config.name, probe.failure_threshold, probe.recovery_threshold, max_recovery_attempts
        )
        self.up = False
        self.in_flight = False
        self.last_probe_wall: float | None = None
        self.last_latency: float | None = None
        self.last_error = ""
        self.last_status = ""
        self.queue_length: float | None = None
        self.active_messages: float | None = None
        self.cpu_percent: float | None = None
        self.memory_percent: float | None = None
        self.reported_active: bool | None = None  # what the master's /health says of itself
        self.reported_duties: tuple[str, ...] | None = None  # the duties it says it serves
        self.bucket_counts = [0] * (len(PROBE_BUCKETS) + 1)  # last slot is +Inf only
        self.probe_sum = 0.0
        self.result_counts = [0] * len(RESULTS)
        self.remote_views = 0  # views taken from other cluster members (``adopt``)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state(self) -> State:
        return self.health.state

    def apply(self, outcome: Outcome, now: float) -> Transition | None:
        """Fold one probe into the record and the health machine; the transition it caused,
        if any, is for the caller to publish."""
        ok, reason = self.record(outcome, now)
        return self.health.observe(ok, outcome.degraded, reason, now)

    def record(self, outcome: Outcome, now: float) -> tuple[bool, str]:
        """Fold one probe into the figures only (a cluster member's health comes from its
        observers' quorum); returns whether it succeeded and the reason for a health
        machine."""
        self.last_probe_wall = now
        self.last_latency = outcome.latency
        self.record_latency(outcome.latency)
        self.result_counts[_RESULT_INDEX[outcome.result]] += 1
        ok = outcome.result is Result.SUCCESS
        self.up = ok
        self.last_status = str(outcome.result)
        self.last_error = "" if ok else outcome.detail
        payload = outcome.payload
        if payload is not None:
            self.queue_length = payload.get("queue_length", self.queue_length)
            self.active_messages = payload.get("active_messages", self.active_messages)
            self.cpu_percent = payload.get("cpu_percent", self.cpu_percent)
            self.memory_percent = payload.get("memory_percent", self.memory_percent)
            active = payload.get("active")
            self.reported_active = active if isinstance(active, bool) else None
            duties = payload.get("duties")
            self.reported_duties = tuple(duties) if isinstance(duties, list) else None
        else:
            # no answer is no evidence that it is (still) active or serving anything
            self.reported_active = None
            self.reported_duties = None
        return ok, str(outcome.result) + (f": {outcome.detail}" if outcome.detail else "")

    def adopt(self, up: bool, active: bool | None, duties: Sequence[str] | None,
              queue: float | None = None) -> None:
        """What another cluster member's probes say of a master this replica does not probe
        (its queue as that member published it: within a factor of two)."""
        self.remote_views += 1
        if queue is not None:
            self.queue_length = queue
        self.up = up
        self.reported_active = active
        self.reported_duties = tuple(duties) if duties is not None else None

    def record_latency(self, seconds: float) -> None:
        self.probe_sum += seconds
        for i, bound in enumerate(PROBE_BUCKETS):
            if seconds <= bound:
                self.bucket_counts[i] += 1
                return
        self.bucket_counts[-1] += 1

    def as_dict(
        self,
        role: str,
        recovery_timeout: float,
        now: float | None = None,
        *,
        duties: Sequence[str] = (),
    ) -> dict[str, Any]:
        """The JSON shape of /api/v1/masters. ``role`` and ``duties`` are the exporter's belief
        (the duty table); ``reported_active`` and ``reported_duties`` are what the master's
        last answer said of itself (null when unknown), shown side by side so that a drift
        between the two is visible."""
        now = time.time() if now is None else now
        h = self.health
        return {
            "name": self.name,
            "url": self.config.url,
            "region": self.config.region,
            "priority": self.config.priority,
            "role": role,
            "configured_role": self.config.role,
            "duties": list(duties),
            "reported_active": self.reported_active,
            "reported_duties": (
                list(self.reported_duties) if self.reported_duties is not None else None
            ),
            "weight": self.config.weight,
            "state": str(h.state),
            "up": self.up,
            "consecutive_failures": h.consecutive_failures,
            "consecutive_successes": h.consecutive_successes,
            "recovery_attempts": h.recovery_attempts,
            "needs_reset": h.needs_reset,
            "failed_since": h.failed_since,
            "recovery_timed_out": h.recovery_timed_out(now, recovery_timeout),
            "last_probe": self.last_probe_wall,
            "last_latency_seconds": self.last_latency,
            "last_error": self.last_error or None,
            "queue_length": self.queue_length,
            "active_messages": self.active_messages,
            "cpu_percent": self.cpu_percent,
            "memory_percent": self.memory_percent,
            "probes": {str(r): n for r, n in zip(RESULTS, self.result_counts, strict=True)},
        }


class Fleet:
    """Ordered registry of MasterRuntime; reload keeps the runtime of unchanged names."""

    def __init__(
        self, masters: Sequence[MasterConfig], probe: ProbeConfig, max_recovery_attempts: int
    ) -> None:
        self._by_name: dict[str, MasterRuntime] = {}
        self.update(masters, probe, max_recovery_attempts)

    def update(
        self, masters: Sequence[MasterConfig], probe: ProbeConfig, max_recovery_attempts: int
    ) -> tuple[list[str], list[str], list[str]]:
        """Apply a (re)loaded master list; returns (added, removed, changed) names."""
        old = self._by_name
        new: dict[str, MasterRuntime] = {}
        added, changed = [], []
        for cfg in masters:
            rt = old.get(cfg.name)
            if rt is None:
                rt = MasterRuntime(cfg, probe, max_recovery_attempts)
                added.append(cfg.name)
            else:
                if rt.config != cfg:
                    changed.append(cfg.name)
                rt.config = cfg
            h = rt.health
            h.failure_threshold = probe.failure_threshold
            h.recovery_threshold = probe.recovery_threshold
            h.max_recovery_attempts = max_recovery_attempts
            new[cfg.name] = rt
        removed = [name for name in old if name not in new]
        self._by_name = new
        return added, removed, changed

    def __iter__(self) -> Iterator[MasterRuntime]:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str) -> MasterRuntime | None:
        return self._by_name.get(name)

    def health_score(self) -> float:
        """0..100 over masters not in maintenance: healthy counts 1, degraded 0.5, others 0."""
        score, counted = 0.0, 0
        for rt in self._by_name.values():
            state = rt.health.state
            if state is State.MAINTENANCE:
                continue
            counted += 1
            if state is State.HEALTHY:
                score += 1.0
            elif state is State.DEGRADED:
                score += 0.5
        return 100.0 * score / counted if counted else 100.0
