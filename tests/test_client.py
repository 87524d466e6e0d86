"""Producer client against real HTTP servers on 127.0.0.1: a stand-in for the exporter's route
API (backed by a real Router, and serving the real routing-table handler when asked to) and
tiny masters that accept, fail, hang or refuse."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from exporter.client import (
    Client,
    DeliveryFailed,
    ReplayBuffer,
    RequestRejected,
    RouteUnavailable,
)
from exporter.config import BalancingConfig, MasterConfig
from exporter.fleet import State
from exporter.routing.router import NoRoute, Router
from exporter.web.keys import SERVICE
from exporter.web.middleware import errors_as_json
from exporter.web.routing import routing_table
from tests.support import closed_port, serve_app, wait_for


@dataclass
class FakeMaster:
    """mode: ok (dedupe by id), error (500), hang (never answers in time), reject (400)."""

    mode: str = "ok"
    seen: list[str] = field(default_factory=list)
    accepted: dict[str, dict] = field(default_factory=dict)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/messages", self.messages)
        return app

    async def messages(self, request: web.Request) -> web.Response:
        msg = await request.json()
        self.seen.append(msg["id"])
        if self.mode == "error":
            return web.json_response({"error": "disk full"}, status=500)
        if self.mode == "reject":
            return web.json_response({"error": "message has no body"}, status=400)
        if self.mode == "hang":
            await asyncio.sleep(5)
        duplicate = msg["id"] in self.accepted
        self.accepted.setdefault(msg["id"], msg)
        return web.json_response({"accepted": True, "duplicate": duplicate})


@dataclass
class FakeExporter:
    """``table``: serve GET /api/v1/routing-table with the exporter's own handler. ``freeze()``
    makes every request wait until ``thaw()``, like a SIGSTOPped process: connections are
    accepted, nothing is answered."""

    router: Router
    table: bool = False
    reports: list[tuple[str, bool]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)
    asked: int = 0  # GET /api/v1/route requests
    running: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        self.running.set()

        @web.middleware
        async def frozen(request: web.Request, handler: Callable[[web.Request], Awaitable[
                web.StreamResponse]]) -> web.StreamResponse:
            await self.running.wait()
            return await handler(request)

        app = web.Application(middlewares=[frozen, errors_as_json])
        app[SERVICE] = self  # type: ignore[assignment]  # the handler reads .router only
        app.router.add_get("/api/v1/route", self.route)
        app.router.add_post("/api/v1/route/report", self.report)
        if self.table:
            app.router.add_get("/api/v1/routing-table", routing_table)
        return app

    def freeze(self) -> None:
        self.running.clear()

    def thaw(self) -> None:
        self.running.set()

    async def route(self, request: web.Request) -> web.Response:
        self.asked += 1
        try:
            d = self.router.route(request.query.get("key"), request.query.get("region"))
        except NoRoute as exc:
            return web.json_response({"error": str(exc)}, status=503)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"master": d.master, "url": d.url, "strategy": d.strategy})

    async def report(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ConnectionResetError:  # the client gave up on a frozen exporter
            return web.json_response({"error": "gone"}, status=400)
        self.auth.append(request.headers.get("Authorization"))
        self.reports.append((body["master"], body["ok"]))
        self.router.report(body["master"], body["ok"], body["latency_seconds"])
        return web.json_response({"ok": True})


@asynccontextmanager
async def fleet(
    modes: Sequence[str], table: bool = False, regions: Sequence[str] = (),
    priorities: Sequence[int] = (), **balancing: object
) -> AsyncIterator[tuple[str, FakeExporter, list[FakeMaster]]]:
    """Masters m0.. with the given modes (and regions, priorities), and an exporter routing
    over them (round robin unless told), serving the routing table if ``table``."""
    async with AsyncExitStack() as stack:
        masters = [FakeMaster(mode) for mode in modes]
        urls = [await stack.enter_async_context(serve_app(m.app())) for m in masters]
        configs = [
            MasterConfig(name=f"m{i}", url=url, region=regions[i] if regions else "uae",
                         priority=priorities[i] if priorities else 100)
            for i, url in enumerate(urls)
        ]
        router = Router(BalancingConfig(**balancing), configs, rng=random.Random(1))  # type: ignore[arg-type]
        exporter = FakeExporter(router, table=table)
        base = await stack.enter_async_context(serve_app(exporter.app()))
        yield base, exporter, masters


async def test_send_delivers_and_reports_success() -> None:
    async with fleet(["ok"]) as (base, exporter, masters), Client(base) as client:
        result = await client.send({"id": "msg-1", "body": "hello"}, key="k", region="uae")
    assert result["id"] == "msg-1"
    assert result["master"] == "m0"
    assert result["attempts"] == 1
    assert result["strategy"] == "round_robin"
    assert result["response"] == {"accepted": True, "duplicate": False}
    assert masters[0].accepted["msg-1"]["body"] == "hello"
    assert exporter.reports == [("m0", True)]


async def test_failure_is_reported_and_retried_on_the_next_decision_with_the_same_id() -> None:
    async with fleet(["error", "ok"]) as (base, exporter, masters), Client(base) as client:
        result = await client.send({"body": "no id given"})
    assert result["master"] == "m1"
    assert result["attempts"] == 2
    assert exporter.reports == [("m0", False), ("m1", True)]
    assert masters[0].seen == [result["id"]] == list(masters[1].accepted)


async def test_hanging_master_times_out_and_the_next_one_takes_it() -> None:
    async with fleet(["hang", "ok"]) as (base, exporter, _), Client(base, timeout=0.3) as client:
        result = await client.send({"id": "slow"})
    assert result["master"] == "m1"
    assert exporter.reports == [("m0", False), ("m1", True)]


async def test_all_attempts_failing_raises_delivery_failed() -> None:
    async with fleet(["error", "error"]) as (base, exporter, masters), Client(
        base, attempts=3, backoff=0.01
    ) as client:
        with pytest.raises(DeliveryFailed) as exc:
            await client.send({"id": "doomed"})
    assert exc.value.message_id == "doomed"
    assert [a.master for a in exc.value.attempts] == ["m0", "m1", "m0"]
    assert all("HTTP 500: disk full" in a.error for a in exc.value.attempts)
    assert "not delivered after 3 attempts" in str(exc.value)
    assert len(exporter.reports) == 3
    assert masters[0].seen == ["doomed", "doomed"]


async def test_a_refused_message_is_not_retried() -> None:
    async with fleet(["reject", "ok"]) as (base, exporter, masters), Client(base) as client:
        with pytest.raises(RequestRejected) as exc:
            await client.send({"id": "bad"})
    assert exc.value.status == 400
    assert exc.value.master == "m0"
    assert "message has no body" in str(exc.value)
    assert exporter.reports == [("m0", True)]  # the master is fine: no outlier strike
    assert masters[1].seen == []


async def test_no_route_is_retried_then_reported_as_failure() -> None:
    async with fleet(["ok"]) as (base, exporter, _), Client(base, backoff=0.01) as client:
        exporter.router.set_state("m0", State.FAILED)
        with pytest.raises(RouteUnavailable, match="503: no active master can take traffic"):
            await client.route()
        with pytest.raises(DeliveryFailed) as exc:
            await client.send({"id": "x"})
    assert [a.master for a in exc.value.attempts] == [None, None, None]


async def test_bad_region_is_rejected_at_once() -> None:
    async with fleet(["ok"]) as (base, _, masters), Client(base) as client:
        with pytest.raises(RequestRejected) as exc:
            await client.send({"id": "x"}, region="mars")
    assert exc.value.status == 400 and exc.value.master is None
    assert masters[0].seen == []


async def test_unreachable_exporter() -> None:
    base = f"http://127.0.0.1:{closed_port()}"
    async with Client(base, attempts=2, backoff=0.01, timeout=1.0) as client:
        with pytest.raises(RouteUnavailable, match="exporter unreachable"):
            await client.route()
        with pytest.raises(DeliveryFailed):
            await client.send({"id": "x"})
        assert not await client.report("m0", True, 0.1)


async def test_reports_eject_a_broken_master_and_no_message_is_lost() -> None:
    async with fleet(
        ["error", "ok", "ok"], outlier_consecutive_failures=2, slow_start=0
    ) as (base, exporter, masters), Client(base, attempts=3, backoff=0) as client:
        results = await asyncio.gather(*(client.send({"id": f"id-{i}"}) for i in range(30)))
        assert exporter.router.is_ejected("m0")
        hits_before = len(masters[0].seen)
        results += [await client.send({"id": f"id-{i}"}) for i in range(30, 40)]
    delivered = set(masters[1].accepted) | set(masters[2].accepted)
    assert delivered == {f"id-{i}" for i in range(40)}
    assert {r["master"] for r in results} <= {"m1", "m2"}
    assert len(masters[0].seen) == hits_before  # ejected: no traffic any more


async def test_token_goes_on_reports_and_shared_session_stays_open() -> None:
    async with fleet(["ok"]) as (base, exporter, _), aiohttp.ClientSession() as session:
        async with Client(base, session=session, token="s3cret") as client:
            await client.send({"id": "x"})
        assert not session.closed
    assert exporter.auth == ["Bearer s3cret"]


async def test_own_session_is_closed_and_arguments_are_checked() -> None:
    client = Client("http://127.0.0.1:1/")
    async with client:
        session = client._session
        assert session is not None and not session.closed
    assert session.closed
    with pytest.raises(ValueError):
        Client("http://x", attempts=0)
    with pytest.raises(ValueError):
        Client("http://x", timeout=0)


# ---- local routing from the routing table ---------------------------------------------------


def in_rotation(client: Client) -> set[str]:
    table = client.table
    return {m.name for m in table.masters if m.effective_weight > 0} if table else set()


@pytest.mark.parametrize("strategy", ["consistent_hash", "geo", "priority", "round_robin"])
async def test_local_decisions_are_the_exporters_own(strategy: str) -> None:
    """The client routes from the table; the exporter's router, which made no decision
    meanwhile, then decides the same keys and regions: the answers must be the same."""
    regions = ["uae", "uae", "usa", "usa", "eu"]
    async with fleet(["ok"] * 5, table=True, regions=regions, priorities=[1, 1, 2, 2, 3],
                     strategy=strategy, region_fallback=["usa"], slow_start=0) as (
            base, exporter, _), Client(base, replay=False) as client:
        exporter.router.set_state("m1", State.FAILED)
        exporter.router.set_state("m2", State.DEGRADED)
        asks = [(f"chat-{i}", ["uae", "usa", "eu", "mars"][i % 4]) for i in range(400)]
        asks = [(k, g) for k, g in asks if strategy == "geo" or g != "mars"]
        local: list[str] = []
        for key, region in asks:
            try:
                local.append((await client.send({"id": key}, key=key, region=region))["master"])
            except RequestRejected as exc:
                assert strategy == "geo" and region == "mars" and exc.status == 400
                local.append("rejected")
        assert client.stats()["local_routing"] and exporter.asked == 0  # never asked
        remote = []
        for key, region in asks:
            try:
                remote.append(exporter.router.route(key, region).master)
            except ValueError:
                remote.append("rejected")
    assert local == remote
    assert "m1" not in local
    if strategy == "round_robin":  # m2 degraded: half weight; exact over every 7 picks
        assert Counter(local[:294]) == {"m0": 84, "m2": 42, "m3": 84, "m4": 84}


async def test_route_asked_directly_is_the_exporters_and_send_can_ask_too() -> None:
    async with fleet(["ok", "ok"], table=True) as (base, exporter, _):
        async with Client(base) as client:
            await client.send({"id": "a"})
            assert exporter.asked == 0 and client.table is not None
            assert (await client.route())["master"] in ("m0", "m1")
            assert exporter.asked == 1  # /api/v1/route stays for whoever asks
        async with Client(base, local_routing=False) as client:
            await client.send({"id": "b"})
            assert exporter.asked == 2 and client.table is None


async def test_reports_go_out_in_the_background_with_the_token() -> None:
    async with fleet(["ok"], table=True) as (base, exporter, _):
        async with Client(base, token="s3cret") as client:
            for i in range(20):
                await client.send({"id": f"r{i}"})
        assert exporter.reports == [("m0", True)] * 20  # close() sent what was queued
        assert set(exporter.auth) == {"Bearer s3cret"}
        assert client.stats()["reports_sent"] == 20


async def test_the_client_fails_over_between_exporter_urls() -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    async with fleet(["ok", "ok"], table=True) as (base, _, _), Client(
            [dead, base], timeout=1.0) as client:
        result = await client.send({"id": "x"})
        assert result["master"] in ("m0", "m1")
        stats = client.stats()
        assert stats["exporter"] == base and stats["local_routing"]
        assert client.exporters == (dead, base)
        assert (await client.route())["master"] in ("m0", "m1")  # asked: the live one
        assert await client.report("m0", True, 0.01)


async def test_every_exporter_stopped_the_producer_keeps_going_on_its_last_table(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Freeze the exporter (it accepts connections, answers nothing): the client keeps
    delivering on its table, says how stale it is, drops reports; a master fails meanwhile;
    once the exporter answers again the client takes the new table and stops sending there."""
    async with fleet(["ok", "ok", "ok"], table=True, slow_start=0) as (
            base, exporter, masters), Client(
            base, attempts=4, backoff=0.01, timeout=0.3, watch_wait=0.5, stale_after=0.5,
            eject_for=0, replay=False) as client:
        for i in range(10):
            await client.send({"id": f"before-{i}"})
        version: int | None = None
        exporter.freeze()
        exporter.router.set_state("m1", State.FAILED)  # the exporter knows; nobody hears it
        masters[1].mode = "error"
        delivered, started = [], time.monotonic()
        with caplog.at_level(logging.WARNING, logger="exporter.client"):
            while time.monotonic() - started < 2.0:
                delivered.append(await client.send({"id": f"during-{len(delivered)}"}))
                if version is None and time.monotonic() - started > 0.5:
                    # a table already on its way when the exporter froze has landed by now
                    version = client.stats()["table_version"]
                await asyncio.sleep(0.005)
        stats = client.stats()
        assert stats["table_version"] == version and not stats["exporter_up"]
        assert stats["table_age_seconds"] > 1.0 and stats["reports_dropped"] > 0
        assert "routing on a table" in caplog.text
        assert {r["master"] for r in delivered} == {"m0", "m2"}
        assert any(r["attempts"] == 2 for r in delivered)  # m1 tried first, then the next
        assert len(masters[1].seen) > 0  # the old table still had m1 in rotation
        exporter.thaw()
        await wait_for(lambda: "m1" not in in_rotation(client), 5, "the new table")
        tried = len(masters[1].seen)
        results = [await client.send({"id": f"after-{i}"}) for i in range(30)]
        assert {r["attempts"] for r in results} == {1} and len(masters[1].seen) == tried
        await wait_for(lambda: client.stats()["exporter_up"]
                       and client.stats()["table_age_seconds"] < 1.0, 5, "a fresh table")
        assert exporter.asked == 0 and "unusable" not in caplog.text  # never asked per message
    ids = {r["id"] for r in [*delivered, *results]}
    assert ids <= set(masters[0].accepted) | set(masters[2].accepted)


async def test_a_master_failing_deliveries_is_ejected_locally_for_a_while() -> None:
    async with fleet(["ok", "error", "ok", "ok"], table=True, slow_start=0,
                     outlier_consecutive_failures=3) as (base, exporter, masters), Client(
            base, attempts=3, backoff=0, timeout=0.3, eject_for=0.5, replay=False) as client:
        await client.send({"id": "warm"})
        exporter.freeze()  # nobody else takes m1 out
        results = [await client.send({"id": f"e{i}"}) for i in range(60)]
        assert client.stats()["locally_ejected"] == ["m1"]
        assert len(masters[1].seen) == 3 and all(r["master"] != "m1" for r in results)
        await asyncio.sleep(0.6)  # eject_for passes: tried again
        await asyncio.gather(*(client.send({"id": f"f{i}"}) for i in range(8)))
        assert len(masters[1].seen) > 3 and exporter.asked == 0
        exporter.thaw()


@pytest.mark.parametrize("body", [b'{"format": 1}', b"not json", b"[" * 100,
                                  b'{"pad": "' + b"x" * (33 << 20) + b'"}'])
async def test_an_unusable_table_means_asking_per_message(
    body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with fleet(["ok"]) as (_, exporter, _):
        async def table(request: web.Request) -> web.Response:
            return web.Response(body=body, content_type="application/json")

        app = exporter.app()
        app.router.add_get("/api/v1/routing-table", table)
        async with serve_app(app) as hostile, Client(hostile) as client:
            with caplog.at_level(logging.WARNING, logger="exporter.client"):
                result = await client.send({"id": "x"})
            assert result["master"] == "m0" and client.table is None
            assert exporter.asked == 1 and not client.stats()["local_routing"]
            assert "unusable routing table" in caplog.text


async def test_local_routing_arguments_are_checked() -> None:
    for bad in ({"watch_wait": 0}, {"watch_wait": 61}, {"stale_after": 0}, {"eject_for": -1},
                {"report_queue": 0}):
        with pytest.raises(ValueError):
            Client("http://x", **bad)  # type: ignore[arg-type]
    for urls in ([], ["ftp://x"], "x", ["http://a"] * 65):
        with pytest.raises(ValueError):
            Client(urls)


# ---- replay after a failover ----------------------------------------------------------------


def test_replay_buffer_gives_back_exactly_what_a_watermark_does_not_cover() -> None:
    buf = ReplayBuffer(max_messages=100, max_bytes=10_000)
    for i, seq in enumerate([1, 2, 3, 4, 5, None]):
        buf.add(f"m{i}", seq, f"body-{i}".encode())
    assert [mid for mid, _ in buf.above(3)] == ["m3", "m4", "m5"]  # seq 4, 5 and unnumbered
    assert [mid for mid, _ in buf.above(None)] == [f"m{i}" for i in range(6)]
    assert buf.above(5) == [("m5", b"body-5")]
    buf.add("m1", 9, b"body-1")  # acknowledged again, numbered higher: moves to the end
    assert [mid for mid, _ in buf.above(3)] == ["m3", "m4", "m5", "m1"]
    buf.add("m4", None, b"body-4")  # an unnumbered acknowledgement is never known covered
    assert [mid for mid, _ in buf.above(100)] == ["m5", "m4"]
    assert buf.settle(3, done={"m3"}) == 0  # nothing was dropped
    assert [mid for mid, _ in buf.above(None)] == ["m5", "m1", "m4"]
    assert len(buf) == 3 and buf.bytes == len(b"body-5") * 3


def test_replay_buffer_honours_its_caps_and_counts_what_it_drops() -> None:
    buf = ReplayBuffer(max_messages=3, max_bytes=1000)
    for seq in range(1, 9):
        buf.add(f"m{seq}", seq, b"x" * 10)
    assert [mid for mid, _ in buf.above(None)] == ["m6", "m7", "m8"]
    assert (len(buf), buf.bytes, buf.dropped) == (3, 30, 5)
    assert buf.settle(5, done=set()) == 0  # every dropped one (seq 1..5) is covered by 5
    assert len(buf) == 3  # seq 6..8 are above 5: kept until re-sent

    small = ReplayBuffer(max_messages=100, max_bytes=25)
    for seq in range(1, 5):
        small.add(f"m{seq}", seq, b"y" * 10)
    assert [mid for mid, _ in small.above(None)] == ["m3", "m4"] and small.bytes == 20
    small.add("huge", 5, b"z" * 26)  # larger than the cap alone: never held
    assert (len(small), small.bytes, small.dropped) == (0, 0, 5)
    # five dropped since the last failover, the highest numbered 5 > 3: up to five are lost
    assert small.settle(3, done=set()) == 5
    assert small.settle(3, done=set()) == 0  # counted once


@dataclass
class ReplayExporter:
    """The exporter's route API (always ``target``), failover records and master entries."""

    urls: dict[str, str] = field(default_factory=dict)
    target: str = "m0"
    failovers: list[dict] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/route", self.route)
        app.router.add_post("/api/v1/route/report", self.report)
        app.router.add_get("/api/v1/failovers", self.records)
        app.router.add_get("/api/v1/masters/{name}", self.master)
        return app

    async def route(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"master": self.target, "url": self.urls[self.target], "strategy": "fixed"}
        )

    async def report(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def records(self, request: web.Request) -> web.Response:
        limit = int(request.query["limit"])
        before = int(request.query.get("before", 2**62))
        items = sorted((r for r in self.failovers if r["id"] < before), key=lambda r: -r["id"])
        more = len(items) > limit
        return web.json_response(
            {"items": items[:limit], "next_before": items[limit - 1]["id"] if more else None}
        )

    async def master(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.urls:
            return web.json_response({"error": "no such master"}, status=404)
        return web.json_response({"name": name, "url": self.urls[name]})

    def fail(self, source: str, backup: str, result: str = "success", **extra: object) -> None:
        record = {"id": len(self.failovers) + 1, "master": source, "backup": backup,
                  "result": result, "kind": "failover", "finished": 1.0, **extra}
        self.failovers.append(record)


@dataclass
class NumberingMaster:
    """Numbers what it accepts (dedupe by id, the first number kept) and reports ``marks`` as
    its imported watermarks; ``refuse`` ids are answered 400."""

    marks: object = None
    seq: int = 0
    numbers: dict[str, int] = field(default_factory=dict)
    posted: list[str] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/messages", self.messages)
        app.router.add_get("/health", self.health)
        return app

    async def messages(self, request: web.Request) -> web.Response:
        mid = (await request.json())["id"]
        self.posted.append(mid)
        if mid in self.refuse:
            return web.json_response({"error": "no"}, status=400)
        if mid not in self.numbers:
            self.seq += 1
            self.numbers[mid] = self.seq
        return web.json_response({"accepted": True, "seq": self.numbers[mid]})

    async def health(self, request: web.Request) -> web.Response:
        body: dict = {"status": "ok"}
        if self.marks is not None:
            body["imported_watermarks"] = self.marks
        return web.json_response(body)


@asynccontextmanager
async def replay_fleet(
    n: int = 2, **client_args: int
) -> AsyncIterator[tuple[ReplayExporter, list[NumberingMaster], Client]]:
    """Masters m0..; the client's watch checks only when told (sync), after its baseline."""
    async with AsyncExitStack() as stack:
        exporter, masters = ReplayExporter(), [NumberingMaster() for _ in range(n)]
        for i, m in enumerate(masters):
            exporter.urls[f"m{i}"] = await stack.enter_async_context(serve_app(m.app()))
        base = await stack.enter_async_context(serve_app(exporter.app()))
        client = await stack.enter_async_context(Client(base, sync_interval=3600, **client_args))
        yield exporter, masters, client


async def test_a_failover_re_sends_exactly_what_the_backup_lacks() -> None:
    async with replay_fleet() as (exporter, (_m0, m1), client):
        exporter.fail("m0", "m1")  # an old record: before the client held anything
        for i in range(6):
            await client.send({"id": f"a{i}"})
        assert await client.sync() == 0  # the baseline: the old record is not replayed
        assert m1.posted == []
        m1.marks = {"m0": 4, "other": 99}
        exporter.fail("m0", "m1")
        assert await client.sync() == 2
        assert m1.posted == ["a4", "a5"]  # seq 5 and 6, above the watermark 4
        assert client.stats()["held"] == {"m0": 0, "m1": 2}
        assert client.replayed == {"m0": 2}
        assert await client.sync() == 0 and m1.posted == ["a4", "a5"]  # dealt with once


@pytest.mark.parametrize("marks", [None, {}, {"m0": "4"}, {"m0": -1}, {"m0": 2**60},
                                   {"m0": True}, {"m0": 4.0}, ["m0", 4]])
async def test_without_a_valid_watermark_everything_held_is_re_sent(marks: object) -> None:
    async with replay_fleet() as (exporter, (_m0, m1), client):
        for i in range(3):
            await client.send({"id": f"b{i}"})
        await client.sync()
        m1.marks = marks
        exporter.fail("m0", "m1")
        assert await client.sync() == 3
        assert m1.posted == ["b0", "b1", "b2"]


async def test_unnumbered_acknowledgements_are_always_re_sent() -> None:
    async with replay_fleet() as (exporter, (m0, m1), client):
        await client.send({"id": "c0"})
        m0.seq = 2**53  # the next number would be out of range: not trusted
        await client.send({"id": "c1"})
        await client.sync()
        m1.marks = {"m0": 10**6}
        exporter.fail("m0", "m1")
        assert await client.sync() == 1 and m1.posted == ["c1"]


async def test_only_finished_successful_failovers_and_switchovers_replay() -> None:
    async with replay_fleet(3) as (exporter, (_m0, m1, m2), client):
        for i in range(2):
            await client.send({"id": f"d{i}"})
        await client.sync()
        m1.marks = m2.marks = {"m0": 0}
        exporter.fail("m0", "m2", result="no_candidate")
        exporter.fail("m0", "m2", kind="failback")
        exporter.fail("m0", "m1", finished=None, result="in_progress")  # still running
        assert await client.sync() == 0 and m1.posted == m2.posted == []
        exporter.failovers[-1].update(finished=2.0, result="success", kind="switchover")
        assert await client.sync() == 2 and m1.posted == ["d0", "d1"]


async def test_an_unreachable_backup_is_tried_again_and_a_refusal_is_counted() -> None:
    async with replay_fleet() as (exporter, (_m0, m1), client):
        for i in range(3):
            await client.send({"id": f"e{i}"})
        await client.sync()
        real = exporter.urls["m1"]
        exporter.urls["m1"] = f"http://127.0.0.1:{closed_port()}"
        exporter.fail("m0", "m1")
        assert await client.sync() == 0  # cannot read the backup's watermark: nothing lost
        assert client.stats()["held"]["m0"] == 3
        exporter.urls["m1"] = real
        m1.marks, m1.refuse = {"m0": 1}, {"e2"}
        assert await client.sync() == 1
        assert m1.posted == ["e1", "e2"]
        assert client.replayed == {"m0": 1} and client.replay_refused == {"m0": 1}
        assert client.stats()["held"]["m0"] == 0


async def test_the_cap_bounds_memory_and_a_gap_is_reported() -> None:
    async with replay_fleet(replay_max_messages=4) as (exporter, (_m0, m1), client):
        for i in range(10):
            await client.send({"id": f"f{i}"})
        stats = client.stats()
        assert stats["held"] == {"m0": 4} and stats["dropped"] == {"m0": 6}
        assert stats["held_bytes"] == {"m0": 4 * len(b'{"id": "f0"}')}
        await client.sync()
        m1.marks = {"m0": 5}  # seq 6 (f5) was dropped and is above the watermark
        exporter.fail("m0", "m1")
        assert await client.sync() == 4
        assert m1.posted == ["f6", "f7", "f8", "f9"]
        assert client.at_risk == {"m0": 6}  # an upper bound: the six dropped


async def test_records_are_read_back_to_the_cursor_across_pages() -> None:
    async with replay_fleet(3) as (exporter, (_m0, m1, _m2), client):
        await client.send({"id": "g0"})
        await client.sync()
        m1.marks = {"m0": 0}
        exporter.fail("m0", "m1")  # the oldest new record, two and a half pages back
        for _ in range(120):
            exporter.fail("m2", "m1")  # nothing held for m2: nothing to do
        assert await client.sync() == 1 and m1.posted == ["g0"]


async def test_a_restarted_failover_history_is_still_followed() -> None:
    async with replay_fleet() as (exporter, (_m0, m1), client):
        for _ in range(5):
            exporter.fail("m2", "m1")
        await client.send({"id": "h0"})
        await client.sync()  # the cursor is at 5
        exporter.failovers.clear()  # a new state file: ids start at 1 again
        m1.marks = {"m0": 0}
        exporter.fail("m0", "m1")
        assert await client.sync() == 1 and m1.posted == ["h0"]


async def test_an_oversized_or_garbled_holder_answer_is_not_trusted() -> None:
    async with replay_fleet() as (exporter, (_m0, m1), client):
        await client.send({"id": "i0"})
        await client.sync()
        m1.marks = {"m0": 0, "pad": "x" * (1 << 20)}  # /health above the 1 MiB read cap
        exporter.fail("m0", "m1")
        assert await client.sync() == 0 and m1.posted == []
        assert client.stats()["held"]["m0"] == 1  # kept: tried again at the next check
        m1.marks = {"m0": 0}
        assert await client.sync() == 1 and m1.posted == ["i0"]
