"""Active health probing of every master over one shared, bounded aiohttp session.

Scheduling: one APScheduler job per *round* (every ``probe.interval``), not one job per
master. Inside a round each master's probe starts at a stable per-master phase plus random
jitter, so load is spread evenly over the interval (like Prometheus spreads scrapes) and the
scheduler does O(1) work per round instead of O(masters) job bookkeeping. See
docs/benchmarks.md for the figures behind that choice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime

import aiohttp
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from exporter.config import ProbeConfig
from exporter.fleet import Fleet, MasterRuntime, Outcome, Result

log = logging.getLogger(__name__)

_STATUSES = {"ok": False, "degraded": True}  # status -> degraded?
_NUMERIC_FIELDS = ("queue_length", "active_messages", "cpu_percent", "memory_percent")


def classify(status: int, body: bytes, latency: float, degraded_latency: float) -> Outcome:
    """Turn an HTTP answer into an Outcome; pure so each rule is tested on its own."""
    if not 200 <= status < 300:
        return Outcome(Result.HTTP_ERROR, latency, detail=f"HTTP {status}")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return Outcome(Result.INVALID_RESPONSE, latency, detail="body is not JSON")
    if not isinstance(payload, dict):
        return Outcome(Result.INVALID_RESPONSE, latency, detail="JSON body is not an object")
    state = payload.get("status")
    if state == "down":
        return Outcome(
            Result.UNHEALTHY, latency, detail="master reports status down", payload=payload
        )
    if state not in _STATUSES:
        return Outcome(Result.INVALID_RESPONSE, latency, detail=f"unknown status {state!r}")
    for field in _NUMERIC_FIELDS:
        value = payload.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            return Outcome(Result.INVALID_RESPONSE, latency, detail=f"{field} is not a number")
    degraded = _STATUSES[state] or latency > degraded_latency
    detail = "slow answer" if latency > degraded_latency else ("degraded" if degraded else "")
    return Outcome(Result.SUCCESS, latency, degraded=degraded, detail=detail, payload=payload)


def new_session(probe: ProbeConfig) -> aiohttp.ClientSession:
    """One pooled session for probes and protocol calls: keep-alive, bounded connections."""
    connector = aiohttp.TCPConnector(
        limit=probe.max_connections, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30
    )
    return aiohttp.ClientSession(
        connector=connector,
        raise_for_status=False,
        skip_auto_headers=("User-Agent",),
        headers={"User-Agent": "ha-exporter"},
    )


async def probe_once(session: aiohttp.ClientSession, url: str, probe: ProbeConfig) -> Outcome:
    """Probe one master's health endpoint and classify the answer."""
    start = time.perf_counter()
    try:
        async with asyncio.timeout(probe.timeout):
            async with session.get(url) as resp:
                body = await resp.read()
                status = resp.status
    except TimeoutError:
        return Outcome(
            Result.TIMEOUT,
            time.perf_counter() - start,
            detail=f"no answer within {probe.timeout:g}s",
        )
    except aiohttp.ClientConnectorError as exc:
        return Outcome(
            Result.CONNECT_ERROR,
            time.perf_counter() - start,
            detail=f"connect failed: {exc.os_error.strerror or exc.os_error}",
        )
    except (aiohttp.ClientError, OSError) as exc:
        return Outcome(
            Result.CONNECT_ERROR, time.perf_counter() - start, detail=f"{type(exc).__name__}: {exc}"
        )
    return classify(status, body, time.perf_counter() - start, probe.degraded_latency)


def phase(name: str) -> float:
    """Stable 0..1 position of a master inside each round (spreads probes evenly)."""
    return (zlib.crc32(name.encode()) & 0xFFFFFFFF) / 2**32


ResultHandler = Callable[[MasterRuntime, Outcome], None]


class Prober:
    """Runs probe rounds for a Fleet and hands each Outcome to ``on_result``."""

    def __init__(
        self,
        fleet: Fleet,
        probe: ProbeConfig,
        session: aiohttp.ClientSession,
        on_result: ResultHandler,
        rng: random.Random | None = None,
    ) -> None:
        self.fleet = fleet
        self.probe = probe
        self.session = session
        self.on_result = on_result
        self.rounds = 0
        self.first_round_done = asyncio.Event()
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task[None]] = set()
        self._handles: list[asyncio.TimerHandle] = []
        self._scheduler: AsyncIOScheduler | None = None

    def start(self) -> None:
        self._scheduler = AsyncIOScheduler()
        self._scheduler.start()
        self._schedule(first=True)

    def _schedule(self, first: bool = False) -> None:
        assert self._scheduler is not None
        trigger = IntervalTrigger(seconds=self.probe.interval)
        kwargs = {"next_run_time": datetime.now(UTC)} if first else {}
        self._scheduler.add_job(
            self.run_round,
            trigger,
            id="probe-round",
            replace_existing=True,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(self.probe.interval)),
            **kwargs,
        )

    def update(self, probe: ProbeConfig) -> None:
        """Apply new probe settings; the round job is rescheduled only if the interval moved."""
        interval_changed = probe.interval != self.probe.interval
        self.probe = probe
        if interval_changed and self._scheduler is not None:
            self._schedule(first=True)

    async def run_round(self) -> None:
        """Schedule one probe per master, spread over the interval, and return at once: a round
        must not outlive its interval, or APScheduler (max_instances=1) would skip the next."""
        loop = asyncio.get_running_loop()
        interval, jitter = self.probe.interval, self.probe.jitter
        spread = interval * (1.0 - jitter)
        masters = list(self.fleet)
        self.rounds += 1
        first = self.rounds == 1
        pending = len(masters)
        if first and not pending:
            self.first_round_done.set()

        def finished(_: asyncio.Task[None]) -> None:
            nonlocal pending
            pending -= 1
            if pending == 0:
                self.first_round_done.set()

        def start(rt: MasterRuntime) -> None:
            task = loop.create_task(self._probe_master(rt))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            if first:
                task.add_done_callback(finished)

        self._handles = [
            loop.call_later(
                phase(rt.name) * spread + self._rng.random() * interval * jitter, start, rt
            )
            for rt in masters
        ]

    async def _probe_master(self, rt: MasterRuntime) -> None:
        if rt.in_flight:  # previous probe still running: never two at once per master
            return
        rt.in_flight = True
        try:
            outcome = await probe_once(self.session, rt.config.url + self.probe.path, self.probe)
        finally:
            rt.in_flight = False
        if self.fleet.get(rt.name) is rt:  # not removed by a reload meanwhile
            self.on_result(rt, outcome)

    async def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.remove_all_jobs()
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        for handle in self._handles:
            handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
