"""Producer client against real HTTP servers on 127.0.0.1: a stand-in for the exporter's route
API (backed by a real Router) and tiny masters that accept, fail, hang or refuse."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from exporter.client import Client, DeliveryFailed, RequestRejected, RouteUnavailable
from exporter.config import BalancingConfig, MasterConfig
from exporter.fleet import State
from exporter.routing.router import NoRoute, Router
from tests.support import closed_port, serve_app


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
    router: Router
    reports: list[tuple[str, bool]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/route", self.route)
        app.router.add_post("/api/v1/route/report", self.report)
        return app

    async def route(self, request: web.Request) -> web.Response:
        try:
            d = self.router.route(request.query.get("key"), request.query.get("region"))
        except NoRoute as exc:
            return web.json_response({"error": str(exc)}, status=503)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"master": d.master, "url": d.url, "strategy": d.strategy})

    async def report(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.auth.append(request.headers.get("Authorization"))
        self.reports.append((body["master"], body["ok"]))
        self.router.report(body["master"], body["ok"], body["latency_seconds"])
        return web.json_response({"ok": True})


@asynccontextmanager
async def fleet(
    modes: Sequence[str], **balancing: object
) -> AsyncIterator[tuple[str, FakeExporter, list[FakeMaster]]]:
    """Masters m0.. with the given modes, and an exporter routing over them (round robin)."""
    async with AsyncExitStack() as stack:
        masters = [FakeMaster(mode) for mode in modes]
        urls = [await stack.enter_async_context(serve_app(m.app())) for m in masters]
        configs = [
            MasterConfig(name=f"m{i}", url=url, region="uae") for i, url in enumerate(urls)
        ]
        router = Router(BalancingConfig(**balancing), configs, rng=random.Random(1))  # type: ignore[arg-type]
        exporter = FakeExporter(router)
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
