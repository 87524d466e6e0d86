"""Decisions from a routing table, for a producer that routes on its own (exporter.client).

The pool, topology and loads are rebuilt from the table exactly as the router builds them from
its state (same master order, same effective weights, the same serving flags for panic mode),
and the picker is the router's own (exporter.routing.strategies.build_picker), so for the same
table a fresh TableRouter makes the same decisions as the exporter's router after its last
rebuild: the same master for a key under consistent_hash, the same round-robin schedule.
"""

from __future__ import annotations

import random
from collections.abc import Collection

from exporter.routing.router import Decision, NoRoute
from exporter.routing.strategies import HashRing, Loads, Pool, Topology, build_picker
from exporter.routing.table import RoutingTable

_SERVING = frozenset({"healthy", "degraded"})


class TableRouter:
    """One table's decisions. ``excluded`` names masters the caller took out of rotation on its
    own (its deliveries failed); ``previous`` lends its consistent-hash ring when the master list
    and base weights are the same, since the ring is the costly part of a rebuild."""

    def __init__(
        self,
        table: RoutingTable,
        *,
        rng: random.Random | None = None,
        excluded: Collection[str] = (),
        previous: TableRouter | None = None,
    ) -> None:
        self.table = table
        masters = table.masters
        names = tuple(m.name for m in masters)
        weights = tuple(m.weight for m in masters)
        self._topo = Topology(names, tuple(m.region for m in masters),
                              tuple(m.priority for m in masters), weights)
        self._index = {name: i for i, name in enumerate(names)}
        self._regions = frozenset(self._topo.regions) | frozenset(table.region_fallback)
        self._loads = Loads([m.queue or 0.0 for m in masters], [0] * len(masters))
        members = [i for i, m in enumerate(masters)
                   if m.effective_weight > 0 and m.name not in excluded]
        pool = Pool(tuple(members), tuple(masters[i].effective_weight for i in members),
                    tuple(masters[i].state in _SERVING for i in members))
        self.size = len(members)  # masters in rotation
        self.ring: HashRing | None = None
        self._ring_key = (names, weights)
        if table.strategy == "consistent_hash" and members:
            if previous is not None and previous._ring_key == self._ring_key:
                self.ring = previous.ring
            if self.ring is None:
                self.ring = HashRing(names, weights)
        self._picker = build_picker(
            table.strategy, pool, self._topo, self._loads,
            rng=rng if rng is not None else random.Random(),
            saturation=table.saturation_queue, fallback=table.region_fallback, ring=self.ring,
        ) if members else None
        self._decisions = [Decision(m.name, m.url, table.strategy) for m in masters]

    def route(self, key: str | None = None, region: str | None = None) -> Decision:
        """Like Router.route: NoRoute when nobody can serve, ValueError for a region neither a
        master nor region_fallback names; empty key or region count as absent."""
        if region:
            if region not in self._regions:
                known = ", ".join(sorted(self._regions))
                raise ValueError(f"unknown region {region!r}; known regions: {known}")
        else:
            region = None
        if self._picker is None:
            raise NoRoute(self.table.no_route or "no master in the routing table takes traffic")
        member = self._picker.pick(key, region)
        self._loads.in_flight[member] += 1
        return self._decisions[member]

    def done(self, name: str) -> None:
        """A message routed here finished (least_loaded counts what is in flight)."""
        i = self._index.get(name)
        if i is not None and self._loads.in_flight[i] > 0:
            self._loads.in_flight[i] -= 1
