"""Active health probing of every master: the schedule, and what a probe's answer means.

The hot loop (``Prober``) keeps one long-lived keep-alive connection per master and drives it
from protocol callbacks (``exporter.probing.engine``/``wire``): pre-built request bytes, llhttp
for the answer, no per-probe task, session, request or timer. One timer, the *tick*, does all
the scheduling: each round (every ``probe.interval``) every master's probe is due at a stable
per-master phase plus random jitter, so load is spread evenly over the interval (as Prometheus
spreads scrapes); a tick starts whatever is due, in batches, and times out whatever is past its
deadline (one FIFO scan). The tick also measures how late each probe started against its slot
(``lag_*``) and counts slots dropped because the engine fell behind (``rounds_skipped``).

``classify`` turns an answer into one of the six results; ``probe_once`` is the same probe over
an aiohttp session (one-off probes and tests), ``probe_url`` one through the engine. See
docs/benchmarks.md for the figures behind these choices.
"""

from __future__ import annotations

import asyncio
import logging
import random
import resource
import time
import zlib
from bisect import bisect_left
from collections.abc import Callable
from operator import attrgetter
from urllib.parse import quote

import aiohttp
from aiohttp import hdrs

from exporter.config import ProbeConfig
from exporter.fleet import Fleet, MasterRuntime, Outcome, Result
from exporter.logs import ThrottledLog
from exporter.probing.engine import Engine, Slot
from exporter.probing.health import InvalidHealth, decode

log = logging.getLogger(__name__)
_throttled = ThrottledLog(log)

_READ_CHUNK = 16_384
#: Connections of the protocol calls' session at most (probe.max_connections if lower): those
#: calls go to a few masters at a time (checkpoints, failovers), not to all at once.
PROTOCOL_CONNECTIONS = 256
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
    """The pooled session of the protocol calls (and of one-off probes, ``probe_once``):
    keep-alive, at most PROTOCOL_CONNECTIONS connections (the Prober's engine keeps its own,
    one per master). Its defaults (redirects followed, bodies decompressed) serve the protocol
    calls; ``probe_once`` overrides both per request."""
    connector = aiohttp.TCPConnector(
        limit=min(probe.max_connections, PROTOCOL_CONNECTIONS), limit_per_host=0,
        ttl_dns_cache=300, keepalive_timeout=30,
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

#: Upper bounds (seconds) of the schedule-lag histogram: how late a probe started against its
#: slot. The tick batches starts, so up to one TICK of lag is by design.
LAG_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
#: The scheduler's granularity (seconds): a tick starts every probe due by then, and wakes
#: again no sooner than this (or at the next due probe or deadline when that is later).
#: Batching starts is cheaper per probe the larger the tick (fewer loop wake-ups, answers read
#: in bursts): 1 ms 67, 5 ms 61, 10 ms 57, 20 ms 52 CPU-µs per probe in bench/bench_probe.py.
#: 10 ms keeps lag and timeout overshoot small against a 1 s interval and a 750 ms timeout.
TICK = 0.010

#: Connections opened a second, at most, in the first round (each probe of it opens one, and a
#: connect costs several times a probe on an open connection): 10,000 masters take 5 s to
#: connect, whatever the interval, instead of overloading the loop into false timeouts.
RAMP_UP = 2_000

_due = attrgetter("due")
_monotonic = time.monotonic


def _nofile() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _classify(status: int, body: bytes, latency: float, degraded_latency: float) -> Outcome:
    # looked up at each call, so the engine and probe_once share one classify
    return classify(status, body, latency, degraded_latency)


async def probe_url(url: str, probe: ProbeConfig) -> Outcome:
    """One probe of ``url`` through the engine the Prober uses (a connection of its own,
    closed afterwards). Never raises but for cancellation."""
    done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

    def deliver(_: Slot, outcome: Outcome) -> None:
        if not done.done():
            done.set_result(outcome)

    engine = Engine(probe, _classify, deliver)
    try:
        slot = engine.slot(url)
    except ValueError as exc:
        return Outcome(Result.CONNECT_ERROR, 0.0, detail=f"probe failed: ValueError: {exc}")
    try:
        previous = _monotonic()
        engine.begin(slot, previous)
        while not done.done():
            await asyncio.wait([done], timeout=TICK)
            engine.expire(previous)
            previous = _monotonic()
        return done.result()
    finally:
        slot.close()
        await engine.close()


class Prober:
    """Runs probe rounds for a Fleet and hands each Outcome to ``on_result``.

    Read-only figures for /metrics:

    * ``lag_buckets``: upper bounds (s) of the schedule-lag histogram (LAG_BUCKETS);
    * ``lag_counts``: probes per bucket, *not* cumulative; one more slot than ``lag_buckets``
      for lags above the last bound (+Inf);
    * ``lag_sum``: total lag in seconds; ``sum(lag_counts)`` is the number of probes started;
    * ``rounds_skipped``: probe slots dropped because the engine fell behind: the master's
      previous probe was still in flight when the slot came, or the slot could only start a
      whole interval late (the next one is due; each master's slot of a missed round counts).

    ``session`` is kept for the service's protocol calls; probes do not use it.
    """

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
        self.lag_buckets: tuple[float, ...] = LAG_BUCKETS
        self.lag_counts: list[int] = [0] * (len(LAG_BUCKETS) + 1)
        self.lag_sum = 0.0
        self.rounds_skipped = 0
        self._rng = rng or random.Random()
        self._engine = Engine(probe, _classify, self._deliver)
        self._slots: dict[str, Slot] = {}
        self._schedule: list[Slot] = []  # this round's, by due time (Slot.due)
        self._next = 0  # index of the first probe of the round not started yet
        self._round_at = 0.0  # when the next round starts (time.monotonic)
        self._first_pending = 0
        self._previous_tick = 0.0
        self._handle: asyncio.Handle | None = None
        self._running = False
        self.only: frozenset[str] | None = None  # a cluster member probes its shard only

    # --- the surface the service uses ------------------------------------------------------
    def start(self) -> None:
        self._running = True
        self._round_at = self._previous_tick = _monotonic()
        self._handle = asyncio.get_running_loop().call_soon(self._tick)

    def update(self, probe: ProbeConfig) -> None:
        """Apply new probe settings. A new interval starts a new round at once (the old
        round's remaining slots are dropped, not counted as skipped); a new path reaches
        each master at the next round; timeout, thresholds and caps apply to the next probe."""
        interval_changed = probe.interval != self.probe.interval
        self.probe = probe
        self._engine.update(probe)
        if interval_changed and self._running:
            for slot in self._schedule[self._next:]:  # dropped, not skipped
                if slot.first:
                    self._first_ended(slot)
            self._schedule, self._next = [], 0
            self._round_at = _monotonic()
            self._rearm()

    def retarget(self, names: frozenset[str] | None) -> None:
        """Probe only ``names`` (None: the whole fleet) from the next round on."""
        self.only = names

    def name_observer(self, observer: str) -> None:
        """Send ``X-HA-Observer`` (URL-quoted) with every probe from now on, so a master or
        proxy can tell the replicas of a cluster apart; set before the first round."""
        self._engine.headers = (f"X-HA-Observer: {quote(observer, safe='')}",)

    @property
    def probed(self) -> int:
        """Masters with a probe slot now."""
        return len(self._slots)

    async def stop(self) -> None:
        self._running = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._engine.stop_dialling()
        for slot in self._slots.values():
            slot.close()
        await self._engine.close()

    # --- the tick ----------------------------------------------------------------------------
    def _tick(self) -> None:
        self._handle = None
        if not self._running:
            return
        now = _monotonic()
        try:
            self._start_due(now)
            self._engine.expire(self._previous_tick)
        except Exception:  # a bug: logged, and the schedule goes on
            _throttled.error("tick", "the probe schedule failed")
        finally:
            self._previous_tick = now
            self._arm(now)

    def _arm(self, now: float) -> None:
        wake = self._round_at
        if self._next < len(self._schedule):
            wake = min(wake, self._schedule[self._next].due)
        deadlines = self._engine.deadlines
        if deadlines:
            wake = min(wake, deadlines[0][0])
        t = _monotonic()
        self._handle = asyncio.get_running_loop().call_later(
            max(wake, now + TICK) - t, self._tick
        )

    def _rearm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = asyncio.get_running_loop().call_soon(self._tick)

    def _start_due(self, now: float) -> None:
        begin = self._engine.begin
        buckets, counts = self.lag_buckets, self.lag_counts
        stale = now - self.probe.interval  # a slot this late is superseded by the next one
        while True:
            schedule, i, n = self._schedule, self._next, len(self._schedule)
            lag_sum, skipped = 0.0, 0
            while i < n:
                slot = schedule[i]
                due = slot.due
                if due > now:
                    break
                i += 1
                if slot.removed:
                    continue
                if slot.busy or due <= stale:  # still in flight, or a whole interval late
                    skipped += 1
                    if slot.first:
                        self._first_ended(slot)
                    continue
                started = _monotonic()
                lag = started - due
                lag_sum += lag
                counts[bisect_left(buckets, lag)] += 1
                try:
                    begin(slot, started)
                except Exception as exc:  # a bug: this master's probe fails, not the tick
                    self._begin_failed(slot, exc)
            self._next = i
            self.lag_sum += lag_sum
            self.rounds_skipped += skipped
            if now < self._round_at:
                return
            # a new round; whatever of the old one never started is dropped
            for slot in schedule[i:]:
                if not slot.removed:
                    self.rounds_skipped += 1
                    if slot.first:
                        self._first_ended(slot)
            interval = self.probe.interval
            missed = int((now - self._round_at) // interval)
            if missed:  # the loop was held for whole rounds: those slots are gone
                self.rounds_skipped += missed * len(self._slots)
                self._round_at += missed * interval
            self._new_round(self._round_at)

    def _new_round(self, start: float) -> None:
        self.rounds += 1
        interval, jitter = self.probe.interval, self.probe.jitter
        slots = self._sync()
        if self.rounds == 1:  # every probe opens a connection: at most RAMP_UP a second
            interval = max(interval, len(slots) / RAMP_UP)
        spread, jitter_span = interval * (1.0 - jitter), interval * jitter
        rnd = self._rng.random
        for slot in slots:  # floats on the slots, no tuple per master: nothing for the GC
            slot.due = start + slot.phase * spread + rnd() * jitter_span
        slots.sort(key=_due)
        self._schedule, self._next = slots, 0
        self._round_at = start + interval
        if self.rounds == 1:
            for slot in slots:
                slot.first = True
            self._first_pending = len(slots)
            if not slots:
                self.first_round_done.set()

    def _sync(self) -> list[Slot]:
        """The slots of the fleet as it is now: new masters get one, a changed URL a new
        endpoint (and connection), removed masters lose theirs."""
        path = self.probe.path
        old, new = self._slots, {}
        engine = self._engine
        only = self.only
        for rt in self.fleet:
            name = rt.name
            if only is not None and name not in only:
                continue
            url = rt.config.url + path
            slot = old.get(name)
            if slot is not None and (slot.rt is not rt or slot.endpoint.url != url):
                self._remove(slot)
                slot = None
            if slot is None:
                try:
                    slot = engine.slot(url, rt)
                except ValueError as exc:  # config validation makes this unreachable
                    _throttled.error(f"url:{name}", "cannot probe %s: %s", name, exc)
                    continue
                slot.phase = phase(name)
            new[name] = slot
        for name, slot in old.items():
            if new.get(name) is not slot:
                self._remove(slot)
        self._slots = new
        cap = engine.pool.cap
        if len(new) > cap and len(old) <= cap:
            log.warning(
                "%d masters and at most %d probe connections (probe.max_connections %d, "
                "open-files limit %d): masters take turns, reconnecting for each probe; raise "
                "both to keep one connection per master",
                len(new), cap, self.probe.max_connections, _nofile(),
            )
        return list(new.values())

    def _remove(self, slot: Slot) -> None:
        if slot.busy:
            self._engine.in_flight -= 1
        slot.removed = True
        slot.close()
        if slot.first:
            self._first_ended(slot)

    def _begin_failed(self, slot: Slot, exc: Exception) -> None:
        engine = self._engine
        outcome = engine.unexpected(slot, exc)
        if slot.busy:
            engine.finish(slot, outcome)
        else:
            self._deliver(slot, outcome)

    def _first_ended(self, slot: Slot) -> None:
        slot.first = False
        self._first_pending -= 1
        if self._first_pending <= 0:
            self.first_round_done.set()

    # --- results ---------------------------------------------------------------------------
    def _deliver(self, slot: Slot, outcome: Outcome) -> None:
        """Hand over one outcome; a failure here stays with this master: it is logged and
        every other master's probes and transitions go on."""
        if slot.first:
            self._first_ended(slot)
        rt = slot.rt
        if rt is None or slot.removed or self.fleet.get(rt.name) is not rt:
            return  # removed by a reload meanwhile
        try:
            self.on_result(rt, outcome)
        except Exception as exc:
            _throttled.error(
                f"on_result:{type(exc).__name__}",
                "handling the probe result of %s (%s) failed",
                rt.name,
                outcome.result,
            )

    # --- for tests and diagnostics ---------------------------------------------------------
    @property
    def connections(self) -> int:
        """Probe connections open or being opened."""
        return self._engine.pool.open

    @property
    def in_flight(self) -> int:
        return self._engine.in_flight
