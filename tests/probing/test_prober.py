"""Probe classification against real aiohttp masters misbehaving in each way."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from aiohttp import web

from exporter.config import MasterConfig, ProbeConfig
from exporter.fleet import Fleet, Result
from exporter.probing.prober import Prober, classify, new_session, probe_once
from tests.support import free_port, serve_app, wait_for

PROBE = ProbeConfig(interval=1.0, timeout=0.3, degraded_latency=0.15, jitter=0.1)


def misbehaving_master() -> web.Application:
    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "queue_length": 7, "cpu_percent": 12.5})

    async def hang(_: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({"status": "ok"})

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(0.2)
        return web.json_response({"status": "ok"})

    async def error(_: web.Request) -> web.Response:
        return web.json_response({"error": "boom"}, status=500)

    async def garbage(_: web.Request) -> web.Response:
        return web.Response(text="<html>not json</html>")

    async def down(_: web.Request) -> web.Response:
        return web.json_response({"status": "down"})

    async def degraded(_: web.Request) -> web.Response:
        return web.json_response({"status": "degraded", "queue_length": 900})

    async def bad_field(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "queue_length": "lots"})

    app = web.Application()
    for name, handler in [
        ("ok", ok),
        ("hang", hang),
        ("slow", slow),
        ("error", error),
        ("garbage", garbage),
        ("down", down),
        ("degraded", degraded),
        ("bad_field", bad_field),
    ]:
        app.router.add_get(f"/{name}", handler)
    return app


@pytest.fixture
async def master_url():
    async with serve_app(misbehaving_master()) as url:
        yield url


@pytest.mark.parametrize(
    ("path", "result", "degraded"),
    [
        ("/ok", Result.SUCCESS, False),
        ("/hang", Result.TIMEOUT, False),
        ("/slow", Result.SUCCESS, True),
        ("/error", Result.HTTP_ERROR, False),
        ("/garbage", Result.INVALID_RESPONSE, False),
        ("/down", Result.UNHEALTHY, False),
        ("/degraded", Result.SUCCESS, True),
        ("/bad_field", Result.INVALID_RESPONSE, False),
        ("/missing", Result.HTTP_ERROR, False),
    ],
)
async def test_each_misbehaviour_is_classified(master_url, path, result, degraded):
    async with new_session(PROBE) as session:
        outcome = await probe_once(session, master_url + path, PROBE)
    assert outcome.result is result, outcome
    assert outcome.degraded is degraded
    if result is Result.TIMEOUT:
        assert PROBE.timeout <= outcome.latency < PROBE.timeout + 0.5
    if result is not Result.SUCCESS:
        assert outcome.detail


async def test_refused_port_is_connect_error():
    async with new_session(PROBE) as session:
        outcome = await probe_once(session, f"http://127.0.0.1:{free_port()}/health", PROBE)
    assert outcome.result is Result.CONNECT_ERROR
    assert "connect" in outcome.detail


async def test_payload_fields_are_parsed(master_url):
    async with new_session(PROBE) as session:
        outcome = await probe_once(session, master_url + "/ok", PROBE)
    assert outcome.payload == {"status": "ok", "queue_length": 7, "cpu_percent": 12.5}


def test_classify_rules():
    assert classify(503, b"", 0.01, 0.5).result is Result.HTTP_ERROR
    assert classify(200, b"[1]", 0.01, 0.5).result is Result.INVALID_RESPONSE
    assert classify(200, b'{"status": "weird"}', 0.01, 0.5).result is Result.INVALID_RESPONSE
    assert classify(200, b'{"status": "ok"}', 0.6, 0.5).degraded


async def test_rounds_probe_every_master_spread_over_the_interval(master_url):
    masters = [MasterConfig(name=f"m{i}", url=master_url) for i in range(20)]
    probe = ProbeConfig(interval=0.5, timeout=0.2, path="/ok", jitter=0.1)
    fleet = Fleet(masters, probe, 5)
    seen: dict[str, list[float]] = {}
    loop = asyncio.get_running_loop()

    def on_result(rt, outcome):
        seen.setdefault(rt.name, []).append(loop.time())

    async with new_session(probe) as session:
        prober = Prober(fleet, probe, session, on_result)
        prober.start()
        try:
            await asyncio.wait_for(prober.first_round_done.wait(), 5)
            assert set(seen) == {m.name for m in masters}
            await wait_for(lambda: all(len(v) >= 3 for v in seen.values()), 5, "three rounds")
        finally:
            await prober.stop()
    firsts = sorted(v[0] for v in seen.values())
    assert firsts[-1] - firsts[0] > 0.15  # spread over the round, not a thundering herd
    for times in seen.values():  # one probe per master per interval, give or take jitter
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(0.5 * (1 - 0.1) - 0.1 < g < 0.5 * (1 + 0.1) + 0.1 for g in gaps), gaps
