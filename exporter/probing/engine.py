"""The probe engine: one exchange per master at a time on its own keep-alive connection, with
every deadline in one scan.

A probe is ``Engine.begin(slot)``: the request bytes go out on the master's idle connection, or
a connection is opened first (the only place a task is made: one per connect, not per probe).
The answer comes back through ``wire.Conn`` to the slot, which classifies it and hands the
Outcome to ``deliver``. Deadlines are one FIFO: a probe's deadline is its start plus
``probe.timeout``, appended in start order, so ``expire`` pops from the front and the cost of a
timeout is O(1), with no timer per probe. ``expire(limit)`` is given the time of the previous
scan, not the current one: between two scans the loop has polled its sockets at least once,
so an answer that was in a socket buffer before the deadline has been read by then, even when
a long callback (a large scrape) held the loop past the deadline, on either event loop
(asyncio runs I/O before timers within an iteration, uvloop timers first).

What a probe may find is exactly what ``prober.probe_once`` finds over aiohttp: the same six
results, the same details for every answer a master can send (tests/probing/test_engine.py
asks both paths the same questions), latency from the start of the probe to its answer, the
body capped at ``probe.max_body_bytes``, compressed bodies refused, redirects not followed.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import deque
from collections.abc import Callable

from exporter.config import ProbeConfig
from exporter.fleet import MasterRuntime, Outcome, Result
from exporter.logs import ThrottledLog
from exporter.probing.wire import DISCONNECTED, Conn, Endpoint, Pool

log = logging.getLogger(__name__)
_throttled = ThrottledLog(log)

Classify = Callable[[int, bytes, float, float], Outcome]
Deliver = Callable[["Slot", Outcome], None]
#: Open files wanted beyond the probe connections when raising the limit.
FD_HEADROOM = 1536

_perf = time.perf_counter


def _reserve(soft: int) -> int:
    """Descriptors left to the rest of the process: the HTTP server's clients (at most half
    the limit, 512 by default: exporter.web.connections), the protocol calls' session (256 at
    most: prober.new_session) and a little for the store, logs, listening sockets and
    resolver threads."""
    return min(soft // 2, 512) + min(soft // 8, 256) + min(soft // 8, 256)


def connection_cap(wanted: int) -> int:
    """``wanted`` connections, or fewer if the open-files limit cannot hold them beside the
    rest of the process. The soft limit is raised towards the hard one first, as Go programs
    (blackbox_exporter among them) do."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover - no such limit on this platform
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    need = wanted + FD_HEADROOM
    if soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(hard, need)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return max(1, min(wanted, soft - _reserve(soft)))


class Slot:
    """One master in the engine: its endpoint and connection, and the probe in flight.
    It is the ``Owner`` its connections report to and the ``Waiter`` of the pool."""

    __slots__ = (
        "busy",
        "conn",
        "connecting",
        "due",
        "endpoint",
        "engine",
        "first",
        "phase",
        "removed",
        "retried",
        "rt",
        "seq",
        "start",
        "waiting",
    )

    def __init__(self, engine: Engine, endpoint: Endpoint, rt: MasterRuntime | None) -> None:
        self.engine = engine
        self.endpoint = endpoint
        self.rt = rt
        self.conn: Conn | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.busy = False  # a probe is in flight
        self.waiting = False  # for a place in the pool
        self.retried = False
        self.removed = False
        self.first = False  # its probe of the first round has not ended yet
        self.phase = 0.0
        self.due = 0.0  # when its probe of the current round is due (time.monotonic)
        self.seq = 0  # probes begun: tells a stale deadline or connect from the current one
        self.start = 0.0

    # --- Owner (wire.Conn reports here) ------------------------------------------------------
    def answered(self, status: int, body: bytes | None) -> None:
        if not self.busy:
            return
        engine = self.engine
        latency = _perf() - self.start
        try:
            outcome = engine.classify(
                status, b"" if body is None else body, latency, engine.probe.degraded_latency
            )
        except Exception as exc:  # classify never raises; this is the last line anyway
            outcome = engine.unexpected(self, exc)
        engine.finish(self, outcome)

    def refused(self, detail: str) -> None:
        if self.busy:
            self.engine.finish(
                self, Outcome(Result.INVALID_RESPONSE, _perf() - self.start, detail=detail)
            )

    def failed(self, detail: str, retry: bool) -> None:
        if not self.busy:
            return
        if retry and not self.retried:  # a stale keep-alive connection: ask once more
            self.retried = True
            self.engine.connect(self)
            return
        self.engine.finish(
            self, Outcome(Result.CONNECT_ERROR, _perf() - self.start, detail=detail)
        )

    def lost(self, conn: Conn) -> None:
        if self.conn is conn:
            self.conn = None

    def broke(self, exc: Exception) -> None:
        """A bug met while reading the answer (called from the ``except`` block)."""
        outcome = self.engine.unexpected(self, exc)
        if self.busy:
            self.engine.finish(self, outcome)

    # --- Waiter (the pool calls back when a place frees up) ---------------------------------
    def granted(self) -> None:
        self.waiting = False
        self.engine.dial(self)

    def close(self) -> None:
        """Drop the connection and whatever is under way (no result is delivered)."""
        self.busy = self.waiting = False
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()


class Engine:
    """Exchanges and deadlines for any number of slots; scheduling is the caller's."""

    def __init__(self, probe: ProbeConfig, classify: Classify, deliver: Deliver) -> None:
        self.probe = probe
        self.classify = classify
        self.deliver = deliver
        self.pool = Pool(connection_cap(probe.max_connections))
        self.deadlines: deque[tuple[float, Slot, int]] = deque()
        self.in_flight = 0
        self._dials: set[asyncio.Task[None]] = set()
        self._closed = False
        self.headers: tuple[str, ...] = ()  # extra request lines, for endpoints built later

    def update(self, probe: ProbeConfig) -> None:
        if probe.max_connections != self.probe.max_connections:
            self.pool.cap = connection_cap(probe.max_connections)
            self.pool.shrink()
        self.probe = probe

    def slot(self, url: str, rt: MasterRuntime | None = None) -> Slot:
        return Slot(self, Endpoint(url, self.headers), rt)

    # --- a probe -----------------------------------------------------------------------------
    def begin(self, slot: Slot, now: float) -> None:
        """Start a probe of ``slot`` (not busy); ``now`` is time.monotonic()."""
        slot.busy = True
        slot.retried = False
        slot.seq += 1
        slot.start = _perf()
        self.in_flight += 1
        self.deadlines.append((now + self.probe.timeout, slot, slot.seq))
        conn = slot.conn
        if (conn is not None and not conn.busy and conn.transport is not None
                and not conn.transport.is_closing()):
            conn.send(slot.endpoint.request, self.probe.max_body_bytes)
        else:
            self.connect(slot)

    def connect(self, slot: Slot) -> None:
        """Open a connection for the probe in flight, when the pool has a place."""
        conn, slot.conn = slot.conn, None
        if conn is not None:
            conn.abort()
        if self.pool.reserve(slot):
            self.dial(slot)
        else:
            slot.waiting = True

    def dial(self, slot: Slot) -> None:
        """Open a connection on a reserved place of the pool."""
        if self._closed or not slot.busy:
            self.pool.unreserve()
            return
        task = asyncio.get_running_loop().create_task(self._dial(slot, slot.seq))
        slot.connecting = task
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)

    async def _dial(self, slot: Slot, seq: int) -> None:
        ep = slot.endpoint
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: Conn(self.pool, slot), ep.host, ep.port, ssl=ep.ssl,
                server_hostname=ep.server_hostname,
            )
        except asyncio.CancelledError:
            self.pool.unreserve()
            raise
        except OSError as exc:
            self.pool.unreserve()
            self._dialed(slot, seq)
            if slot.busy and slot.seq == seq:
                self.finish(slot, Outcome(
                    Result.CONNECT_ERROR, _perf() - slot.start,
                    detail=f"connect failed: {exc.strerror or exc}",
                ))
            return
        except Exception as exc:
            self.pool.unreserve()
            self._dialed(slot, seq)
            if slot.busy and slot.seq == seq:
                self.finish(slot, self.unexpected(slot, exc))
            return
        self._dialed(slot, seq)
        if self._closed or slot.removed or conn.transport is None:
            conn.abort()
            if slot.busy and slot.seq == seq:  # closed before we could ask
                self.finish(slot, Outcome(
                    Result.CONNECT_ERROR, _perf() - slot.start, detail=DISCONNECTED
                ))
            return
        slot.conn = conn
        if slot.busy and slot.seq == seq:
            conn.send(ep.request, self.probe.max_body_bytes)
        else:
            self.pool.idle(conn)

    @staticmethod
    def _dialed(slot: Slot, seq: int) -> None:
        if slot.seq == seq:
            slot.connecting = None

    def expire(self, limit: float) -> None:
        """Time out every probe whose deadline is at or before ``limit`` (the previous scan's
        time: see the module's docstring) and still has no answer."""
        deadlines = self.deadlines
        while deadlines and deadlines[0][0] <= limit:
            _, slot, seq = deadlines.popleft()
            if slot.busy and slot.seq == seq:
                self._time_out(slot)

    def _time_out(self, slot: Slot) -> None:
        slot.waiting = False
        if slot.connecting is not None:
            slot.connecting.cancel()
            slot.connecting = None
        conn = slot.conn
        if conn is not None and conn.busy:
            slot.conn = None
            conn.abort()
        self.finish(slot, Outcome(
            Result.TIMEOUT, _perf() - slot.start,
            detail=f"no answer within {self.probe.timeout:g}s",
        ))

    def finish(self, slot: Slot, outcome: Outcome) -> None:
        slot.busy = False
        self.in_flight -= 1
        self.deliver(slot, outcome)

    def unexpected(self, slot: Slot, exc: Exception) -> Outcome:
        """A bug met while probing: logged (throttled), and a failed probe of this master."""
        _throttled.error(
            f"probe:{type(exc).__name__}", "probe of %s failed unexpectedly", slot.endpoint.url
        )
        return Outcome(
            Result.CONNECT_ERROR, _perf() - slot.start,
            detail=f"probe failed: {type(exc).__name__}: {exc}"[:200],
        )

    def stop_dialling(self) -> None:
        """From now on no connection is opened (before the slots close theirs, which would
        hand their places to waiting slots)."""
        self._closed = True

    async def close(self) -> None:
        """Stop dialling and cancel the dials under way; the slots close their own
        connections (``Slot.close``)."""
        self._closed = True
        dials = list(self._dials)
        for task in dials:
            task.cancel()
        if dials:
            await asyncio.gather(*dials, return_exceptions=True)
