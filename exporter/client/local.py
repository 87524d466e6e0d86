"""Local routing: the client's copy of the exporter's routing table, kept current by a watch,
and the decisions it makes from it with the router's own strategies (exporter.routing).

The watch is one long poll at a time (``GET /api/v1/routing-table?wait=..&version=N``): the
exporter answers at once when the table changes, else 304 when the wait ends, so a producer
learns a change within a round trip and costs the exporter one idle request per wait. A request
that fails (refused, reset, timed out, 5xx) moves on to the next exporter URL; when none answers,
the client keeps routing on the table it has, retries with a growing pause (up to
``MAX_BACKOFF``), and says how stale the table is: ``age()`` and a warning at most once a
minute past ``stale_after`` seconds. An exporter without the table (404), or with one that does
not validate, is asked per message instead (the caller sees ``table`` None).

On top of the table the client ejects masters its own deliveries fail on, the way the router's
passive outlier detection does (``outlier_consecutive_failures`` in a row, at most
``max_ejection_percent`` of the active masters, the table's own ejections included), for
``eject_for`` seconds (0: never): while no exporter answers, nobody else takes a dead master
out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any, Literal

import aiohttp
from pydantic import ValidationError

from exporter.client.errors import RequestRejected, RouteUnavailable
from exporter.client.wire import MAX_INFO_BODY, Exporters, read_capped
from exporter.routing import NoRoute, RoutingTable, TableRouter
from exporter.routing.table import MAX_TABLE_BYTES

log = logging.getLogger(__name__)

PATH = "/api/v1/routing-table"
MIN_BACKOFF, MAX_BACKOFF = 0.25, 5.0  # pause after a round where no exporter answered
BUSY_RETRY = 5.0  # the exporter has no watcher slot for us: check back this much later
UNSUPPORTED_RETRY = 60.0  # the exporter serves no usable table: ask per message meanwhile
MIN_POLL = 0.02  # at most 50 table requests a second, whatever an exporter answers
WARN_EVERY = 60.0

Round = Literal["ok", "busy", "unsupported", "down"]


class LocalRouting:
    """The held table, its decisions, the watch that keeps it current, and local ejections."""

    def __init__(
        self,
        exporters: Exporters,
        http: Callable[[], aiohttp.ClientSession],
        *,
        timeout: float,
        wait: float,
        stale_after: float,
        eject_for: float,
        max_bytes: int = MAX_TABLE_BYTES,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._exporters, self._http, self._clock = exporters, http, clock
        self._timeout, self._wait, self._max_bytes = timeout, wait, max_bytes
        self.stale_after, self.eject_for = stale_after, eject_for
        self._rng = rng if rng is not None else random.Random()
        self.table: RoutingTable | None = None
        self._router: TableRouter | None = None
        self._source: str | None = None  # the exporter URL the table came from
        self._confirmed = -math.inf  # when an exporter last vouched for the table
        self._holding_until: float | None = None  # a watch is pending until then
        self._down_since: float | None = None
        self._warned = self._invalid_warned = -math.inf
        self._failures: dict[str, int] = {}
        self._ejected: dict[str, float] = {}  # master -> re-admitted at
        self._first = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.updates = 0  # tables installed

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="client-routing-table")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def ready(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for the first attempt to get a table to end."""
        if not self._first.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._first.wait()

    # ---- decisions --------------------------------------------------------------------------

    def age(self) -> float | None:
        """Seconds since an exporter last vouched for the table; None without a table. 0 while
        the exporter that answered last holds our watch (it answers at once on a change): an
        exporter that stops answering mid-watch is noticed when the watch times out."""
        if self.table is None:
            return None
        now = self._clock()
        if self._holding_until is not None and now < self._holding_until:
            return 0.0
        return max(0.0, now - self._confirmed)

    def decide(self, key: str | None, region: str | None) -> dict[str, Any]:
        """One decision from the table: ``{"master", "url", "strategy"}``."""
        if self._ejected and min(self._ejected.values()) <= self._clock():
            self._readmit()
        router = self._router
        if router is None:
            raise RouteUnavailable("no routing table")
        try:
            d = router.route(key, region)
        except NoRoute as exc:
            raise RouteUnavailable(exc.reason) from None
        except ValueError as exc:  # a region nobody serves, as the exporter would say
            raise RequestRejected(400, str(exc)) from None
        return {"master": d.master, "url": d.url, "strategy": d.strategy}

    def outcome(self, master: str, ok: bool) -> None:
        """How a delivery routed from the table went: in-flight counts, local ejection."""
        if self._router is not None:
            self._router.done(master)
        if ok:
            self._failures.pop(master, None)
            return
        count = self._failures[master] = self._failures.get(master, 0) + 1
        table = self.table
        if (table is None or self.eject_for <= 0 or master in self._ejected
                or count < table.outlier_consecutive_failures):
            return
        active = sum(m.role == "active" for m in table.masters)
        limit = math.floor(table.max_ejection_percent * active + 1e-9)
        if len(self._ejected) + sum(m.ejected for m in table.masters) >= limit:
            return
        self._ejected[master] = self._clock() + self.eject_for
        self._failures.pop(master, None)
        log.warning("%d deliveries in a row to %s failed: not routing to it for %g s",
                    count, master, self.eject_for)
        self._rebuild()

    def ejected(self) -> list[str]:
        return sorted(self._ejected)

    def _readmit(self) -> None:
        now = self._clock()
        back = [m for m, until in self._ejected.items() if until <= now]
        for m in back:
            del self._ejected[m]
        log.info("routing to %s again after a local ejection", ", ".join(back))
        self._rebuild()

    def _rebuild(self) -> None:
        if self.table is None:
            return
        router = TableRouter(self.table, rng=self._rng, excluded=self._ejected,
                             previous=self._router)
        if router.size == 0 and self._ejected:  # never eject the last masters in rotation
            router = TableRouter(self.table, rng=self._rng, previous=router)
        self._router = router

    def _install(self, table: RoutingTable, source: str) -> None:
        first = self.table is None
        self.table, self._source = table, source
        self._rebuild()
        self.updates += 1
        in_rotation = sum(m.effective_weight > 0 for m in table.masters)
        (log.info if first else log.debug)(
            "routing locally on table version %d from %s: %s, %d of %d masters in rotation",
            table.version, source, table.strategy, in_rotation, len(table.masters))

    def _drop(self, source: str) -> None:
        if self._source == source:
            self.table = self._router = self._source = None

    # ---- the watch --------------------------------------------------------------------------

    async def run(self) -> None:
        delay = 0.0
        while True:
            started = self._clock()
            try:
                outcome = await self._round()
            except Exception:  # a bug must not end the watch for good
                log.exception("routing table watch crashed")
                outcome = "down"
            self._first.set()
            if outcome == "ok":
                delay = max(0.0, started + MIN_POLL - self._clock())
            elif outcome == "down":
                self._exporters.up = False
                delay = min(MAX_BACKOFF, max(MIN_BACKOFF, delay * 2))
                self._warn_stale()
            else:
                delay = BUSY_RETRY if outcome == "busy" else UNSUPPORTED_RETRY
            await asyncio.sleep(delay)

    async def _round(self) -> Round:
        """One request per exporter URL at most, the last that answered first."""
        seen: set[Round] = set()
        for i in self._exporters.order():
            outcome = await self._fetch(i)
            if outcome == "ok":
                return outcome
            seen.add(outcome)
        return "busy" if "busy" in seen else "unsupported" if "unsupported" in seen else "down"

    async def _fetch(self, index: int) -> Round:
        base = self._exporters.urls[index]
        table = self.table
        watch = table is not None and self._source == base
        params: dict[str, str] = {}
        if table is not None and watch:
            params = {"version": str(table.version), "wait": f"{round(self._wait * 1000)}ms"}
        timeout = self._timeout + (self._wait if watch else 0.0)
        if watch and self._down_since is None:  # held by an exporter that just answered
            self._holding_until = self._clock() + timeout
        try:
            async with self._http().get(f"{base}{PATH}", params=params,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                status = resp.status
                limit = self._max_bytes if status == 200 else MAX_INFO_BODY
                body = await read_capped(resp, limit)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("routing table from %s: %r", base, exc)
            return "down"
        except ValueError as exc:
            return self._invalid(index, str(exc))
        finally:
            self._holding_until = None
        if status >= 500 and not (status == 503 and watch):
            log.debug("routing table from %s: HTTP %d", base, status)
            return "down"
        self._answered(index)
        if status == 200:
            try:
                fresh = RoutingTable.model_validate_json(body)
            except ValidationError as exc:
                return self._invalid(index, str(exc).replace("\n", " ")[:500])
            if table is None or fresh.version != table.version or base != self._source:
                self._install(fresh, base)
            return "ok"
        if status == 304 or (status == 503 and watch):  # 503: current, but no watcher slot
            return "ok" if status == 304 else "busy"
        if status == 404:
            log.warning("%s serves no routing table: asking it for every message", base)
            self._drop(base)
            return "unsupported"
        return self._invalid(index, f"HTTP {status}")

    def _answered(self, index: int) -> None:
        now = self._clock()
        self._exporters.answered(index)
        self._confirmed = now
        if self._down_since is not None:
            log.info("%s answers again after %.1f s; routing table version %s",
                     self._exporters.urls[index], now - self._down_since,
                     self.table.version if self.table else None)
            self._down_since = None

    def _invalid(self, index: int, why: str) -> Round:
        base = self._exporters.urls[index]
        now = self._clock()
        if now - self._invalid_warned >= WARN_EVERY:
            self._invalid_warned = now
            log.warning("unusable routing table from %s (%s): asking it for every message",
                        base, why)
        self._exporters.answered(index)
        self._drop(base)
        return "unsupported"

    def _warn_stale(self) -> None:
        now = self._clock()
        if self._down_since is None:
            self._down_since = now
        age = self.age()
        if age is not None and age > self.stale_after and now - self._warned >= WARN_EVERY:
            self._warned = now
            assert self.table is not None
            log.warning("routing on a table %.0f s old (version %d): no exporter answers at %s",
                        age, self.table.version, ", ".join(self._exporters.urls))
