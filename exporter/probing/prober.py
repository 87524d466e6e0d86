"""Active health probing of every master over one shared, bounded aiohttp session.

Scheduling: one APScheduler job per *round* (every ``probe.interval``), not one job per
master. Inside a round each master's probe starts at a stable per-master phase plus random
jitter, so load is spread evenly over the interval (like Prometheus spreads scrapes) and the
scheduler does O(1) work per round instead of O(masters) job bookkeeping. See
docs/benchmarks.md for the figures behind that choice.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime

import aiohttp
from aiohttp import hdrs
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from exporter.config import ProbeConfig
from exporter.fleet import Fleet, MasterRuntime, Outcome, Result
from exporter.logs import ThrottledLog
from exporter.probing.health import InvalidHealth, decode

log = logging.getLogger(__name__)
_throttled = ThrottledLog(log)

_READ_CHUNK = 16_384
#: Sent with every probe: a compressed answer is refused rather than inflated (a small gzip
#: body can inflate to gigabytes).
_PROBE_HEADERS = {"Accept-Encoding": "identity"}


def classify(status: int, body: bytes, latency: float, degraded_latency: float) -> Outcome:
    """Turn an HTTP answer into an Outcome; pure so each rule is tested on its own. Never
    raises: whatever a master sends is one of the six results."""
    if not 200 <= status < 300:
        return Outcome(Result.HTTP_ERROR, latency, detail=f"HTTP {status}")
    try:
        payload = decode(body)
    except InvalidHealth as exc:
        return Outcome(Result.INVALID_RESPONSE, latency, detail=str(exc))
    except Exception as exc:
        _throttled.error(f"classify:{type(exc).__name__}", "classifying a /health answer failed")
        return Outcome(
            Result.INVALID_RESPONSE, latency, detail=f"unreadable answer ({type(exc).__name__})"
        )
    if payload["status"] == "down":
        return Outcome(
            Result.UNHEALTHY, latency, detail="master reports status down", payload=payload
        )
    slow = latency > degraded_latency
    degraded = payload["status"] == "degraded" or slow
    detail = "slow answer" if slow else ("degraded" if degraded else "")
    return Outcome(Result.SUCCESS, latency, degraded=degraded, detail=detail, payload=payload)


def new_session(probe: ProbeConfig) -> aiohttp.ClientSession:
    """One pooled session for probes and protocol calls: keep-alive, bounded connections.
    Its defaults (redirects followed, bodies decompressed) serve the protocol calls; probes
    override both per request in ``probe_once``."""
    connector = aiohttp.TCPConnector(
        limit=probe.max_connections, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30
    )
    return aiohttp.ClientSession(
        connector=connector,
        raise_for_status=False,
        skip_auto_headers=("User-Agent",),
        headers={"User-Agent": "ha-exporter"},
    )


class _BodyRefused(Exception):
    """The answer's body is not read: too large, or compressed."""


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The body, read in chunks and never more than ``cap`` bytes of it held."""
    encoding = resp.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
    if encoding not in ("", "identity"):
        raise _BodyRefused(f"compressed body refused (Content-Encoding {encoding[:40]})")
    too_large = f"body too large (limit {cap} bytes)"
    if resp.content_length is not None and resp.content_length > cap:
        raise _BodyRefused(too_large)
    body = bytearray()
    while True:
        chunk = await resp.content.read(min(_READ_CHUNK, cap + 1 - len(body)))
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > cap:
            raise _BodyRefused(too_large)


async def _fetch(session: aiohttp.ClientSession, url: str, cap: int) -> tuple[int, bytes]:
    """Status and body of one GET; the body of a non-2xx answer is not read (not needed)."""
    async with session.get(
        url, allow_redirects=False, auto_decompress=False, headers=_PROBE_HEADERS
    ) as resp:
        if not 200 <= resp.status < 300:
            return resp.status, b""
        try:
            return resp.status, await _read_capped(resp, cap)
        except _BodyRefused:
            resp.close()  # drop the connection: the rest of the body is unread
            raise


async def probe_once(session: aiohttp.ClientSession, url: str, probe: ProbeConfig) -> Outcome:
    """Probe one master's health endpoint and classify the answer. Redirects are not followed
    (a 3xx is ``http_error``), bodies are read up to ``probe.max_body_bytes`` and never
    decompressed. Never raises but for cancellation: whatever happens is one of the results."""
    start = time.perf_counter()
    try:
        async with asyncio.timeout(probe.timeout):
            status, body = await _fetch(session, url, probe.max_body_bytes)
        return classify(status, body, time.perf_counter() - start, probe.degraded_latency)
    except _BodyRefused as exc:
        return Outcome(Result.INVALID_RESPONSE, time.perf_counter() - start, detail=str(exc))
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
    except Exception as exc:
        _throttled.error(f"probe:{type(exc).__name__}", "probe of %s failed unexpectedly", url)
        return Outcome(
            Result.CONNECT_ERROR,
            time.perf_counter() - start,
            detail=f"probe failed: {type(exc).__name__}: {exc}"[:200],
        )


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
            task = loop.create_task(self._probe_master(rt), name=f"probe {rt.name}")
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
            if first:
                task.add_done_callback(finished)

        self._handles = [
            loop.call_later(
                phase(rt.name) * spread + self._rng.random() * interval * jitter, start, rt
            )
            for rt in masters
        ]

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A probe task that died is logged, never lost silently."""
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s died", task.get_name(), exc_info=exc)

    async def _probe_master(self, rt: MasterRuntime) -> None:
        """Probe one master and hand over the outcome; a failure here stays with this master:
        it is logged and every other master's probes and transitions go on."""
        if rt.in_flight:  # previous probe still running: never two at once per master
            return
        rt.in_flight = True
        try:
            outcome = await probe_once(self.session, rt.config.url + self.probe.path, self.probe)
        finally:
            rt.in_flight = False
        if self.fleet.get(rt.name) is not rt:  # removed by a reload meanwhile
            return
        try:
            self.on_result(rt, outcome)
        except Exception as exc:
            _throttled.error(
                f"on_result:{type(exc).__name__}",
                "handling the probe result of %s (%s) failed",
                rt.name,
                outcome.result,
            )

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
