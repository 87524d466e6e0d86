"""The HTTP server's own bounds, against a real exporter on 127.0.0.1 with raw sockets: idle and
slow clients are closed, the connection cap keeps /metrics reachable under a flood of idle
sockets, requests aiohttp's parser rejects are answered as JSON, every response carries the
security headers. None of it may fill the log.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import time
from pathlib import Path

import pytest

from exporter.web import connections
from exporter.web.connections import ConnectionLimits, LimitReport
from tests.support import wait_for
from tests.web.harness import AUTH, TOKEN, Api, exporter, raw_exchange, split_response

#: Small enough to flood in a test: 20 connections, idle ones closed after one second.
SMALL = ConnectionLimits(max_connections=20, request_head_timeout=1.0, keepalive_timeout=1.0)
SECURITY = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def noisy(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records that would be a problem under a flood: errors and tracebacks."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def closed_within(conn: Conn, timeout: float) -> bool:
    """Whether the server closes ``conn`` within ``timeout`` (EOF or reset)."""
    try:
        return await asyncio.wait_for(conn[0].read(), timeout) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def get_metrics(api: Api) -> tuple[int, float]:
    """Status of GET /metrics from a fresh client, and how long it took."""
    started = time.monotonic()
    raw = await raw_exchange(api.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
                                       b"Connection: close\r\n\r\n")
    return split_response(raw)[0], time.monotonic() - started


async def test_an_idle_flood_is_capped_closed_and_metrics_stays_reachable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with exporter(tmp_path, limits=SMALL) as api:
        guard = api.server.guard
        started = time.monotonic()
        idle: list[Conn] = []
        for _ in range(40):
            idle.append(await asyncio.open_connection("127.0.0.1", api.port))
        await wait_for(lambda: guard.report.total_evicted >= 20, 5, "20 idle sockets evicted")
        assert guard.open_connections == 20
        # the oldest idle sockets made room for the newer ones: closed at once
        assert all([await closed_within(c, 0.5) for c in idle[:20]])

        status, took = await get_metrics(api)
        assert status == 200 and took < 1.0, (status, took)

        # the rest never sent a request: closed after the request-head timeout
        assert all([await closed_within(c, 3.0) for c in idle[20:]])
        assert time.monotonic() - started < SMALL.request_head_timeout + 3.0
        await wait_for(lambda: guard.open_connections == 0, 3, "no connection left open")
        for _, writer in idle:
            writer.close()
        assert (await get_metrics(api))[0] == 200
    lines = [r.getMessage() for r in caplog.records if r.name == connections.__name__
             and r.levelno >= logging.WARNING]
    assert 1 <= len(lines) <= 3, lines
    assert lines[0].startswith("connection limit of 20 reached: closed 1 idle"), lines
    assert noisy(caplog) == []


async def test_slow_headers_and_idle_keepalive_are_closed(tmp_path: Path) -> None:
    async with exporter(tmp_path, limits=SMALL) as api:
        # a client that trickles its request head, one byte at a time
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        started = time.monotonic()
        writer.write(b"GET /metrics HTTP/1.1\r\n")
        closed_after = None
        while closed_after is None and time.monotonic() - started < 5:
            try:
                writer.write(b"X")
                await writer.drain()
                if await closed_within((reader, writer), 0.2):
                    closed_after = time.monotonic() - started
            except ConnectionError:
                closed_after = time.monotonic() - started
        writer.close()
        assert closed_after is not None
        assert SMALL.request_head_timeout - 0.2 <= closed_after < SMALL.request_head_timeout + 1.0

        # a kept-alive connection after one answered request
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
        await reader.readexactly(length)
        answered = time.monotonic()
        assert await closed_within((reader, writer), SMALL.keepalive_timeout + 2.0)
        assert time.monotonic() - answered >= SMALL.keepalive_timeout - 0.2
        writer.close()


async def test_when_every_connection_is_busy_a_new_one_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Busy connections (a handler waiting for a body) are never evicted."""
    caplog.set_level(logging.INFO)
    limits = ConnectionLimits(max_connections=3, request_head_timeout=5.0)
    async with exporter(tmp_path, limits=limits) as api:
        guard = api.server.guard
        busy: list[Conn] = []
        for _ in range(3):
            conn = await asyncio.open_connection("127.0.0.1", api.port)
            conn[1].write(b"POST /api/v1/route/report HTTP/1.1\r\nHost: x\r\n"
                          b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                          b"Content-Length: 100\r\n\r\n{")
            busy.append(conn)
        await wait_for(lambda: guard.open_connections == 3, 5, "three busy connections")
        for _ in range(2):
            assert await closed_within(await asyncio.open_connection("127.0.0.1", api.port), 1.0)
        assert guard.report.total_refused == 2 and guard.open_connections == 3
        for _, writer in busy:
            writer.close()
        await wait_for(lambda: guard.open_connections == 0, 5, "the busy ones gone")
        assert (await get_metrics(api))[0] == 200
    assert "refused 1 new ones" in caplog.text
    assert noisy(caplog) == []


PARSER_ERRORS = [
    ("an 8 KB URL", b"GET /" + b"a" * 8192 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414,
     "request line too long (limit 4096 bytes)"),
    ("500 headers", b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(500))
     + b"\r\n", 431, "too many request headers (limit 100)"),
    ("a 9 KB header", b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431,
     "request header field too long (limit 8190 bytes)"),
    ("a malformed request line", b"GARBAGE\r\n\r\n", 400, "malformed request line"),
    ("a bad HTTP version", b"GET / HTTP/9.Q\r\n\r\n", 400, "malformed request line"),
    ("TLS on the HTTP port", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 400,
     "malformed request line"),
    ("a NUL in a header", b"GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n", 400, "malformed"),
    ("two Content-Lengths", b"POST /-/reload HTTP/1.1\r\nContent-Length: 1\r\n"
     b"Content-Length: 2\r\n\r\nab", 400, "malformed request"),
]


async def test_requests_the_parser_rejects_are_json_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with exporter(tmp_path) as api:
        for what, data, expected, message in PARSER_ERRORS:
            status, headers, body = split_response(await raw_exchange(api.port, data))
            assert status == expected, (what, status, body)
            assert headers["content-type"].startswith("application/json"), what
            assert json.loads(body)["error"].startswith(message), (what, body)
            for name, value in SECURITY.items():
                assert headers[name] == value, (what, name)
        assert (await get_metrics(api))[0] == 200
    assert noisy(caplog) == []


async def test_security_headers_on_every_response(tmp_path: Path) -> None:
    async with exporter(tmp_path) as api:
        requests: list[tuple[str, str, dict[str, str]]] = [
            ("GET", path, {}) for _, path in api.routes(("GET",))]
        requests += [("GET", "/nowhere", {}), ("DELETE", "/metrics", AUTH),
                     ("POST", "/api/v1/failover/pause", {}), ("HEAD", "/metrics", {})]
        for method, path, headers in requests:
            async with api.http.request(method, api.base + path, headers=headers) as r:
                for name, value in SECURITY.items():
                    assert r.headers.get(name) == value, (method, path, name)
                csp = r.headers["Content-Security-Policy"]
                assert "frame-ancestors 'none'" in csp and "unsafe" not in csp, (path, csp)
                if path == "/":
                    page, page_csp = await r.text(), csp
        style = re.search(r"<style>(.*?)</style>", page, re.S)
        assert style is not None and "<script" not in page
        digest = base64.b64encode(hashlib.sha256(style[1].encode()).digest()).decode()
        assert f"style-src 'sha256-{digest}'" in page_csp
        assert "default-src 'none'" in page_csp and "script-src" not in page_csp


async def test_limit_report_is_one_line_per_period(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=connections.__name__)
    report = LimitReport(limit=5, every=0.3)
    for _ in range(1000):
        report.note(evicted=1)
    report.note(refused=1)
    assert len(caplog.records) == 1
    await asyncio.sleep(0.45)
    assert len(caplog.records) == 2
    assert "closed 999 idle connections and refused 1 new" in caplog.records[1].getMessage()
    await asyncio.sleep(0.35)  # a quiet period: nothing more to say, the timer stops
    report.close()
    assert len(caplog.records) == 2 and report.total_evicted == 1000


def test_the_cap_stays_below_a_low_open_files_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections.resource, "getrlimit", lambda _: (256, 4096))
    assert ConnectionLimits().effective_max_connections() == 128
    monkeypatch.setattr(connections.resource, "getrlimit", lambda _: (65536, 65536))
    assert ConnectionLimits().effective_max_connections() == 512
