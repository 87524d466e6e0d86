"""The probe engine (keep-alive connections driven by protocol callbacks) finds exactly what the
aiohttp probe finds, for every answer the other probing tests send, on asyncio's loop and on
uvloop; and it keeps its own promises: one connection per master, reused; reconnect after a
close; a stale keep-alive connection retried once; a bounded pool; a hung master that holds
nothing but its own probe; deadlines from one scan; lag and skipped slots counted."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import cast

import pytest
from aiohttp import web

from exporter.config import MasterConfig, ProbeConfig
from exporter.fleet import Fleet, Outcome, Result
from exporter.logs import ThrottledLog
from exporter.probing import engine as engine_module
from exporter.probing import prober as prober_module
from exporter.probing.prober import TICK, Prober, new_session, probe_once, probe_url
from tests.probing.hostile import counting_app, gzip_bomb, hostile_app
from tests.probing.test_hostile import PEAK_LIMIT, sized_app
from tests.probing.test_prober import misbehaving_master
from tests.support import closed_port, serve_app, wait_for

PROBE = ProbeConfig(interval=1.0, timeout=0.3, degraded_latency=0.15, jitter=0.1)
HOSTILE_PROBE = ProbeConfig(interval=5.0, timeout=2.0)


def same(engine: Outcome, reference: Outcome) -> None:
    """Everything but the latency is identical (the latency is measured the same way)."""
    assert (engine.result, engine.degraded, engine.detail, engine.payload) == (
        reference.result, reference.degraded, reference.detail, reference.payload
    ), (engine, reference)


async def both(url: str, probe: ProbeConfig) -> tuple[Outcome, Outcome]:
    async with new_session(probe) as session:
        reference = await probe_once(session, url, probe)
    return await probe_url(url, probe), reference


# --- the same answers as the aiohttp probe --------------------------------------------------


@pytest.fixture
async def master_url():
    async with serve_app(misbehaving_master()) as url:
        yield url


@pytest.mark.parametrize(
    "path", ["/ok", "/hang", "/slow", "/error", "/garbage", "/down", "/degraded", "/bad_field",
             "/missing"],
)
async def test_each_misbehaviour_is_classified_alike(master_url, path):
    engine, reference = await both(master_url + path, PROBE)
    same(engine, reference)
    if engine.result is Result.TIMEOUT:
        assert PROBE.timeout <= engine.latency < PROBE.timeout + 0.1, engine


async def test_refused_port_alike():
    """The reason after "connect failed: " is the OS error as the loop words it: asyncio's
    "Connect call failed ('127.0.0.1', PORT)" for both paths, uvloop's "Connection refused"
    for the engine (aiohttp connects its own socket there and keeps asyncio's words)."""
    engine, reference = await both(f"http://127.0.0.1:{closed_port()}/health", PROBE)
    assert engine.result is reference.result is Result.CONNECT_ERROR
    assert engine.detail.startswith("connect failed: "), engine
    if isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop):
        same(engine, reference)


@dataclass
class Hostile:
    base: str
    target: str
    seen: Counter[str] = field(default_factory=Counter)
    encodings: list[str] = field(default_factory=list)


@pytest.fixture
async def hostile() -> AsyncIterator[Hostile]:
    gzip_bomb()
    seen: Counter[str] = Counter()
    encodings: list[str] = []
    async with serve_app(counting_app(seen)) as target:
        async with serve_app(hostile_app(seen, encodings, redirect_to=target)) as base:
            yield Hostile(base, target, seen, encodings)


@pytest.mark.parametrize(
    "case",
    ["good", "big-float", "huge-int", "negative", "nan", "infinity", "bool-queue", "endless",
     "bomb", "redirect"],
)
async def test_hostile_answers_alike(hostile, case):
    engine, reference = await both(f"{hostile.base}/{case}/health", HOSTILE_PROBE)
    same(engine, reference)
    assert hostile.encodings == ["identity", "identity"]
    assert hostile.seen["target"] == 0  # a redirect is never followed


@pytest.mark.parametrize("case", ["endless", "bomb"])
async def test_attacks_cost_no_more_than_the_cap(hostile, case):
    tracemalloc.start()
    try:
        outcome = await probe_url(f"{hostile.base}/{case}/health", HOSTILE_PROBE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome.result is Result.INVALID_RESPONSE, outcome
    assert outcome.latency < 0.5, outcome
    assert peak < PEAK_LIMIT, f"peak {peak} bytes"


async def test_a_smaller_cap_is_honoured_alike(hostile):
    probe = HOSTILE_PROBE.model_copy(update={"max_body_bytes": 1024})
    for case in ("endless", "good"):
        engine, reference = await both(f"{hostile.base}/{case}/health", probe)
        same(engine, reference)


async def test_declared_length_over_the_cap_alike():
    async def big(_: web.Request) -> web.Response:
        return web.Response(body=b" " * 100_000 + b'{"status": "ok"}')

    app = web.Application()
    app.router.add_get("/health", big)
    async with serve_app(app) as url:
        engine, reference = await both(f"{url}/health", HOSTILE_PROBE)
    same(engine, reference)
    assert engine.detail == "body too large (limit 65536 bytes)"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_the_cap_is_exact_alike(chunked):
    cap = 1024

    app = sized_app(chunked)
    probe = HOSTILE_PROBE.model_copy(update={"max_body_bytes": cap})
    async with serve_app(app) as url:
        for size in (cap, cap + 1):
            engine, reference = await both(f"{url}/health?size={size}", probe)
            same(engine, reference)
            assert (engine.result is Result.SUCCESS) == (size == cap)


# --- a raw server: every byte and every connection under the test's control -----------------

GOOD = b'{"status": "ok", "queue_length": 1}'


def answer(body: bytes = GOOD, status: str = "200 OK", extra: bytes = b"") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n".encode() + extra + b"\r\n" + body
    )


@dataclass
class Raw:
    """An HTTP server on a raw protocol. ``respond(request_number, conn_number, head)`` gives
    the bytes to send back (None: say nothing), after ``delay`` seconds; ``close_after``
    closes the connection once they are sent."""

    respond: Callable[[int, int, bytes], bytes | None]
    delay: float = 0.0
    close_after: Callable[[int], bool] = lambda _: False
    requests: int = 0
    connections: int = 0
    open: int = 0
    most_open: int = 0
    heads: list[bytes] = field(default_factory=list)

    def factory(self) -> asyncio.Protocol:
        raw = self

        class Peer(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport, self.buf = cast(asyncio.Transport, transport), b""
                raw.connections += 1
                self.number = raw.connections
                raw.open += 1
                raw.most_open = max(raw.most_open, raw.open)

            def data_received(self, data: bytes) -> None:
                self.buf += data
                while b"\r\n\r\n" in self.buf:
                    head, self.buf = self.buf.split(b"\r\n\r\n", 1)
                    raw.requests += 1
                    raw.heads.append(head)
                    n = raw.requests
                    out = raw.respond(n, self.number, head)
                    asyncio.get_running_loop().call_later(raw.delay, self.send, n, out)

            def send(self, n: int, out: bytes | None) -> None:
                if self.transport.is_closing():
                    return
                if out is not None:
                    self.transport.write(out)
                if raw.close_after(n):
                    self.transport.close()

            def connection_lost(self, exc: Exception | None) -> None:
                raw.open -= 1

        return Peer()


@pytest.fixture
async def raw_server():
    servers: list[asyncio.Server] = []

    async def start(raw: Raw) -> str:
        server = await asyncio.get_running_loop().create_server(raw.factory, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    try:
        yield start
    finally:
        for server in servers:
            server.close()


async def run_prober(
    urls: dict[str, str], probe: ProbeConfig, until: Callable[[dict[str, list[Outcome]]], bool],
    timeout: float = 10.0,
) -> tuple[Prober, dict[str, list[Outcome]]]:
    """A Prober over masters ``urls`` (name -> URL) until ``until(results)``; stopped."""
    fleet = Fleet([MasterConfig(name=n, url=u) for n, u in urls.items()], probe, 5)
    results: dict[str, list[Outcome]] = {n: [] for n in urls}
    prober = Prober(fleet, probe, None, lambda rt, o: results[rt.name].append(o))  # type: ignore[arg-type]
    prober.start()
    try:
        await asyncio.wait_for(prober.first_round_done.wait(), timeout)
        await wait_for(lambda: until(results), timeout, "the results", poll=0.02)
    finally:
        await prober.stop()
    return prober, results


FAST = ProbeConfig(interval=0.2, timeout=0.1, jitter=0.1, path="/health")


async def test_one_connection_per_master_reused_across_probes(raw_server):
    raw = Raw(lambda *_: answer())
    url = await raw_server(raw)
    _, results = await run_prober(
        {f"m{i}": f"{url}/m{i}" for i in range(3)}, FAST,
        lambda r: all(len(v) >= 5 for v in r.values()),
    )
    assert all(o.result is Result.SUCCESS for v in results.values() for o in v), results
    assert raw.connections == 3, raw
    head = raw.heads[0].decode()
    host = url.removeprefix("http://")
    assert head.startswith("GET /m") and head.endswith(
        f"Host: {host}\r\nUser-Agent: ha-exporter\r\nAccept: */*\r\nAccept-Encoding: identity"
    ), head


async def test_reconnects_after_the_server_closes(raw_server):
    raw = Raw(lambda *_: answer(), close_after=lambda n: n % 2 == 0)
    url = await raw_server(raw)
    _, results = await run_prober({"m": f"{url}/health"}, FAST, lambda r: len(r["m"]) >= 6)
    assert [o.result for o in results["m"]] == [Result.SUCCESS] * len(results["m"])
    assert raw.connections >= 3


async def test_connection_close_header_is_honoured(raw_server):
    raw = Raw(lambda *_: answer(extra=b"Connection: close\r\n"))
    url = await raw_server(raw)
    _, results = await run_prober({"m": f"{url}/health"}, FAST, lambda r: len(r["m"]) >= 3)
    assert all(o.result is Result.SUCCESS for o in results["m"])
    assert raw.connections == raw.requests


async def test_a_stale_keep_alive_connection_is_retried_once(raw_server):
    """The server closes a kept-alive connection as the next request arrives, without a word
    (it timed the connection out): the probe asks again on a new connection and succeeds."""

    def respond(n: int, conn: int, _: bytes) -> bytes | None:
        return None if n == 2 else answer()

    raw = Raw(respond, close_after=lambda n: n == 2)
    url = await raw_server(raw)
    _, results = await run_prober({"m": f"{url}/health"}, FAST, lambda r: len(r["m"]) >= 3)
    assert [o.result for o in results["m"][:3]] == [Result.SUCCESS] * 3, results
    assert raw.connections == 2 and raw.requests >= 4


async def test_a_new_connection_closed_without_an_answer_is_not_retried(raw_server):
    raw = Raw(lambda *_: None, close_after=lambda n: True)
    url = await raw_server(raw)
    outcome = await probe_url(f"{url}/health", FAST)
    assert outcome.result is Result.CONNECT_ERROR
    assert outcome.detail == "ServerDisconnectedError: Server disconnected"
    assert raw.requests == 1


async def test_a_body_ended_by_closing_the_connection(raw_server):
    raw = Raw(lambda *_: b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + GOOD,
              close_after=lambda n: True)
    url = await raw_server(raw)
    outcome = await probe_url(f"{url}/health", FAST)
    assert outcome.result is Result.SUCCESS, outcome


@pytest.mark.parametrize(
    ("reply", "detail"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "invalid HTTP answer"),
        (answer()[:40], "ServerDisconnectedError"),
        (answer() [:-5], "ClientPayloadError"),
    ],
    ids=["not-http", "head-cut", "body-cut"],
)
async def test_broken_answers_are_connect_errors(raw_server, reply, detail):
    raw = Raw(lambda *_: reply, close_after=lambda n: True)
    url = await raw_server(raw)
    outcome = await probe_url(f"{url}/health", FAST)
    assert outcome.result is Result.CONNECT_ERROR, outcome
    assert outcome.detail.startswith(detail), outcome


async def test_bytes_nobody_asked_for_drop_the_connection(raw_server):
    """A server that sends two answers for one request: the extra one arrives on an idle
    connection, which is dropped; the next probe opens a new one and is not confused."""
    raw = Raw(lambda n, *_: answer() + answer(b'{"status": "down"}') if n == 1 else answer())
    url = await raw_server(raw)
    _, results = await run_prober({"m": f"{url}/health"}, FAST, lambda r: len(r["m"]) >= 3)
    assert [o.result for o in results["m"][:3]] == [Result.SUCCESS] * 3, results
    assert raw.connections >= 2


class CountingPool(engine_module.Pool):
    """The pool, remembering the most places it ever had taken."""

    most = 0

    def __setattr__(self, name: str, value: object) -> None:
        if name == "open":
            CountingPool.most = max(CountingPool.most, value)  # type: ignore[call-overload]
        super().__setattr__(name, value)


async def test_the_pool_stays_bounded_and_everyone_is_probed(raw_server, monkeypatch):
    """20 masters, 4 connections: answers take 50 ms, so probes overlap and wait for a place;
    never more than 4 connections are open, and every master gets its answers."""
    monkeypatch.setattr(engine_module, "Pool", CountingPool)
    CountingPool.most = 0
    raw = Raw(lambda *_: answer(), delay=0.05)
    url = await raw_server(raw)
    probe = ProbeConfig(interval=0.5, timeout=0.4, jitter=0.1, max_connections=4)
    prober, results = await run_prober(
        {f"m{i}": f"{url}/m{i}" for i in range(20)}, probe,
        lambda r: all(len(v) >= 3 for v in r.values()),
    )
    assert CountingPool.most == 4
    # the server may accept the next connection before it reads the close of the one that
    # made room for it: one more, for an instant, on its side
    assert raw.most_open <= 5, raw
    ok = [o for v in results.values() for o in v if o.result is Result.SUCCESS]
    assert len(ok) >= 0.9 * sum(len(v) for v in results.values()), results
    assert prober.connections == 0  # stop() closed them


async def test_a_hung_master_holds_nothing_but_its_own_probe(raw_server):
    hung = Raw(lambda *_: None)
    good = Raw(lambda *_: answer())
    hung_url, good_url = await raw_server(hung), await raw_server(good)
    urls = {"hung": f"{hung_url}/health", **{f"m{i}": f"{good_url}/m{i}" for i in range(5)}}
    _, results = await run_prober(
        urls, FAST, lambda r: len(r["hung"]) >= 4 and all(len(v) >= 4 for v in r.values()),
    )
    assert all(o.result is Result.TIMEOUT for o in results["hung"]), results["hung"]
    for o in results["hung"]:  # deadlines come from the scan: late by two ticks (and load)
        assert FAST.timeout <= o.latency < FAST.timeout + 2 * TICK + 0.2, o
    for name in urls:
        if name != "hung":
            assert all(o.result is Result.SUCCESS for o in results[name]), results[name]


async def test_lag_is_measured_and_a_held_loop_skips_slots(raw_server):
    raw = Raw(lambda *_: answer())
    url = await raw_server(raw)
    fleet = Fleet([MasterConfig(name=f"m{i}", url=f"{url}/m{i}") for i in range(10)], FAST, 5)
    seen: list[str] = []
    prober = Prober(fleet, FAST, None, lambda rt, o: seen.append(rt.name))  # type: ignore[arg-type]
    prober.start()
    try:
        await asyncio.wait_for(prober.first_round_done.wait(), 5)
        await wait_for(lambda: prober.rounds >= 4, 5, "four rounds")
        assert len(prober.lag_counts) == len(prober.lag_buckets) + 1
        started = sum(prober.lag_counts)
        assert started >= 30 and prober.rounds_skipped < 5  # none, unless the machine stalls
        assert sum(prober.lag_counts[:5]) >= 0.8 * started  # within 25 ms: a tick and change
        assert 0 <= prober.lag_sum < started * 0.025
        lag_before = prober.lag_sum
        time.sleep(3.7 * FAST.interval)  # a callback that holds the loop for 3.7 rounds
        # the slots of the rounds it held are dropped (each master's, each round); the slots of
        # the round under way when it let go start late, by up to 0.7 of an interval
        await wait_for(lambda: prober.rounds_skipped >= 20, 5, "the skipped slots")
        assert sum(prober.lag_counts[prober.lag_buckets.index(0.05):]) >= 1  # late ones
        assert prober.lag_sum - lag_before > 0.05
        assert max(i for i, n in enumerate(prober.lag_counts) if n) <= (
            prober.lag_buckets.index(0.25)  # none later than the interval: those were dropped
        )
    finally:
        await prober.stop()


async def test_removed_and_moved_masters(raw_server):
    """A reload that removes a master drops its connection and its results; one whose URL
    changed is probed at the new URL from the next round."""
    a, b = Raw(lambda *_: answer()), Raw(lambda *_: answer())
    url_a, url_b = await raw_server(a), await raw_server(b)
    masters = [MasterConfig(name="keep", url=url_a), MasterConfig(name="gone", url=url_a)]
    fleet = Fleet(masters, FAST, 5)
    results: dict[str, list[Outcome]] = {"keep": [], "gone": []}
    prober = Prober(fleet, FAST, None, lambda rt, o: results[rt.name].append(o))  # type: ignore[arg-type]
    prober.start()
    try:
        await wait_for(lambda: len(results["gone"]) >= 2, 5, "probes of gone")
        fleet.update([MasterConfig(name="keep", url=url_b)], FAST, 5)
        prober.update(FAST)
        gone = len(results["gone"])
        before_b = b.requests
        await wait_for(lambda: b.requests >= before_b + 3, 5, "probes at the new URL")
        assert len(results["gone"]) <= gone + 1  # one may have been in flight
        await wait_for(lambda: a.open == 0, 5, "the old connections closed")
    finally:
        await prober.stop()


async def test_stop_closes_every_connection(raw_server):
    raw = Raw(lambda *_: answer())
    url = await raw_server(raw)
    await run_prober({f"m{i}": f"{url}/m{i}" for i in range(5)}, FAST,
                     lambda r: all(len(v) >= 2 for v in r.values()))
    await wait_for(lambda: raw.open == 0, 5, "the connections closed")


async def test_an_interval_change_starts_a_new_round(raw_server):
    raw = Raw(lambda *_: answer())
    url = await raw_server(raw)
    slow = ProbeConfig(interval=30.0, timeout=1.0, jitter=0.0)
    fleet = Fleet([MasterConfig(name="m21", url=url)], slow, 5)  # phase 0.015: probed at 0.45 s
    results: list[Outcome] = []
    prober = Prober(fleet, slow, None, lambda rt, o: results.append(o))  # type: ignore[arg-type]
    prober.start()
    try:
        await asyncio.wait_for(prober.first_round_done.wait(), 5)
        prober.update(FAST)
        await wait_for(lambda: len(results) >= 4, 5, "probes at the new interval")
    finally:
        await prober.stop()


@pytest.fixture
def fresh_throttle(monkeypatch):
    throttled = ThrottledLog(engine_module.log)
    monkeypatch.setattr(engine_module, "_throttled", throttled)
    return throttled


async def test_a_bug_inside_a_probe_is_a_failed_probe_and_probing_goes_on(
    raw_server, monkeypatch, caplog, fresh_throttle
):
    """What the old per-probe task's death was: a bug while probing one master is logged
    (once), that probe is a connect_error naming it, and the schedule goes on."""
    raw = Raw(lambda *_: answer())
    url = await raw_server(raw)

    def broken(*args):
        raise RuntimeError("classifier bug")

    monkeypatch.setattr(prober_module, "classify", broken)
    _, results = await run_prober({"m": f"{url}/health"}, FAST, lambda r: len(r["m"]) >= 3)
    assert all(o.result is Result.CONNECT_ERROR for o in results["m"])
    assert results["m"][0].detail == "probe failed: RuntimeError: classifier bug"
    logged = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None


async def test_a_bug_in_the_reader_is_a_failed_probe(raw_server, monkeypatch, fresh_throttle):
    raw = Raw(lambda *_: answer())
    url = await raw_server(raw)

    def broken(self, name, value):
        raise KeyError("parser bug")

    monkeypatch.setattr("exporter.probing.wire.Conn.on_header", broken)
    outcome = await probe_url(f"{url}/health", FAST)
    assert outcome.result is Result.CONNECT_ERROR
    assert outcome.detail.startswith("probe failed: ")
