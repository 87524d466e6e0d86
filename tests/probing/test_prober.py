"""Probe classification against real aiohttp masters misbehaving in each way."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from aiohttp import web

from exporter.config import MasterConfig, ProbeConfig
from exporter.fleet import Fleet, Result
from exporter.logs import ThrottledLog
from exporter.probing import engine as engine_module
from exporter.probing import prober as prober_module
from exporter.probing.prober import Prober, classify, new_session, probe_once
from tests.support import closed_port, serve_app, wait_for

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
        outcome = await probe_once(session, f"http://127.0.0.1:{closed_port()}/health", PROBE)
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


@pytest.fixture
def fresh_throttle(monkeypatch):
    """A throttled log of its own, so that what another test logged does not hide ours."""
    throttled = ThrottledLog(prober_module.log)
    monkeypatch.setattr(prober_module, "_throttled", throttled)
    return throttled


async def test_a_failing_result_handler_stays_with_its_master(master_url, caplog, fresh_throttle):
    """One master's result handler raising on every probe: the others still get every result
    (so their health transitions happen), the failing one is still probed, and the error is
    logged once, not once per probe."""
    masters = [MasterConfig(name=f"m{i}", url=master_url) for i in range(3)]
    probe = ProbeConfig(interval=0.3, timeout=0.2, path="/ok", jitter=0.1)
    fleet = Fleet(masters, probe, 5)
    calls: dict[str, int] = {}

    def on_result(rt, outcome):
        calls[rt.name] = calls.get(rt.name, 0) + 1
        if rt.name == "m0":
            raise RuntimeError("handler bug")

    async with new_session(probe) as session:
        prober = Prober(fleet, probe, session, on_result)
        prober.start()
        try:
            await asyncio.wait_for(prober.first_round_done.wait(), 5)
            await wait_for(
                lambda: len(calls) == 3 and min(calls.values()) >= 3, 10, "three rounds each"
            )
        finally:
            await prober.stop()
    failures = [r for r in caplog.records if "handling the probe result of m0" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]
    assert failures[0].exc_info is not None


async def test_a_probe_that_breaks_inside_is_a_failed_probe(
    master_url, monkeypatch, caplog, fresh_throttle
):
    def broken(*args):
        raise RuntimeError("classifier bug")

    monkeypatch.setattr(prober_module, "classify", broken)
    async with new_session(PROBE) as session:
        outcome = await probe_once(session, master_url + "/ok", PROBE)
    assert outcome.result is Result.CONNECT_ERROR
    assert outcome.detail == "probe failed: RuntimeError: classifier bug"
    assert any("failed unexpectedly" in r.getMessage() for r in caplog.records)


def test_classify_never_raises_on_a_broken_decoder(monkeypatch, fresh_throttle):
    def broken(body):
        raise KeyError("decoder bug")

    monkeypatch.setattr(prober_module, "decode", broken)
    outcome = classify(200, b'{"status": "ok"}', 0.01, 0.5)
    assert outcome.result is Result.INVALID_RESPONSE
    assert outcome.detail == "unreadable answer (KeyError)"


async def test_a_probe_that_dies_is_logged(master_url, monkeypatch, caplog):
    """A bug while starting one master's probe (there is no task per probe to die any more):
    logged once, that master's probes are connect_errors naming it, the other master's go on."""
    masters = [MasterConfig(name="m0", url=master_url), MasterConfig(name="m1", url=master_url)]
    probe = ProbeConfig(interval=0.3, timeout=0.2, path="/ok", jitter=0.1)
    fleet = Fleet(masters, probe, 5)
    monkeypatch.setattr(engine_module, "_throttled", ThrottledLog(engine_module.log))
    begin = engine_module.Engine.begin

    def dies(self, slot, now):
        if slot.rt.name == "m0":
            raise RuntimeError("task bug")
        begin(self, slot, now)

    monkeypatch.setattr(engine_module.Engine, "begin", dies)
    seen: dict[str, list] = {"m0": [], "m1": []}
    async with new_session(probe) as session:
        prober = Prober(fleet, probe, session, lambda rt, outcome: seen[rt.name].append(outcome))
        prober.start()
        try:
            await asyncio.wait_for(prober.first_round_done.wait(), 5)
            await wait_for(lambda: min(len(v) for v in seen.values()) >= 3, 5, "three rounds")
        finally:
            await prober.stop()
    assert all(o.result is Result.CONNECT_ERROR for o in seen["m0"])
    assert seen["m0"][0].detail == "probe failed: RuntimeError: task bug"
    assert all(o.result is Result.SUCCESS for o in seen["m1"])
    logged = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
