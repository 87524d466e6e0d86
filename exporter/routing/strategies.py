"""Balancing strategies: pick one master per decision from the pool the router computed.

The router owns state (health, roles, ejection, weights) and rebuilds a :class:`Pool` only when
something changes; a strategy here is built once per pool and then answers decisions in O(1) or
O(log N), because the decision path has a 20 µs p99 budget at 10,000 masters.

Members are referred to by their index in the router's master list (``Topology``), so strategies
never touch names or configs on the hot path.

Consistent hashing: a ring (ketama style, virtual nodes proportional to base weight) over *all*
configured masters, built once per master list; health is applied at lookup time by walking
clockwise past points whose master is out of the pool. Chosen over rendezvous hashing, which is
O(N) per decision (about 5 ms at 10,000 masters in Python), and over Maglev, whose table must be
rebuilt (O(table) >> N) on every health change and which moves a few extra keys each time.
With the ring built once and membership checked per point, a leaving master's keys, and only
those, move (spread over its ring successors), and they come back when it returns.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b
from heapq import heapify, heappop, heappush, heapreplace
from struct import Struct

# SmoothWeighted rebases its virtual clock after this many picks to keep float keys precise.
_REBASE_AFTER = 1 << 20
_FORCE_REBASE = 1 << 26
# Ring: about this many points in total (bounded build time and memory at 10,000 masters) ...
_RING_TARGET_POINTS = 1 << 19
# ... with between these many virtual nodes per master of average weight.
_RING_MIN_VNODES, _RING_MAX_VNODES = 16, 160
_FLOAT_BITS = 53  # a ring point is an exact integer in a float: position bits + index bits
# Clockwise walk limit before falling back to a plain hash over the pool (only when less than
# about a tenth of the fleet is in the pool does a key ever get this far).
_RING_MAX_WALK = 128
_UNPACK_8Q = Struct(">8Q").unpack
# Priority: SWRR picks tried inside a group before choosing directly among its unsaturated ones.
_PRIORITY_TRIES = 4


class SmoothWeighted:
    """Smooth weighted round robin with nginx's guarantees in O(log N) per pick.

    nginx scans every server on each pick (O(N): about 1 ms at 10,000 masters in Python). This
    is the same fair, interleaved schedule computed as WF2Q over always-backlogged masters: the
    k-th turn of master i becomes eligible at virtual time (k-1)/w_i and is due at k/w_i; each
    pick takes the eligible turn due first, with virtual time t/sum(w) after t picks. No master
    ever runs a full pick ahead of its exact share, so for integer weights the first sum(w)
    picks hold exactly w_i turns of each master and the schedule repeats: every window of
    sum(w) consecutive picks has exact proportions. Keys are recomputed as p/w from integers
    (never accumulated), so equal rationals compare equal and ties break by index.
    """

    __slots__ = ("_eligible", "_integral", "_pending", "_picks", "_t", "_total", "_weights")

    def __init__(self, weights: Sequence[float]) -> None:
        if not weights:
            raise ValueError("SmoothWeighted needs at least one weight")
        self._weights = [float(w) for w in weights]
        if min(self._weights) <= 0 or not all(math.isfinite(w) for w in self._weights):
            raise ValueError("weights must be finite and greater than 0")
        self._total = math.fsum(self._weights)
        self._integral = self._total.is_integer() and all(w.is_integer() for w in self._weights)
        self._reset()

    def _reset(self) -> None:
        self._picks = [0] * len(self._weights)
        self._t = 0
        self._eligible: list[tuple[float, int]] = [
            (1.0 / w, i) for i, w in enumerate(self._weights)
        ]
        heapify(self._eligible)
        self._pending: list[tuple[float, int]] = []

    def __len__(self) -> int:
        return len(self._weights)

    def pick(self) -> int:
        """Index (into the weights given) of the next turn."""
        weights, picks, total = self._weights, self._picks, self._total
        eligible, pending = self._eligible, self._pending
        if pending:
            now = self._t / total
            while pending and pending[0][0] <= now:
                i = heappop(pending)[1]
                heappush(eligible, ((picks[i] + 1) / weights[i], i))
            if not eligible:  # only reachable through float rounding: take the earliest
                i = heappop(pending)[1]
                heappush(eligible, ((picks[i] + 1) / weights[i], i))
        i = eligible[0][1]
        p = picks[i] = picks[i] + 1
        t = self._t = self._t + 1
        w = weights[i]
        if p / w <= t / total:
            heapreplace(eligible, ((p + 1) / w, i))
        else:
            heappop(eligible)
            heappush(pending, (p / w, i))
        if t >= _REBASE_AFTER and (t >= _FORCE_REBASE or (self._integral and t % total == 0)):
            self._reset()  # at a period boundary this continues the schedule exactly
        return i


def key_hash(key: str) -> int:
    """Stable 64-bit hash (not Python's per-process salted hash): stickiness survives restarts."""
    return int.from_bytes(blake2b(key.encode(), digest_size=8).digest(), "big")


def _positions(name: str, count: int) -> list[int]:
    """``count`` stable 64-bit ring positions for a master: eight per blake2b-512 digest."""
    out: list[int] = []
    for block in range((count + 7) // 8):
        out.extend(_UNPACK_8Q(blake2b(f"{name}#{block}".encode(), digest_size=64).digest()))
    return out[:count]


class HashRing:
    """Ring of virtual nodes over every configured master; see the module docstring for why.

    A point is one float holding ``position << bits | master index`` as an exact integer
    below 2**53, so the sort and the bisect run on CPython's fast float comparisons (the build
    at 10,000 masters takes about a third of a second, once per master list)."""

    __slots__ = ("_bits", "_mask", "_points", "_shift")

    def __init__(self, names: Sequence[str], weights: Sequence[float]) -> None:
        n = len(names)
        bits = self._bits = max(1, (n - 1).bit_length())
        self._mask = (1 << bits) - 1
        shift = self._shift = 64 - (_FLOAT_BITS - bits)
        positive = [w for w in weights if w > 0]
        points: list[float] = []
        if positive:
            mean = math.fsum(positive) / len(positive)
            vnodes = min(_RING_MAX_VNODES, max(_RING_MIN_VNODES, _RING_TARGET_POINTS // n))
            for idx, (name, w) in enumerate(zip(names, weights, strict=True)):
                if w > 0:
                    count = max(1, round(vnodes * w / mean))
                    points.extend(
                        float(((pos >> shift) << bits) | idx) for pos in _positions(name, count)
                    )
        points.sort()
        self._points = points

    def __len__(self) -> int:
        return len(self._points)

    def lookup(self, h: int, eligible: bytearray) -> int:
        """First eligible master clockwise of hash ``h``; -1 if none within the walk limit."""
        points = self._points
        size = len(points)
        if not size:
            return -1
        i = bisect_left(points, float((h >> self._shift) << self._bits))
        mask = self._mask
        for step in range(min(_RING_MAX_WALK, size)):
            member = int(points[(i + step) % size]) & mask
            if eligible[member]:
                return member
        return -1


@dataclass(frozen=True, slots=True)
class Topology:
    """Static facts of the configured masters, indexed like the router's master list."""

    names: tuple[str, ...]
    regions: tuple[str, ...]
    priorities: tuple[int, ...]
    weights: tuple[float, ...]  # base weights from the config


@dataclass(frozen=True, slots=True)
class Pool:
    """The masters in rotation right now, with their effective weights (all > 0)."""

    members: tuple[int, ...]
    weights: tuple[float, ...]
    serving: tuple[bool, ...]  # False only for recovering masters let in by panic mode


@dataclass(slots=True)
class Loads:
    """Live load per master index, written by the router, read by strategies without rebuilds."""

    queue: list[float]
    in_flight: list[int]


class Picker:
    """One strategy built over one pool; ``pick`` returns a master index."""

    __slots__ = ()

    def pick(self, key: str | None, region: str | None) -> int:
        raise NotImplementedError

    def load_changed(self, member: int) -> None:
        """A master's queue sample changed (only saturation-aware strategies care)."""


class RoundRobin(Picker):
    __slots__ = ("_members", "_sched")

    def __init__(self, members: Sequence[int], weights: Sequence[float]) -> None:
        self._members = tuple(members)
        self._sched = SmoothWeighted(weights)

    def pick(self, key: str | None = None, region: str | None = None) -> int:
        return self._members[self._sched.pick()]


class _IndexedSet:
    """Set with O(1) add, discard and uniform choice."""

    __slots__ = ("_items", "_pos")

    def __init__(self) -> None:
        self._items: list[int] = []
        self._pos: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: int) -> bool:
        return item in self._pos

    def add(self, item: int) -> None:
        if item not in self._pos:
            self._pos[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: int) -> None:
        pos = self._pos.pop(item, None)
        if pos is None:
            return
        last = self._items.pop()
        if pos < len(self._items):
            self._items[pos] = last
            self._pos[last] = pos

    def choice(self, rng: random.Random) -> int:
        return self._items[rng.randrange(len(self._items))]


class _Group:
    __slots__ = ("free", "members", "sched")

    def __init__(self, members: list[int], weights: list[float]) -> None:
        self.members = members
        self.sched = SmoothWeighted(weights)
        self.free = _IndexedSet()


class Priority(Picker):
    """Lowest priority number first; spill to the next group when a group has nobody left
    below the saturation queue. Serving masters always rank before recovering ones let in by
    panic mode. Saturation is soft: when every master is saturated the first group takes it.
    Groups with free masters are kept in a lazy min-heap, so a decision is O(log groups)."""

    __slots__ = ("_group_of", "_groups", "_heap", "_in_heap", "_queue", "_rng", "_saturation")

    def __init__(
        self, pool: Pool, topo: Topology, loads: Loads, saturation: float, rng: random.Random
    ) -> None:
        by_rank: dict[tuple[bool, int], tuple[list[int], list[float]]] = {}
        for member, weight, serving in zip(pool.members, pool.weights, pool.serving, strict=True):
            members, weights = by_rank.setdefault((not serving, topo.priorities[member]), ([], []))
            members.append(member)
            weights.append(weight)
        self._groups = [_Group(*by_rank[rank]) for rank in sorted(by_rank)]
        self._group_of = {m: g for g, grp in enumerate(self._groups) for m in grp.members}
        self._queue = loads.queue
        self._saturation = saturation
        self._rng = rng
        for grp in self._groups:
            for m in grp.members:
                if self._queue[m] < saturation:
                    grp.free.add(m)
        self._heap = [g for g, grp in enumerate(self._groups) if grp.free]  # sorted: a heap
        self._in_heap = [bool(grp.free) for grp in self._groups]

    def pick(self, key: str | None = None, region: str | None = None) -> int:
        heap, groups = self._heap, self._groups
        while heap and not groups[heap[0]].free:
            self._in_heap[heappop(heap)] = False
        if not heap:
            grp = groups[0]
            return grp.members[grp.sched.pick()]
        grp = groups[heap[0]]
        for _ in range(_PRIORITY_TRIES):
            member = grp.members[grp.sched.pick()]
            if member in grp.free:
                return member
        return grp.free.choice(self._rng)

    def load_changed(self, member: int) -> None:
        g = self._group_of.get(member)
        if g is None:
            return
        grp = self._groups[g]
        if self._queue[member] >= self._saturation:
            grp.free.discard(member)
            return
        grp.free.add(member)
        if not self._in_heap[g]:
            self._in_heap[g] = True
            heappush(self._heap, g)


class LeastLoaded(Picker):
    """Power of two random choices on (queue + in-flight + 1) / weight: O(1) at any fleet size,
    and unlike a strict argmin it does not herd every producer onto the same idle master
    between two load samples."""

    __slots__ = ("_in_flight", "_members", "_n", "_queue", "_rng", "_weights")

    def __init__(self, pool: Pool, loads: Loads, rng: random.Random) -> None:
        self._members = pool.members
        self._weights = pool.weights
        self._n = len(pool.members)
        self._queue = loads.queue
        self._in_flight = loads.in_flight
        self._rng = rng

    def pick(self, key: str | None = None, region: str | None = None) -> int:
        n = self._n
        if n == 1:
            return self._members[0]
        rand = self._rng.randrange
        a = rand(n)
        b = rand(n - 1)
        if b >= a:
            b += 1
        ma, mb = self._members[a], self._members[b]
        queue, flight, weights = self._queue, self._in_flight, self._weights
        if (queue[mb] + flight[mb] + 1) * weights[a] < (queue[ma] + flight[ma] + 1) * weights[b]:
            return mb
        return ma


class Geo(Picker):
    """The request's region, then ``region_fallback`` in order, then anyone; weighted smooth
    round robin inside the chosen region. Resolution per request region is cached per pool."""

    __slots__ = ("_anywhere", "_by_region", "_fallback", "_resolved")

    def __init__(self, pool: Pool, topo: Topology, fallback: Sequence[str]) -> None:
        grouped: dict[str, tuple[list[int], list[float]]] = {}
        for member, weight in zip(pool.members, pool.weights, strict=True):
            members, weights = grouped.setdefault(topo.regions[member], ([], []))
            members.append(member)
            weights.append(weight)
        self._by_region = {r: RoundRobin(m, w) for r, (m, w) in grouped.items()}
        self._anywhere = RoundRobin(pool.members, pool.weights)
        self._fallback = tuple(fallback)
        self._resolved: dict[str | None, RoundRobin] = {}

    def region_for(self, region: str | None) -> RoundRobin:
        chosen = self._resolved.get(region)
        if chosen is None:
            chosen = self._anywhere
            if region is not None:
                for r in (region, *self._fallback):
                    if r in self._by_region:
                        chosen = self._by_region[r]
                        break
            self._resolved[region] = chosen
        return chosen

    def pick(self, key: str | None = None, region: str | None = None) -> int:
        return self.region_for(region).pick()


class ConsistentHash(Picker):
    """Ring lookup for keyed requests; requests without a key get smooth round robin."""

    __slots__ = ("_eligible", "_fallback", "_members", "_ring")

    def __init__(self, pool: Pool, ring: HashRing, size: int) -> None:
        self._ring = ring
        self._members = pool.members
        self._eligible = bytearray(size)
        for m in pool.members:
            self._eligible[m] = 1
        self._fallback = RoundRobin(pool.members, pool.weights)

    def pick(self, key: str | None = None, region: str | None = None) -> int:
        if not key:
            return self._fallback.pick()
        h = key_hash(key)
        member = self._ring.lookup(h, self._eligible)
        if member < 0:  # tiny pool far from the key: plain hash, still stable while pool is
            member = self._members[h % len(self._members)]
        return member


def build_picker(
    strategy: str,
    pool: Pool,
    topo: Topology,
    loads: Loads,
    *,
    rng: random.Random,
    saturation: float,
    fallback: Sequence[str],
    ring: HashRing | None = None,
) -> Picker:
    """The strategy object for one pool (non-empty); ``ring`` is required for consistent_hash."""
    if strategy == "round_robin":
        return RoundRobin(pool.members, pool.weights)
    if strategy == "priority":
        return Priority(pool, topo, loads, saturation, rng)
    if strategy == "least_loaded":
        return LeastLoaded(pool, loads, rng)
    if strategy == "geo":
        return Geo(pool, topo, fallback)
    if strategy == "consistent_hash":
        if ring is None:
            raise ValueError("consistent_hash needs a HashRing")
        return ConsistentHash(pool, ring, len(topo.names))
    raise ValueError(f"unknown strategy {strategy!r}")
