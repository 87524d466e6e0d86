"""Probes against real hostile aiohttp masters on 127.0.0.1: each attack is one bounded,
classified probe, and costs neither memory nor seconds."""

from __future__ import annotations

import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from exporter.config import ProbeConfig
from exporter.fleet import Result
from exporter.probing.prober import new_session, probe_once
from tests.probing.hostile import counting_app, gzip_bomb, hostile_app
from tests.support import serve_app

#: A generous timeout, so that a probe that wastes seconds shows as slow, not as a timeout.
PROBE = ProbeConfig(interval=5.0, timeout=2.0)
#: Memory a probe may allocate at its peak (the cap is 64 KiB; the attacks are 256 MiB).
PEAK_LIMIT = 4 * 2**20


@dataclass
class Fleet:
    base: str
    target: str
    seen: Counter[str] = field(default_factory=Counter)
    encodings: list[str] = field(default_factory=list)


@pytest.fixture
async def hostile() -> AsyncIterator[Fleet]:
    gzip_bomb()  # built once, before any measurement
    seen: Counter[str] = Counter()
    encodings: list[str] = []
    async with serve_app(counting_app(seen)) as target:
        async with serve_app(hostile_app(seen, encodings, redirect_to=target)) as base:
            yield Fleet(base, target, seen, encodings)


async def probe_measured(fleet: Fleet, case: str, probe: ProbeConfig = PROBE):
    """One probe of ``case`` with its peak Python allocation (tracemalloc)."""
    async with new_session(probe) as session:
        tracemalloc.start()
        try:
            outcome = await probe_once(session, f"{fleet.base}/{case}/health", probe)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    return outcome, peak


@pytest.mark.parametrize(
    ("case", "detail"),
    [
        ("big-float", "queue_length out of range: 1e+200"),
        ("huge-int", "queue_length out of range: 400-digit integer"),
        ("negative", "queue_length out of range: -5"),
        ("nan", "queue_length out of range: nan"),
        ("infinity", "queue_length out of range: inf"),
        ("bool-queue", "queue_length is not a number (got boolean)"),
    ],
)
async def test_bad_numbers_are_invalid_response(hostile, case, detail):
    outcome, _ = await probe_measured(hostile, case)
    assert outcome.result is Result.INVALID_RESPONSE, outcome
    assert outcome.detail.startswith(detail), outcome.detail
    assert outcome.payload is None


async def test_good_master_still_succeeds_and_asks_for_identity(hostile):
    outcome, _ = await probe_measured(hostile, "good")
    assert outcome.result is Result.SUCCESS, outcome
    assert outcome.payload is not None and outcome.payload["queue_length"] == 3
    assert hostile.encodings == ["identity"]


async def test_endless_body_costs_no_more_than_the_cap(hostile):
    outcome, peak = await probe_measured(hostile, "endless")
    assert outcome.result is Result.INVALID_RESPONSE, outcome
    assert outcome.detail == f"body too large (limit {PROBE.max_body_bytes} bytes)"
    assert outcome.latency < 0.5, outcome
    assert peak < PEAK_LIMIT, f"peak {peak} bytes"


async def test_a_smaller_cap_is_honoured(hostile):
    probe = PROBE.model_copy(update={"max_body_bytes": 1024})
    outcome, _ = await probe_measured(hostile, "endless", probe)
    assert outcome.detail == "body too large (limit 1024 bytes)"
    outcome, _ = await probe_measured(hostile, "good", probe)
    assert outcome.result is Result.SUCCESS  # a body under the cap is unaffected


async def test_declared_length_over_the_cap_is_refused_unread():
    async def big(_: web.Request) -> web.Response:
        return web.Response(body=b" " * 100_000 + b'{"status": "ok"}')

    app = web.Application()
    app.router.add_get("/health", big)
    async with serve_app(app) as url, new_session(PROBE) as session:
        outcome = await probe_once(session, f"{url}/health", PROBE)
    assert outcome.result is Result.INVALID_RESPONSE
    assert outcome.detail == "body too large (limit 65536 bytes)"


async def test_gzip_bomb_is_refused_without_inflating(hostile):
    outcome, peak = await probe_measured(hostile, "bomb")
    assert outcome.result is Result.INVALID_RESPONSE, outcome
    assert outcome.detail.startswith("compressed body refused"), outcome.detail
    assert outcome.latency < 0.5, outcome
    assert peak < PEAK_LIMIT, f"peak {peak} bytes"
    assert hostile.encodings == ["identity"]


async def test_redirect_is_http_error_and_never_followed(hostile):
    outcome, _ = await probe_measured(hostile, "redirect")
    assert outcome.result is Result.HTTP_ERROR, outcome
    assert outcome.detail == "HTTP 302"
    assert hostile.seen["redirect"] == 1
    assert hostile.seen["target"] == 0  # the redirect target was never asked


async def test_protocol_calls_keep_the_session_defaults(hostile):
    """Only probes refuse compression and redirects: other users of the shared session (the
    failover protocol calls) still get aiohttp's defaults."""
    async with new_session(PROBE) as session:
        assert session.auto_decompress
        async with session.get(f"{hostile.base}/redirect/health") as resp:
            assert resp.status == 200 and resp.url.path == "/health"
            assert resp.history and resp.history[0].status == 302
        async with session.get(f"{hostile.base}/good/health") as resp:
            assert "identity" not in resp.request_info.headers.get("Accept-Encoding", "")
    assert hostile.seen["target"] == 1


async def test_many_hostile_probes_in_a_row_stay_bounded(hostile):
    """A session reused across refused answers keeps working (dropped connections are not
    handed back to the pool half-read)."""
    async with new_session(PROBE) as session:
        results = []
        for case in ["endless", "good", "bomb", "good", "endless", "big-float", "good"] * 3:
            outcome = await probe_once(session, f"{hostile.base}/{case}/health", PROBE)
            results.append((case, outcome.result))
    for case, result in results:
        assert (result is Result.SUCCESS) == (case == "good"), results


def padded(size: int) -> bytes:
    """A valid /health answer of exactly ``size`` bytes."""
    head, tail = b'{"status": "ok", "pad": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def sized_app(chunked: bool) -> web.Application:
    """GET /health?size=N answers a valid body of exactly N bytes, with a Content-Length or
    in 100-byte chunks."""

    async def health(request: web.Request) -> web.StreamResponse:
        body = padded(int(request.query["size"]))
        if not chunked:
            return web.Response(body=body, content_type="application/json")
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(body), 100):
            await resp.write(body[i : i + 100])
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    return app


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_the_cap_is_exact(chunked):
    cap = 1024

    app = sized_app(chunked)
    probe = PROBE.model_copy(update={"max_body_bytes": cap})
    async with serve_app(app) as url, new_session(probe) as session:
        at_cap = await probe_once(session, f"{url}/health?size={cap}", probe)
        over = await probe_once(session, f"{url}/health?size={cap + 1}", probe)
    assert at_cap.result is Result.SUCCESS, at_cap
    assert over.result is Result.INVALID_RESPONSE
    assert over.detail == "body too large (limit 1024 bytes)"
