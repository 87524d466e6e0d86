"""The routing table: what a producer needs to make the router's decisions itself.

``GET /api/v1/routing-table`` serves it (exporter.web.routing) and exporter.client routes from it
with the router's own strategy classes (exporter.routing.local), so producers need the exporter
for changes only, not for every message, and keep going on their last table while no exporter
answers.

One table per router, kept by its :class:`TableFeed`. ``version`` grows when, and only when,
the table's content changes. A snapshot is rebuilt lazily, on the next read after the router
marked its pool dirty (health, role, ejection, weights, strategy, reload), after a slow-start
step, or once queue figures changed and ``queue_refresh`` seconds passed since the last rebuild
that took them in (queue figures move with every probe: publishing each would wake every watcher
every few milliseconds at 10,000 masters). A rebuild that yields the same table keeps the
version. The first version is the creation time in milliseconds, so a restarted exporter never
reuses a number a client still holds: a watch with that number is answered at once.

Watchers wait on an :class:`asyncio.Event` replaced at each change, so a waiting request costs
nothing until something changes; at most ``max_waiters`` wait at once, because each holds one of
the server's bounded connections (exporter.web.connections), which scrapes need too.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from exporter.config import MAX_WEIGHT, BalancingConfig, HttpUrl, Label, MasterConfig, Strategy
from exporter.fleet import STATES

#: Table format; a client refuses (and asks per message instead) a format it does not know.
FORMAT = 1
#: Bounds a client holds a table to: more masters than any fleet the exporter is built for.
MAX_TABLE_MASTERS = 50_000
MAX_TABLE_BYTES = 32 << 20
MAX_NAME, MAX_URL, MAX_REASON = 200, 2048, 2000
#: Concurrent watchers per exporter; beyond it a watch is answered 503.
MAX_WAITERS = 256
#: Seconds between two rebuilds driven by queue figures alone.
QUEUE_REFRESH = 5.0

StateName = Literal["healthy", "degraded", "failed", "recovering", "maintenance"]
_SERVING = ("healthy", "degraded")
_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)
_Name = Annotated[Label, Field(min_length=1, max_length=MAX_NAME)]
_Weight = Annotated[float, Field(ge=0, le=MAX_WEIGHT, allow_inf_nan=False)]

assert set(get_args(StateName)) == {str(s) for s in STATES}, "StateName lags fleet.State"


class TableMaster(BaseModel):
    """One configured master, in the router's order (the consistent-hash ring depends on it)."""

    model_config = _STRICT
    name: _Name
    url: Annotated[HttpUrl, Field(max_length=MAX_URL)]
    region: _Name
    priority: int = Field(ge=0, le=1_000_000)
    weight: _Weight  # base weight from the config: the ring's input
    effective_weight: _Weight  # 0: not in rotation
    state: StateName
    role: Literal["active", "standby"]
    ejected: bool
    queue: Annotated[float, Field(ge=0, le=1e15, allow_inf_nan=False)] | None  # None: unknown


class RoutingTable(BaseModel):
    """The whole table, validated strictly: a client never routes on a table it cannot trust."""

    model_config = _STRICT
    format: Literal[1]
    version: int = Field(ge=0, le=2**63 - 1)
    strategy: Strategy
    panic: bool
    region_fallback: list[_Name] = Field(max_length=MAX_TABLE_MASTERS)
    saturation_queue: int = Field(ge=1, le=1_000_000_000)
    outlier_consecutive_failures: int = Field(ge=1, le=10_000)
    max_ejection_percent: float = Field(ge=0, le=1, allow_inf_nan=False)
    no_route: Annotated[str, Field(max_length=MAX_REASON)] | None
    masters: list[TableMaster] = Field(max_length=MAX_TABLE_MASTERS)

    @model_validator(mode="after")
    def _consistent(self) -> RoutingTable:
        """Names unique, and only masters the router could route to carry a weight."""
        if len({m.name for m in self.masters}) != len(self.masters):
            raise ValueError("master names must be unique")
        for m in self.masters:
            usable = m.state in _SERVING or (self.panic and m.state == "recovering")
            if m.effective_weight > 0 and (m.role != "active" or m.ejected or not usable):
                raise ValueError(f"master {m.name!r} has a weight but cannot take traffic")
        return self


@dataclass(frozen=True, slots=True)
class TableRow:
    """One master as the router sees it right now."""

    config: MasterConfig
    role: str
    state: str
    ejected: bool
    weight: float  # effective
    queue: float | None


@dataclass(frozen=True, slots=True)
class TableSource:
    """What the router hands its feed: the pool as of now, and when it next changes by itself
    (a slow-start step; ``math.inf`` when nothing ramps), in the router's clock."""

    strategy: str
    panic: bool
    balancing: BalancingConfig
    rows: Sequence[TableRow]
    no_route: str
    next_refresh: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    body: bytes  # the encoded table, made once per version

    @property
    def etag(self) -> str:
        return f'"{self.version}"'


class TooManyWaiters(Exception):
    """Every watcher slot is taken; the web layer answers 503."""


def _content(src: TableSource) -> dict[str, Any]:
    bal = src.balancing
    return {
        "strategy": src.strategy,
        "panic": src.panic,
        "region_fallback": list(bal.region_fallback),
        "saturation_queue": bal.saturation_queue,
        "outlier_consecutive_failures": bal.outlier_consecutive_failures,
        "max_ejection_percent": bal.max_ejection_percent,
        "no_route": src.no_route or None,
        "masters": [
            {"name": r.config.name, "url": r.config.url, "region": r.config.region,
             "priority": r.config.priority, "weight": r.config.weight,
             "effective_weight": r.weight, "state": r.state, "role": r.role,
             "ejected": r.ejected, "queue": r.queue}
            for r in src.rows
        ],
    }


class TableFeed:
    """The versioned table of one router, and the watchers waiting for its next version.
    Not thread-safe: use it from the event loop (``changed`` and ``load_changed`` are O(1))."""

    def __init__(
        self,
        source: Callable[[], TableSource],
        clock: Callable[[], float] = time.monotonic,
        *,
        max_waiters: int = MAX_WAITERS,
        queue_refresh: float = QUEUE_REFRESH,
    ) -> None:
        self._source, self._clock = source, clock
        self.max_waiters, self.queue_refresh = max_waiters, queue_refresh
        self._version = int(time.time() * 1000)
        self._content: dict[str, Any] | None = None
        self._snapshot: Snapshot | None = None
        self._dirty = True
        self._load_pending = False
        self._load_at = -math.inf
        self._next_refresh = math.inf
        self._event = asyncio.Event()
        self.waiting = 0

    # ---- inputs (from the router) ---------------------------------------------------------

    def changed(self) -> None:
        """The pool may have changed: the next read rebuilds, and watchers check now."""
        self._dirty = True
        self._wake()

    def load_changed(self) -> None:
        """A queue figure changed: taken in at most every ``queue_refresh`` seconds."""
        self._load_pending = True
        if self.waiting and self._clock() >= self._load_at + self.queue_refresh:
            self._wake()

    def _wake(self) -> None:
        if self.waiting:
            self._event.set()
            self._event = asyncio.Event()

    # ---- reads ----------------------------------------------------------------------------

    def current(self) -> Snapshot:
        """The table as of now, rebuilt first if something may have changed."""
        now = self._clock()
        if (
            self._snapshot is None
            or self._dirty
            or now >= self._next_refresh
            or (self._load_pending and now >= self._load_at + self.queue_refresh)
        ):
            self._rebuild(now)
        assert self._snapshot is not None
        return self._snapshot

    def _rebuild(self, now: float) -> None:
        self._dirty, self._load_pending, self._load_at = False, False, now
        src = self._source()
        self._next_refresh = src.next_refresh
        content = _content(src)
        if content == self._content and self._snapshot is not None:
            return
        if self._snapshot is not None:
            self._version += 1
        self._content = content
        body = json.dumps({"format": FORMAT, "version": self._version, **content},
                          separators=(",", ":"))
        self._snapshot = Snapshot(self._version, body.encode())

    def _due_in(self) -> float:
        """Seconds until the table may change with no event (a ramp step, queue refresh)."""
        due = self._next_refresh
        if self._load_pending:
            due = min(due, self._load_at + self.queue_refresh)
        return max(0.0, due - self._clock())

    async def wait(self, version: int, timeout: float) -> Snapshot | None:
        """The table once its version differs from ``version`` (at once if it already does),
        or None when ``timeout`` seconds pass without a change. Raises TooManyWaiters when
        ``max_waiters`` already wait."""
        snap = self.current()
        if snap.version != version:
            return snap
        if timeout <= 0:
            return None
        if self.waiting >= self.max_waiters:
            raise TooManyWaiters(f"{self.waiting} watchers already wait for a change")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.waiting += 1
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                event = self._event
                try:
                    async with asyncio.timeout(min(remaining, self._due_in())):
                        await event.wait()
                except TimeoutError:
                    pass
                snap = self.current()
                if snap.version != version:
                    return snap
        finally:
            self.waiting -= 1
