"""The router: which masters may take traffic right now, at what weight, and which one next.

State changes (health, role, ejection, rebalance factor, strategy, slow-start ramp steps) mark
the pool dirty; the next decision rebuilds the pool and the strategy's structures once, in O(N).
Decisions themselves never scan the fleet, so they stay within a few microseconds at 10,000
masters (see bench/bench_route_decisions.py).

Who gets traffic:
  * only masters whose current role is ``active`` and whose base weight is above 0;
  * healthy at full weight, degraded at ``weight * degraded_weight``; failed, recovering,
    maintenance and outlier-ejected masters get nothing;
  * panic (Envoy semantics): when fewer than ``panic_threshold`` of the active masters are
    serving (healthy or degraded, not ejected), recovering masters join the pool too, at
    ``weight * degraded_weight``, rather than crushing the survivors. Failed, maintenance and
    ejected masters stay out even then;
  * slow start: a master that comes back to serving (health, re-admission after ejection,
    activation, or added by a reload) ramps linearly from 10% to 100% of its weight over
    ``slow_start`` seconds, in steps of 1/20th of the window;
  * rebalancing multiplies the weight by the master's factor (see exporter.routing.rebalancing).

Passive outlier detection: ``outlier_consecutive_failures`` failed reports in a row eject a
master at once, as long as no more than ``floor(max_ejection_percent * active masters)`` are
ejected; the next time the health machine says it is serving it is re-admitted (with slow
start). When the health machine takes it out (failed, maintenance) the ejection is dropped:
the health machine owns it from there.

The routing table (``self.table``, exporter.routing.table) publishes this pool to producers,
which route from it with the same strategies; every change marks it for a rebuild.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from exporter.config import STRATEGIES, BalancingConfig, MasterConfig
from exporter.fleet import SERVING, RoleChanged, Sample, State, Transition
from exporter.routing.rebalancing import LoadSample, RebalanceEvent, Rebalancer
from exporter.routing.rebalancing import distribution_quality as _quality
from exporter.routing.strategies import HashRing, Loads, Picker, Pool, Topology, build_picker
from exporter.routing.table import TableFeed, TableRow, TableSource

ACTIVE, STANDBY = "active", "standby"
ROLES: tuple[str, ...] = (ACTIVE, STANDBY)
SLOW_START_FLOOR = 0.1
SLOW_START_STEPS = 20


@dataclass(frozen=True, slots=True)
class Decision:
    master: str
    url: str
    strategy: str


class NoRoute(Exception):
    """Nobody can take the message; ``str(exc)`` is the reason for the 503 body."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Member:
    """Routing state of one master; survives reloads as long as the name does."""

    __slots__ = ("config", "ejected", "failures", "latency", "ramp_start", "role", "state")

    def __init__(self, config: MasterConfig) -> None:
        self.config = config
        self.role: str = config.role
        self.state = State.HEALTHY  # like HealthMachine: assumed healthy until probed
        self.ejected = False
        self.failures = 0
        self.ramp_start: float | None = None
        self.latency: float | None = None


class Router:
    """Routing decisions for one fleet. Not thread-safe: use it from the event loop."""

    def __init__(
        self,
        balancing: BalancingConfig,
        masters: Sequence[MasterConfig],
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self.table = TableFeed(self.table_source, clock)  # GET /api/v1/routing-table
        self._balancing = balancing
        self._strategy: str = balancing.strategy
        self._rebalancer = Rebalancer(balancing.rebalance)
        self.decisions: dict[tuple[str, str], int] = {}
        self._members: list[_Member] = []
        self._index: dict[str, int] = {}
        self._ring: HashRing | None = None
        self._topo = Topology((), (), (), ())
        self._pool = Pool((), (), ())
        self._weight_of: dict[int, float] = {}
        self._panic = False
        self._ramping = False
        self._next_refresh = math.inf
        self._no_route = ""
        self._labels: list[tuple[str, str]] = []
        self._decisions: list[Decision] = []
        self._apply_masters(masters, added_ramp=False)

    # ---- configuration ------------------------------------------------------------------

    def update_config(self, balancing: BalancingConfig, masters: Sequence[MasterConfig]) -> None:
        """Reload. Masters keep their routing state by name, roles included (the duty table
        publishes a role a reload changes). The configured strategy replaces a run-time
        choice only when the configured value itself changed, so a reload does not silently
        undo a PUT /api/v1/balancing/strategy."""
        if balancing.strategy != self._balancing.strategy:
            self._strategy = balancing.strategy
        self._balancing = balancing
        self._rebalancer.configure(balancing.rebalance)
        self._apply_masters(masters, added_ramp=True)
        self._rebalancer.forget(self._index)

    def _apply_masters(self, masters: Sequence[MasterConfig], added_ramp: bool) -> None:
        old_members, old_index = self._members, self._index
        old_loads = getattr(self, "_loads", None)
        old_known = getattr(self, "_queue_known", None)
        now = self._clock()
        members: list[_Member] = []
        queue: list[float] = []
        in_flight: list[int] = []
        known: list[bool] = []
        for cfg in masters:
            i = old_index.get(cfg.name)
            if i is None or old_loads is None or old_known is None:
                m = _Member(cfg)
                if added_ramp and m.role == ACTIVE:
                    m.ramp_start = now
                queue.append(0.0)
                in_flight.append(0)
                known.append(False)
            else:
                m = old_members[i]
                m.config = cfg
                queue.append(old_loads.queue[i])
                in_flight.append(old_loads.in_flight[i])
                known.append(old_known[i])
            members.append(m)
        index = {m.config.name: i for i, m in enumerate(members)}
        if len(index) != len(members):
            raise ValueError("master names must be unique")
        topo = Topology(
            names=tuple(m.config.name for m in members),
            regions=tuple(m.config.region for m in members),
            priorities=tuple(m.config.priority for m in members),
            weights=tuple(m.config.weight for m in members),
        )
        if (topo.names, topo.weights) != (self._topo.names, self._topo.weights):
            self._ring = None
        self._members, self._index, self._topo = members, index, topo
        self._loads = Loads(queue, in_flight)
        self._queue_known = known
        self._regions = frozenset(topo.regions) | frozenset(self._balancing.region_fallback)
        self._n_active = sum(m.role == ACTIVE for m in members)
        self._n_ejected = sum(m.ejected for m in members)
        self._labels_for: str | None = None
        self._mark_dirty()

    # ---- inputs: the fleet's events ----------------------------------------------------------

    def on_transition(self, t: Transition) -> None:
        if t.master in self._index:
            self.set_state(t.master, t.new)

    def on_sample(self, s: Sample) -> None:
        """After a successful probe the health machine's state is fed in (it re-admits an
        ejected master); a failed probe under the threshold must not re-admit one."""
        if s.master in self._index:
            if s.ok:
                self.set_state(s.master, s.state)
            self.set_load(s.master, s.queue_length)

    def on_role(self, e: RoleChanged) -> None:
        if e.master in self._index:
            self.set_role(e.master, e.new)

    # ---- inputs -------------------------------------------------------------------------

    def _member(self, name: str) -> _Member:
        try:
            return self._members[self._index[name]]
        except KeyError:
            raise KeyError(f"unknown master {name!r}") from None

    def _mark_dirty(self) -> None:
        self._dirty = True
        self._picker: Picker | None = None
        self.table.changed()

    def _set_ejected(self, m: _Member, ejected: bool) -> None:
        if m.ejected != ejected:
            m.ejected = ejected
            self._n_ejected += 1 if ejected else -1

    def set_state(self, name: str, state: State | str) -> None:
        """Feed the health machine's view after every successful probe and every transition:
        an ejected master whose health never changed is re-admitted only here. (Not after a
        failed probe under the threshold: that would re-admit a master the reports ejected.)"""
        m = self._member(name)
        state = State(state)
        old = m.state
        changed = state is not old
        if state in SERVING:
            if m.ejected:
                self._set_ejected(m, False)
                m.failures = 0
                m.ramp_start = self._clock()
                changed = True
            elif old not in SERVING and m.role == ACTIVE:
                m.ramp_start = self._clock()
        elif state is not State.RECOVERING and m.ejected:
            self._set_ejected(m, False)
            changed = True
        m.state = state
        if changed:
            self._mark_dirty()

    def set_role(self, name: str, role: str) -> None:
        """Failover's switch: standbys get traffic only once activated."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        m = self._member(name)
        if m.role == role:
            return
        m.role = role
        if role == ACTIVE:
            self._n_active += 1
            if m.state in SERVING:
                m.ramp_start = self._clock()
        else:
            self._n_active -= 1
            self._set_ejected(m, False)
        self._mark_dirty()

    def set_load(self, name: str, queue_length: float | None) -> None:
        """Latest queue_length from /health (None: unknown). It supersedes the in-flight
        estimate, which also bounds drift from reports that never arrive."""
        i = self._index.get(name)
        if i is None:
            raise KeyError(f"unknown master {name!r}")
        if queue_length is not None and math.isfinite(queue_length):
            self._loads.queue[i] = max(0.0, float(queue_length))
            self._queue_known[i] = True
        else:
            self._loads.queue[i] = 0.0
            self._queue_known[i] = False
        self._loads.in_flight[i] = 0
        self.table.load_changed()
        if self._picker is not None:
            self._picker.load_changed(i)

    def report(self, name: str, ok: bool, latency_seconds: float) -> bool:
        """Outcome of one routed message. Returns True when this report ejected the master."""
        i = self._index.get(name)
        if i is None:
            raise KeyError(f"unknown master {name!r}")
        m = self._members[i]
        flight = self._loads.in_flight
        if flight[i] > 0:
            flight[i] -= 1
        if math.isfinite(latency_seconds) and latency_seconds >= 0:
            m.latency = latency_seconds
        if ok:
            m.failures = 0
            return False
        m.failures += 1
        if (
            m.ejected
            or m.failures < self._balancing.outlier_consecutive_failures
            or m.role != ACTIVE
            or m.state in (State.FAILED, State.MAINTENANCE)
            or self._n_ejected >= self.ejection_limit
        ):
            return False
        self._set_ejected(m, True)
        self._mark_dirty()
        return True

    def set_strategy(self, name: str) -> None:
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
        if name != self._strategy:
            self._strategy = name
            self._mark_dirty()

    # ---- decisions ----------------------------------------------------------------------

    @property
    def strategy(self) -> str:
        return self._strategy

    @property
    def ejection_limit(self) -> int:
        return math.floor(self._balancing.max_ejection_percent * self._n_active + 1e-9)

    @property
    def panic(self) -> bool:
        self._fresh()
        return self._panic

    def route(self, key: str | None = None, region: str | None = None) -> Decision:
        """One decision. Raises NoRoute when nobody can serve, ValueError for a region no
        master (and no region_fallback entry) names. Empty key or region count as absent."""
        if region:
            if region not in self._regions:
                known = ", ".join(sorted(self._regions))
                raise ValueError(f"unknown region {region!r}; known regions: {known}")
        else:
            region = None
        if self._dirty or (self._ramping and self._clock() >= self._next_refresh):
            self._refresh()
        picker = self._picker
        if picker is None:
            raise NoRoute(self._no_route)
        member = picker.pick(key, region)
        self._loads.in_flight[member] += 1
        label = self._labels[member]
        decisions = self.decisions
        decisions[label] = decisions.get(label, 0) + 1
        return self._decisions[member]

    def warm(self) -> None:
        """Build the pool and the current strategy's structures now rather than on the next
        decision: call it after start-up, a reload or a strategy switch. The consistent_hash
        ring is the costly one (about 0.35 s at 10,000 masters, once per master list)."""
        self._fresh()

    def _fresh(self) -> None:
        if self._dirty or (self._ramping and self._clock() >= self._next_refresh):
            self._refresh()

    def _refresh(self) -> None:
        """Rebuild the pool and the current strategy's structures: O(N), only after a change."""
        now = self._clock()
        bal = self._balancing
        members = self._members
        serving_active = sum(
            1 for m in members if m.role == ACTIVE and not m.ejected and m.state in SERVING
        )
        panic = self._n_active > 0 and serving_active < bal.panic_threshold * self._n_active
        factor = self._rebalancer.factor
        slow = bal.slow_start
        pool_members: list[int] = []
        pool_weights: list[float] = []
        pool_serving: list[bool] = []
        next_refresh = math.inf
        for i, m in enumerate(members):
            if m.role != ACTIVE or m.ejected:
                continue
            state = m.state
            if state is State.HEALTHY:
                w = 1.0
            elif state is State.DEGRADED or (panic and state is State.RECOVERING):
                w = bal.degraded_weight
            else:
                continue
            w *= m.config.weight * factor(m.config.name)
            if m.ramp_start is not None:
                elapsed = max(0.0, now - m.ramp_start)
                if elapsed >= slow:
                    m.ramp_start = None
                else:
                    w *= SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * elapsed / slow
                    next_refresh = min(next_refresh, now + slow / SLOW_START_STEPS)
            if w > 0:
                pool_members.append(i)
                pool_weights.append(w)
                pool_serving.append(state in SERVING)
        self._pool = Pool(tuple(pool_members), tuple(pool_weights), tuple(pool_serving))
        self._weight_of = dict(zip(pool_members, pool_weights, strict=True))
        self._panic = panic
        self._next_refresh = next_refresh
        self._ramping = next_refresh != math.inf
        strategy = self._strategy
        if self._labels_for != strategy:
            self._labels = [(m.config.name, strategy) for m in members]
            self._decisions = [Decision(m.config.name, m.config.url, strategy) for m in members]
            self._labels_for = strategy
        if pool_members:
            if self._strategy == "consistent_hash" and self._ring is None:
                self._ring = HashRing(self._topo.names, self._topo.weights)
            self._picker = build_picker(
                self._strategy,
                self._pool,
                self._topo,
                self._loads,
                rng=self._rng,
                saturation=bal.saturation_queue,
                fallback=bal.region_fallback,
                ring=self._ring,
            )
            self._no_route = ""
        else:
            self._picker = None
            self._no_route = self._explain(serving_active)
        self._dirty = False

    def _explain(self, serving_active: int) -> str:
        members = self._members
        if not members:
            return "no masters configured"
        if self._n_active == 0:
            return f"no active master: all {len(members)} configured masters are standby"
        counts: dict[str, int] = {}
        for m in members:
            if m.role == ACTIVE:
                key = "ejected" if m.ejected else str(m.state)
                counts[key] = counts.get(key, 0) + 1
        detail = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        if serving_active:
            return f"no active master with a routing weight above 0 ({detail})"
        return f"no active master can take traffic ({detail})"

    # ---- views --------------------------------------------------------------------------

    def effective_weights(self) -> dict[str, float]:
        """Weight each master gets right now (ha_master_routing_weight); 0 out of rotation."""
        self._fresh()
        weight_of = self._weight_of
        return {name: weight_of.get(i, 0.0) for i, name in enumerate(self._topo.names)}

    def table_source(self) -> TableSource:
        """The pool as of now for the routing table (exporter.routing.table)."""
        self._fresh()
        queue, known, weight_of = self._loads.queue, self._queue_known, self._weight_of
        rows = [TableRow(m.config, m.role, str(m.state), m.ejected, weight_of.get(i, 0.0),
                         queue[i] if known[i] else None) for i, m in enumerate(self._members)]
        return TableSource(self._strategy, self._panic, self._balancing, rows, self._no_route,
                           self._next_refresh)

    def is_ejected(self, name: str) -> bool:
        return self._member(name).ejected

    def master_info(self, name: str) -> dict[str, Any]:
        """Routing facts of one master for the API and the status page."""
        m = self._member(name)
        i = self._index[name]
        self._fresh()
        ramp = None
        if m.ramp_start is not None:
            ramp = max(0.0, self._balancing.slow_start - (self._clock() - m.ramp_start))
        return {
            "role": m.role,
            "state": str(m.state),
            "weight": self._weight_of.get(i, 0.0),
            "ejected": m.ejected,
            "consecutive_report_failures": m.failures,
            "in_flight": self._loads.in_flight[i],
            "queue_length": self._loads.queue[i] if self._queue_known[i] else None,
            "rebalance_factor": self._rebalancer.factor(name),
            "slow_start_remaining_seconds": ramp,
            "last_report_latency_seconds": m.latency,
        }

    def _samples(self) -> list[LoadSample]:
        self._fresh()
        names, weights, queue = self._topo.names, self._topo.weights, self._loads.queue
        return [
            LoadSample(names[i], queue[i], weights[i])
            for i in self._pool.members
            if self._queue_known[i] and weights[i] > 0
        ]

    def evaluate_rebalance(self) -> list[RebalanceEvent]:
        """One rebalancing round (call it periodically, e.g. each probe interval)."""
        events = self._rebalancer.evaluate(self._clock(), self._samples())
        if events:
            self._mark_dirty()
        return events

    def distribution_quality(self) -> float:
        """ha_load_distribution_quality, 0..100 (definition in exporter.routing.rebalancing)."""
        return _quality(self._samples())
