"""Protocol calls against real misbehaving masters on 127.0.0.1: an endless or oversized
snapshot, a compressed one, a redirect, an endless error body. Each is one bounded
MasterCallError that costs neither memory nor seconds, and no call goes where it was sent."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from exporter.config import ConfigError, FailoverConfig, parse_config
from exporter.failover.protocol import (
    ANSWER_BYTES,
    DEFAULT_MAX_STATE_BYTES,
    MasterCallError,
    MasterClient,
    parse_snapshot,
    snapshot_checksum,
)
from tests.probing.hostile import gzip_bomb
from tests.support import serve_app

CAP = 4 * 2**20  # the tests' max_state_bytes: small, so the endless case ends quickly
ATTACK = 256 * 2**20  # what an "endless" body sends before giving up
CHUNK = 64 * 1024
SNAP: dict[str, Any] = {"master": "a", "sessions": {}, "pending_messages": [], "config": {}}
SNAP["checksum"] = snapshot_checksum(SNAP)
GOOD = json.dumps(SNAP).encode()
#: Every call of the client, by name; ``state_json`` and ``get_state`` read the same path.
CALLS: dict[str, Callable[[MasterClient, str], Awaitable[Any]]] = {
    "health": lambda c, u: c.health("a", u),
    "get_state": lambda c, u: c.get_state("a", u),
    "state_json": lambda c, u: c.state_json("a", u),
    "import_state": lambda c, u: c.import_state("a", u, parse_snapshot(GOOD)),
    "drop_import": lambda c, u: c.drop_import("a", u, "b"),
    "activate": lambda c, u: c.activate("a", u, "b"),
    "deactivate": lambda c, u: c.deactivate("a", u),
}


async def endless(request: web.Request, start: bytes = b'{"master": "a", "pad": "') -> (
        web.StreamResponse):
    """A chunked body that starts like JSON and does not end until the client hangs up."""
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    chunk = b"x" * CHUNK
    try:
        await resp.write(start)
        for _ in range(ATTACK // CHUNK):
            await resp.write(chunk)
    except ConnectionError:
        pass  # the client hung up: the point
    return resp


@dataclass
class Hostile:
    """One app, every misbehaviour at ``/{case}``: a master's URL is ``base/case``."""

    base: str
    target: str
    seen: Counter[str] = field(default_factory=Counter)
    headers: list[dict[str, str]] = field(default_factory=list)

    def url(self, case: str) -> str:
        return f"{self.base}/{case}"


def hostile_app(h: Hostile) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        case = request.match_info["case"]
        h.seen[case] += 1
        h.headers.append(dict(request.headers))
        if case == "endless":
            return await endless(request)
        if case == "declared":  # a Content-Length over any cap, then nothing: never read
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = 10 * 2**30
            await resp.prepare(request)
            await resp.write(b"{")
            await asyncio.sleep(30)
            return resp
        if case == "gzip":
            return web.Response(body=gzip_bomb(), headers={
                "Content-Type": "application/json", "Content-Encoding": "gzip"})
        if case == "redirect":
            raise web.HTTPFound(f"{h.target}/elsewhere")
        if case == "error-endless":
            resp = web.StreamResponse(status=500, headers={"Content-Type": "text/plain"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            try:
                await resp.write(b"overloaded " + b"x" * CHUNK)
                for _ in range(ATTACK // CHUNK):
                    await resp.write(b"x" * CHUNK)
            except ConnectionError:
                pass
            return resp
        raise web.HTTPNotFound()

    app = web.Application()
    app.router.add_route("*", "/{case}/{tail:.*}", handle)
    return app


def target_app(seen: Counter[str]) -> web.Application:
    async def anything(_: web.Request) -> web.Response:
        seen["target"] += 1
        return web.json_response({"status": "ok", "checksum": SNAP["checksum"]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


@pytest.fixture
async def hostile() -> AsyncIterator[Hostile]:
    gzip_bomb()  # built once, before any measurement
    seen: Counter[str] = Counter()
    async with serve_app(target_app(seen)) as target:
        h = Hostile("", target, seen)
        async with serve_app(hostile_app(h)) as base:
            h.base = base
            yield h


async def measured(call: Awaitable[Any]) -> tuple[MasterCallError, int, float]:
    """The error ``call`` fails with, its peak Python allocation and its duration."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(MasterCallError) as failed:
            await call
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return failed.value, peak, time.perf_counter() - t0


async def test_an_endless_state_stops_at_the_cap_and_costs_less_than_twice_it(hostile):
    async with aiohttp.ClientSession() as http:
        client = MasterClient(http, 10.0, max_state_bytes=CAP)
        err, peak, took = await measured(client.get_state("a", hostile.url("endless")))
    assert err.reason == f"state too large (limit {CAP} bytes)" and err.kind == "too_large"
    assert err.op == "get_state" and err.master == "a"
    assert peak < 1.5 * CAP, f"peak {peak / 2**20:.1f} MiB for a {CAP / 2**20:.0f} MiB cap"
    assert took < 5.0


async def test_the_default_cap_holds_an_endless_state_to_64_mib(hostile):
    async with aiohttp.ClientSession() as http:
        err, peak, _ = await measured(MasterClient(http, 20.0).get_state(
            "a", hostile.url("endless")))
    assert err.reason == f"state too large (limit {DEFAULT_MAX_STATE_BYTES} bytes)"
    assert peak < 1.5 * DEFAULT_MAX_STATE_BYTES


async def test_state_json_is_capped_as_well(hostile):
    async with aiohttp.ClientSession() as http:
        client = MasterClient(http, 10.0, max_state_bytes=CAP)
        err, peak, _ = await measured(client.state_json("a", hostile.url("endless")))
    assert err.reason == f"state too large (limit {CAP} bytes)"
    assert peak < 1.5 * CAP


@pytest.mark.parametrize("op", ["health", "import_state", "drop_import", "activate",
                                "deactivate"])
async def test_small_answers_have_a_small_cap(hostile, op):
    async with aiohttp.ClientSession() as http:
        client = MasterClient(http, 10.0, epoch=3, max_state_bytes=CAP)
        err, peak, _ = await measured(CALLS[op](client, hostile.url("endless")))
    assert err.reason == f"answer too large (limit {ANSWER_BYTES} bytes)", err.reason
    assert err.op == op and err.kind == "too_large"
    assert peak < 2 * ANSWER_BYTES + 2**20


async def test_a_declared_length_over_the_cap_is_refused_unread(hostile):
    """The server sends one byte of its 10 GiB and sleeps: reading would time out."""
    async with aiohttp.ClientSession() as http:
        client = MasterClient(http, 10.0, max_state_bytes=CAP)
        err, _, took = await measured(client.get_state("a", hostile.url("declared")))
    assert err.reason == f"state too large (limit {CAP} bytes)"
    assert took < 2.0


@pytest.mark.parametrize("op", sorted(CALLS))
async def test_a_compressed_answer_is_refused_and_identity_is_asked(hostile, op):
    async with aiohttp.ClientSession() as http:
        err, peak, _ = await measured(CALLS[op](MasterClient(http, 10.0, 3), hostile.url(
            "gzip")))
    assert err.reason == "compressed body refused (Content-Encoding gzip)", err.reason
    assert err.kind == "invalid"
    assert peak < 4 * 2**20  # the 256 MiB it inflates to were never made
    assert hostile.headers[-1]["Accept-Encoding"] == "identity"


@pytest.mark.parametrize("op", sorted(CALLS))
async def test_a_redirect_fails_naming_its_status_and_is_never_followed(hostile, op):
    async with aiohttp.ClientSession() as http:
        with pytest.raises(MasterCallError) as failed:
            await CALLS[op](MasterClient(http, 10.0, 3), hostile.url("redirect"))
    err = failed.value
    assert err.status == 302 and err.kind == "http_error"
    assert err.reason == f"HTTP 302: redirect to {hostile.target}/elsewhere not followed"
    assert hostile.seen["redirect"] == 1
    assert hostile.seen["target"] == 0  # the other server saw no request


async def test_an_endless_error_body_is_read_no_further_than_its_text(hostile):
    async with aiohttp.ClientSession() as http:
        err, peak, took = await measured(MasterClient(http, 10.0, 3).activate(
            "a", hostile.url("error-endless"), "b"))
    assert err.status == 500 and err.kind == "http_error"
    assert err.reason.startswith("HTTP 500: overloaded xxx") and len(err.reason) < 220
    assert peak < 2**20 and took < 5.0


async def test_a_snapshot_exactly_at_the_cap_is_read_and_held_once():
    """Padding makes the snapshot exactly ``CAP`` bytes: accepted, one byte more refused. The
    body is handed over without a copy, so reading it peaks near one snapshot, not two; the
    whole call adds only the text json.loads decodes the bytes to while it parses."""
    exact = GOOD[:-1] + b" " * (CAP - len(GOOD)) + b"}"
    bodies = {"exact": exact, "over": exact[:-1] + b" }"}

    async def state(request: web.Request) -> web.StreamResponse:
        """Written in chunks, so the server's own buffers (same process) stay small."""
        body = bodies[request.match_info["case"]]
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        for i in range(0, len(body), CHUNK):
            await resp.write(body[i:i + CHUNK])
        return resp

    async def peak_of(call: Awaitable[Any]) -> tuple[Any, int]:
        tracemalloc.start()
        try:
            out = await call
            return out, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    app = web.Application()
    app.router.add_get("/{case}/state", state)
    async with serve_app(app) as base, aiohttp.ClientSession() as http:
        client = MasterClient(http, 10.0, max_state_bytes=CAP)
        answer, read_peak = await peak_of(client._read_state("a", f"{base}/exact", None))
        assert len(answer.body) == CAP
        assert read_peak < 1.25 * CAP, f"read peak {read_peak / 2**20:.1f} MiB"
        del answer
        snap, peak = await peak_of(client.get_state("a", f"{base}/exact"))
        assert snap.size == CAP and snap.checksum == SNAP["checksum"]
        assert peak < 2.25 * CAP, f"peak {peak / 2**20:.1f} MiB"
        with pytest.raises(MasterCallError, match=f"state too large \\(limit {CAP} bytes\\)"):
            await client.get_state("a", f"{base}/over")


async def test_the_session_survives_refused_answers(hostile):
    """Refused answers drop their connections; the pooled session keeps working."""
    async with aiohttp.ClientSession() as http:
        client = MasterClient(http, 10.0, max_state_bytes=CAP)
        for _ in range(3):
            for case in ("endless", "gzip", "redirect"):
                with pytest.raises(MasterCallError):
                    await client.get_state("a", hostile.url(case))
        async with serve_app(target_app(Counter())) as good:
            assert (await client.health("a", good))["status"] == "ok"


def test_max_state_bytes_defaults_to_64_mib_within_bounds(tmp_path):
    assert FailoverConfig().max_state_bytes == DEFAULT_MAX_STATE_BYTES == 64 * 2**20
    base = {"state_path": str(tmp_path / "s.db"),
            "masters": [{"name": "a", "url": "http://127.0.0.1:9201"}]}
    cfg = parse_config({**base, "failover": {"max_state_bytes": 2**30}})
    assert cfg.failover.max_state_bytes == 2**30
    for bad in (2**20 - 1, 2**30 + 1, -1):
        with pytest.raises(ConfigError) as refused:
            parse_config({**base, "failover": {"max_state_bytes": bad}})
        assert any(e.startswith("failover.max_state_bytes") for e in refused.value.errors)
