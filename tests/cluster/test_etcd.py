"""The etcd client against a real etcd (each test its own member), and against a fake
gateway for the answers a real one never gives (garbage, oversized)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path

import pytest
from aiohttp import web

from exporter.cluster.etcd import (
    Compacted,
    Compare,
    Delete,
    Etcd,
    EtcdError,
    KeyValue,
    LeaseLost,
    Put,
    WatchEvent,
)
from tests.cluster.etcd_server import EtcdServer
from tests.support import serve_app, wait_for

TIMEOUT = 0.5
SLACK = 1.0  # what a call may take beyond its timeout on a loaded machine

Call = Callable[[Etcd], Awaitable[object]]


@pytest.fixture
async def etcd(etcd_server: EtcdServer) -> AsyncIterator[Etcd]:
    async with Etcd([etcd_server.endpoint], timeout=TIMEOUT) as client:
        yield client


async def collect(stream: AsyncIterator[list[WatchEvent]], count: int,
                  timeout: float = 5.0) -> list[WatchEvent]:
    """The first ``count`` events of a watch (the stream closed after)."""
    out: list[WatchEvent] = []
    async with aclosing(stream), asyncio.timeout(timeout):
        async for batch in stream:
            out.extend(batch)
            if len(out) >= count:
                break
    return out


def summary(events: list[WatchEvent]) -> list[tuple[str, str, bytes, int]]:
    return [(e.kind, e.kv.key, e.kv.value, e.kv.mod_revision) for e in events]


# --- keys, txn, leases ---------------------------------------------------------------------


async def test_put_get_prefix_delete_round_trip(etcd: Etcd):
    r1 = await etcd.put("app/a", b"\x00\xff binary\n")
    r2 = await etcd.put("app/b", b"")
    r3 = await etcd.put("app/é/d", "ü".encode())
    for outside in ("app", "app.", "app0", "apq"):  # around the prefix "app/", not in it
        await etcd.put(outside, b"x")
    assert r1 < r2 < r3

    assert await etcd.get("app/a") == KeyValue("app/a", b"\x00\xff binary\n", r1, r1, 1, 0)
    assert await etcd.get("app/b") == KeyValue("app/b", b"", r2, r2, 1, 0)
    assert await etcd.get("app/missing") is None
    r4 = await etcd.put("app/a", b"second")
    assert await etcd.get("app/a") == KeyValue("app/a", b"second", r1, r4, 2, 0)

    kvs, revision = await etcd.get_prefix("app/")
    assert [(kv.key, kv.value) for kv in kvs] == [
        ("app/a", b"second"), ("app/b", b""), ("app/é/d", "ü".encode())]
    assert revision == r4

    r5 = await etcd.delete("app/a")
    assert r5 == r4 + 1
    assert await etcd.get("app/a") is None
    r6 = await etcd.delete("app/", prefix=True)
    assert r6 == r5 + 1
    assert await etcd.get_prefix("app/") == ([], r6)
    everything, _ = await etcd.get_prefix("")
    assert [kv.key for kv in everything] == ["app", "app.", "app0", "apq"]


async def test_txn_create_if_absent_succeeds_once(etcd: Etcd):
    absent = [Compare("leader", "create", 0)]
    first = await etcd.txn(absent, [Put("leader", b"me")], [Put("lost", b"1")])
    assert first.succeeded
    leader = await etcd.get("leader")
    assert leader is not None and leader.value == b"me"
    assert first.revision == leader.mod_revision
    assert await etcd.get("lost") is None

    second = await etcd.txn(absent, [Put("leader", b"you")], [Put("lost", b"1")])
    assert not second.succeeded
    assert second.revision == first.revision + 1  # the failure branch wrote "lost"
    assert (await etcd.get("leader")) == leader
    assert (lost := await etcd.get("lost")) is not None and lost.value == b"1"

    mine = [Compare("leader", "value", b"me"), Compare("leader", "version", 1),
            Compare("leader", "mod", leader.mod_revision, "less")]
    assert not (await etcd.txn(mine, [Delete("leader")])).succeeded  # mod is not less
    mine[-1] = Compare("leader", "mod", 0, "greater")
    assert (await etcd.txn(mine, [Delete("leader"), Delete("l", prefix=True)])).succeeded
    assert await etcd.get_prefix("l") == ([], second.revision + 1)


def test_a_compare_needs_the_value_type_of_its_target():
    with pytest.raises(ValueError, match="needs bytes"):
        Compare("k", "value", 1)
    with pytest.raises(ValueError, match="needs an int"):
        Compare("k", "create", b"0")
    with pytest.raises(ValueError, match="needs an int"):
        Compare("k", "version", True)


async def test_a_leased_key_disappears_when_the_lease_is_revoked(etcd: Etcd):
    lease = await etcd.grant(30)
    await etcd.put("owned", b"x", lease=lease)
    await etcd.txn([], [Put("owned2", b"y", lease=lease)])
    kv = await etcd.get("owned")
    assert kv is not None and kv.lease == lease
    assert 0 < await etcd.keepalive(lease) <= 30

    await etcd.revoke(lease)
    assert await etcd.get_prefix("owned") == ([], kv.mod_revision + 2)
    await etcd.revoke(lease)  # gone already: not an error
    with pytest.raises(LeaseLost, match=f"lease {lease}"):
        await etcd.keepalive(lease)
    with pytest.raises(LeaseLost, match="lease not found"):
        await etcd.put("again", b"x", lease=lease)


async def test_a_leased_key_disappears_when_the_ttl_runs_out(etcd: Etcd):
    lease = await etcd.grant(0.2)  # rounded up to 1 s, etcd's minimum with this harness
    await etcd.put("ttl", b"x", lease=lease)
    for _ in range(3):  # kept alive past its TTL
        assert await etcd.keepalive(lease) >= 1
        await asyncio.sleep(0.5)
    assert await etcd.get("ttl") is not None

    async def gone() -> bool:
        return await etcd.get("ttl") is None

    await wait_for(gone, 10, "the leased key to expire")
    with pytest.raises(LeaseLost):
        await etcd.keepalive(lease)


# --- watch ---------------------------------------------------------------------------------


async def test_watch_sees_puts_and_deletes_in_order_and_resumes_without_repeats(etcd: Etcd):
    r1 = await etcd.put("w/a", b"1")
    r2 = await etcd.put("w/b", b"2")
    await etcd.put("x/other", b"not watched")
    r3 = await etcd.delete("w/a")
    events = await collect(etcd.watch("w/", r1), 3)
    assert summary(events) == [("put", "w/a", b"1", r1), ("put", "w/b", b"2", r2),
                               ("delete", "w/a", b"", r3)]
    assert events[0].kv == KeyValue("w/a", b"1", r1, r1, 1, 0)

    # Resumed from the last revision seen + 1: only what came after, live.
    stream = etcd.watch("w/", events[-1].kv.mod_revision + 1)
    async with aclosing(stream):
        first = asyncio.ensure_future(anext(stream))
        r5 = await etcd.put("w/c", b"3")
        r6 = await etcd.put("w/c", b"4")
        seen = list(await asyncio.wait_for(first, 5))
        while len(seen) < 2:
            seen += await asyncio.wait_for(anext(stream), 5)
    assert summary(seen) == [("put", "w/c", b"3", r5), ("put", "w/c", b"4", r6)]


async def test_a_broken_watch_raises_and_resumes_after_etcd_restarts(
        etcd_server: EtcdServer, etcd: Etcd):
    r1 = await etcd.put("w/a", b"1")
    seen: list[WatchEvent] = []
    with pytest.raises(EtcdError, match="stream") as info:
        async with aclosing(etcd.watch("w/", r1)) as stream:
            async for batch in stream:
                seen += batch
                etcd_server.stop()
    assert not isinstance(info.value, Compacted)
    assert summary(seen) == [("put", "w/a", b"1", r1)]

    await etcd_server.restart()
    r2 = await etcd.put("w/b", b"2")
    resumed = await collect(etcd.watch("w/", seen[-1].kv.mod_revision + 1), 1)
    assert summary(resumed) == [("put", "w/b", b"2", r2)]


async def test_a_compacted_start_revision_raises_compacted(etcd_server: EtcdServer,
                                                           etcd: Etcd):
    r1 = await etcd.put("c/a", b"1")
    await etcd.put("c/a", b"2")
    r3 = await etcd.put("c/a", b"3")
    await etcd_server.post("/v3/kv/compaction", {"revision": str(r3), "physical": True})
    with pytest.raises(Compacted, match=f"start revision {r1} is compacted") as info:
        await collect(etcd.watch("c/", r1), 1)
    assert info.value.compact_revision == r3
    assert summary(await collect(etcd.watch("c/", r3), 1)) == [("put", "c/a", b"3", r3)]


# --- etcd away, endpoints ------------------------------------------------------------------


def every_call(lease: int, revision: int) -> dict[str, Call]:
    async def first_batch(c: Etcd) -> object:
        return await collect(c.watch("k", revision), 1)

    return {
        "grant": lambda c: c.grant(5),
        "keepalive": lambda c: c.keepalive(lease),
        "get": lambda c: c.get("k"),
        "get_prefix": lambda c: c.get_prefix("k"),
        "put": lambda c: c.put("k", b"again"),
        "delete": lambda c: c.delete("other"),
        "txn": lambda c: c.txn([Compare("k", "create", 0)], [Put("k", b"")]),
        "watch": first_batch,
        "revoke": lambda c: c.revoke(lease),
    }


@pytest.mark.parametrize("outage", ["stopped", "killed", "paused"])
async def test_every_call_fails_within_its_timeout_while_etcd_is_away_then_works(
        etcd_server: EtcdServer, etcd: Etcd, outage: str):
    lease = await etcd.grant(60)
    revision = await etcd.put("k", b"v")
    {"stopped": etcd_server.stop, "killed": etcd_server.kill,
     "paused": etcd_server.pause}[outage]()

    for name, call in every_call(lease, revision).items():
        started = time.monotonic()
        with pytest.raises(EtcdError) as info:
            await call(etcd)
        took = time.monotonic() - started
        assert took < TIMEOUT + SLACK, f"{name} took {took:.2f}s"
        assert type(info.value) is EtcdError, f"{name}: {info.value!r}"
        assert etcd_server.endpoint in str(info.value), name
        expected = "no answer within" if outage == "paused" else "connection failed"
        assert expected in str(info.value), name

    if outage == "paused":
        etcd_server.resume()
        # The calls that timed out were sent: etcd may still apply them once resumed, the
        # revoke among them (it did in about half of the runs), so the old lease may be gone.
        lease = await etcd.grant(60)
    else:
        await etcd_server.restart()  # the lease survives: etcd restores it
    for call in every_call(lease, revision).values():
        await call(etcd)
    assert await etcd.get("k") is not None


def closed_socket(path: Path) -> str:
    """A unix socket file nobody listens on (bound, then closed): connections are refused."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    return f"unix://{path}"


async def test_a_dead_first_endpoint_is_skipped_and_the_working_one_kept(
        etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture):
    dead = closed_socket(etcd_server.dir / "dead.sock")
    caplog.set_level(logging.DEBUG, logger="exporter.cluster.etcd")
    async with Etcd([dead, etcd_server.endpoint], timeout=TIMEOUT) as etcd:
        for i in range(3):
            await etcd.put("k", b"%d" % i)
            assert (kv := await etcd.get("k")) is not None and kv.value == b"%d" % i
        assert await collect(etcd.watch("k", 1), 1)
    switches = [r.getMessage() for r in caplog.records if "switching" in r.getMessage()]
    assert len(switches) == 1, switches
    assert etcd_server.endpoint in switches[0] and dead in switches[0]

    async with Etcd([dead, f"unix://{etcd_server.dir}/missing.sock"], timeout=TIMEOUT) as etcd:
        with pytest.raises(EtcdError, match=r"dead\.sock: .*; .*missing\.sock: "):
            await etcd.get("k")


@pytest.mark.parametrize("spec", ["unix://relative.sock", "ftp://host:1", "http://", "h:1",
                                  "http://host:1/v3"])
def test_a_bad_endpoint_is_refused_at_once(spec: str):
    with pytest.raises(ValueError, match="etcd endpoint"):
        Etcd([spec])


# --- answers a real etcd never gives -------------------------------------------------------


HEADER = {"header": {"revision": "5"}}


async def watch_one(c: Etcd) -> object:
    return await collect(c.watch("p/", 1), 1)


MALFORMED: list[tuple[str, Call, int, bytes, str]] = [
    ("not JSON", lambda c: c.get("k"), 200, b"<html>oops</html>", "not JSON"),
    ("NaN", lambda c: c.put("k", b""), 200, b'{"header": {"revision": NaN}}', "not JSON"),
    ("array", lambda c: c.get("k"), 200, b"[]", "the answer is not an object"),
    ("no header", lambda c: c.put("k", b""), 200, b"{}", "header is not an object"),
    ("no revision", lambda c: c.delete("k"), 200, b'{"header": {}}', "header.revision is missing"),
    ("bad revision", lambda c: c.put("k", b""), 200, b'{"header": {"revision": "2x"}}',
     "header.revision is not an integer"),
    ("kvs not a list", lambda c: c.get("k"), 200, b'{"header": {"revision": "5"}, "kvs": {}}',
     "kvs is not a list"),
    ("key not a string", lambda c: c.get("k"), 200,
     b'{"header": {"revision": "5"}, "kvs": [{"key": 5}]}', "kvs[0].key is not a base64"),
    ("key not base64", lambda c: c.get("k"), 200,
     b'{"header": {"revision": "5"}, "kvs": [{"key": "!!"}]}', "kvs[0].key is not base64"),
    ("another key", lambda c: c.get("k"), 200,
     b'{"header": {"revision": "5"}, "kvs": [{"key": "eA=="}]}', "asked for one key"),
    ("version", lambda c: c.get_prefix("x"), 200,
     b'{"header": {"revision": "5"}, "kvs": [{"key": "eA==", "version": true}]}',
     "kvs[0].version is not an integer"),
    ("outside the prefix", lambda c: c.get_prefix("p/"), 200,
     b'{"header": {"revision": "5"}, "kvs": [{"key": "eA=="}]}', "not under 'p/'"),
    ("succeeded", lambda c: c.txn([], []), 200,
     b'{"header": {"revision": "5"}, "succeeded": "yes"}', "succeeded is not a boolean"),
    ("lease ID", lambda c: c.grant(3), 200, b'{"header": {"revision": "5"}, "ID": "x"}',
     "ID is not an integer"),
    ("keepalive garbage", lambda c: c.keepalive(7), 200, b"garbage\n", "not JSON"),
    ("keepalive TTL", lambda c: c.keepalive(7), 200, b'{"result": {"ID": "7", "TTL": []}}\n',
     "result.TTL is not an integer"),
    ("keepalive no result", lambda c: c.keepalive(7), 200, b'{"x": 1}\n',
     "result is not an object"),
    ("watch event type", watch_one, 200,
     b'{"result": {"created": true}}\n'
     b'{"result": {"events": [{"type": "BOGUS", "kv": {"key": "cC94"}}]}}\n',
     "events[0].type"),
    ("watch kv", watch_one, 200, b'{"result": {"events": [{"kv": "cC94"}]}}\n',
     "events[0].kv is not an object"),
    ("watch error line", watch_one, 200,
     b'{"error": {"grpc_code": 13, "message": "boom", "http_status": "x"}}\n',
     "boom (gRPC code 13)"),
    ("HTML error page", lambda c: c.get("k"), 502, b"<html>bad gateway</html>",
     "HTTP 502"),
    ("error answer", lambda c: c.put("k", b""), 400,
     b'{"error": "bad key", "message": "etcdserver: key is not provided", "code": 3}',
     "key is not provided (gRPC code 3)"),
]


@pytest.mark.parametrize(("call", "status", "body", "says"),
                         [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
async def test_a_malformed_answer_is_an_etcd_error(call: Call, status: int, body: bytes,
                                                   says: str):
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/{path:.*}", answer)
    async with serve_app(app) as url, Etcd([url], timeout=TIMEOUT) as etcd:
        with pytest.raises(EtcdError) as info:
            await call(etcd)
    assert says in str(info.value)
    assert url in str(info.value)


async def stream(request: web.Request) -> web.StreamResponse:
    """A 2,000-byte answer with no Content-Length (chunked), a newline at its end."""
    resp = web.StreamResponse()
    await resp.prepare(request)
    for _ in range(20):
        await resp.write(b"x" * 100)
    await resp.write(b"\n")
    return resp


async def sized(request: web.Request) -> web.Response:
    return web.Response(body=b'{"header": {"revision": "5"}, "pad": "' + b"x" * 2000 + b'"}')


@pytest.mark.parametrize(("path", "call", "says"), [
    ("/v3/kv/range", lambda c: c.get("k"), "answer of 2040 bytes, over the 1000 bytes cap"),
    ("/v3/kv/put", lambda c: c.put("k", b""), "answer over the 1000 bytes cap"),
    ("/v3/lease/keepalive", lambda c: c.keepalive(1), "streamed message over 1000 bytes"),
    ("/v3/watch", watch_one, "streamed message over 1000 bytes"),
])
async def test_an_answer_over_the_cap_is_an_etcd_error(path: str, call: Call, says: str):
    app = web.Application()
    app.router.add_post(path, sized if path == "/v3/kv/range" else stream)
    async with serve_app(app) as url, Etcd([url], timeout=TIMEOUT, max_answer_bytes=1000) as etcd:
        with pytest.raises(EtcdError, match=says):
            await call(etcd)
