"""The simulated master speaks the whole master protocol, and misbehaves on request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.sim import SimulatedMaster, create_app, serve_master, snapshot_checksum
from exporter.sim.state import MAX_BODY
from tests.processes import Processes
from tests.support import serve_app, wait_for

SHORT = aiohttp.ClientTimeout(total=0.5)


@pytest.fixture
async def pair():
    a = SimulatedMaster("master-a", "uae", "active", drain_rate=40)
    b = SimulatedMaster("master-b", "uae", "standby")
    async with (
        serve_app(create_app(a)) as ua,
        serve_app(create_app(b)) as ub,
        aiohttp.ClientSession() as http,
    ):
        yield a, b, ua, ub, http


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: object = None
) -> tuple[int, Any]:
    """One request; the status and the JSON answer (every answer here is JSON)."""
    async with http.request(method, url, json=body) as r:
        return r.status, await r.json()


async def health(http: aiohttp.ClientSession, base: str) -> dict:
    return (await call(http, "GET", f"{base}/health"))[1]


# --- the model, without a server ------------------------------------------------------------


def test_seeded_sessions_are_deterministic_and_named_after_the_master():
    one, again = SimulatedMaster("m1", "uae", seed=7), SimulatedMaster("m1", "uae", seed=7)
    assert one.sessions == again.sessions and 3 <= len(one.sessions) <= 5
    assert all(sid.startswith("m1-") for sid in one.sessions)
    assert all(s["phone"].startswith("+9715") for s in one.sessions.values())
    assert SimulatedMaster("m2", "uae", seed=7).sessions != one.sessions
    assert SimulatedMaster("m1", "uae", seed=8).sessions != one.sessions
    assert SimulatedMaster("s", role="standby").active is False
    with pytest.raises(ValueError, match="role"):
        SimulatedMaster("x", role="primary")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 300),
            st.integers(0, 5000),
            st.floats(0.01, 2.0),
            st.sampled_from(["ok", "slow", "down"]),
        ),
        max_size=25,
    )
)
def test_figures_stay_bounded_and_the_queue_only_drains(rounds):
    m = SimulatedMaster("m", drain_rate=50, seed=1)
    for i, (n, backlog, dt, mode) in enumerate(rounds):
        for j in range(n):
            m.accept({"id": f"{i}-{j}", "chat": f"c{j % 7}"})
        m.set_chaos(mode, queue_length=backlog)
        before = len(m.pending)
        done = m.step(dt)
        assert len(m.pending) == before - done
        assert done == 0 if mode == "down" else done <= int(50 * dt) + 1
        h = m.health()
        assert 0 <= h["cpu_percent"] <= 100 and 0 <= h["memory_percent"] <= 100
        assert h["queue_length"] == len(m.pending) + backlog >= h["active_messages"] >= 0
        assert h["status"] == (
            "down"
            if mode == "down"
            else "degraded"
            if mode == "slow" or h["queue_length"] > 1000
            else "ok"
        )


def test_cpu_follows_the_load():
    m = SimulatedMaster("m", drain_rate=0, seed=3)
    for _ in range(30):
        m.step(0.1)
    idle = m.cpu
    m.set_chaos("ok", queue_length=5000)
    for _ in range(30):
        m.step(0.1)
    assert idle < 20 < 70 < m.cpu


# --- over HTTP -----------------------------------------------------------------------------


async def test_health_payload(pair):
    _, _, ua, ub, http = pair
    h = await health(http, ua)
    assert h["status"] == "ok" and h["queue_length"] == 0 and h["active_messages"] == 0
    assert (h["name"], h["region"], h["active"]) == ("master-a", "uae", True)
    assert all(isinstance(h[k], float) for k in ("cpu_percent", "memory_percent"))
    assert (await health(http, ub))["active"] is False


async def test_queue_grows_with_messages_and_drains(pair):
    a, _, ua, _, http = pair
    a.drain_rate = 0  # hold the queue still while it fills, however slow this machine is
    for i in range(60):
        status, _ = await call(http, "POST", f"{ua}/messages", {"id": f"m{i}", "chat": "c1"})
        assert status == 202
    assert (await health(http, ua))["queue_length"] == 60
    assert a.sessions["c1"]["messages"] == 60
    a.drain_rate = 40
    await wait_for(lambda: _queue_below(http, ua, 60), 2, "the drain to start", poll=0.02)

    async def drained() -> bool:
        return (await health(http, ua))["queue_length"] == 0

    await wait_for(drained, 6, "the queue to drain at 40 messages/s")


async def _queue_below(http: aiohttp.ClientSession, base: str, n: int) -> bool:
    h = await health(http, base)
    return 0 < h["queue_length"] < n and h["active_messages"] > 0


async def test_injected_backlog_degrades_until_cleared(pair):
    _, _, ua, _, http = pair
    idle = (await health(http, ua))["cpu_percent"]
    assert await call(http, "POST", f"{ua}/chaos", {"queue_length": 1500}) == (
        200,
        {"mode": "ok", "delay_seconds": 1.0, "queue_length": 1500},
    )

    async def ticked() -> bool:  # cpu climbs with the backlog's load, a little each tick
        return (await health(http, ua))["cpu_percent"] > idle + 15

    # several drain ticks: an injected backlog is not processed
    await wait_for(ticked, 5, "several simulation ticks under the backlog")
    h = await health(http, ua)
    assert (h["status"], h["queue_length"]) == ("degraded", 1500)
    await call(http, "POST", f"{ua}/chaos", {"mode": "ok", "queue_length": 0})
    assert (await health(http, ua))["status"] == "ok"


async def test_messages_are_idempotent_by_id(pair):
    _, _, ua, _, http = pair
    assert await call(http, "POST", f"{ua}/messages", {"id": "x1", "text": "hi"}) == (
        202,
        {"accepted": True, "duplicate": False, "seq": 1},
    )
    assert await call(http, "POST", f"{ua}/messages", {"id": "x1", "text": "hi"}) == (
        200,
        {"accepted": True, "duplicate": True, "seq": 1},
    )
    await call(http, "POST", f"{ua}/messages", {"id": "x2"})
    assert await call(http, "GET", f"{ua}/messages") == (200, {"ids": ["x1", "x2"], "count": 2})
    for bad in ({"text": "no id"}, {"id": ""}, {"id": ["x"]}, [1]):
        status, body = await call(http, "POST", f"{ua}/messages", bad)
        assert status == 400 and "error" in body, bad
    async with http.post(f"{ua}/messages", data=b"{nope") as r:
        assert r.status == 400 and (await r.json())["error"] == "body is not JSON"


async def test_state_transfer_round_trip(pair):
    a, b, ua, ub, http = pair
    a.drain_rate = 0  # keep the message pending
    await call(http, "POST", f"{ua}/messages", {"id": "p1", "chat": "+97150000001"})
    _, snap = await call(http, "GET", f"{ua}/state")
    assert snap["checksum"] == snapshot_checksum(snap)
    assert snap["master"] == "master-a" and "+97150000001" in snap["sessions"]
    assert set(snap) == {
        "master",
        "region",
        "sessions",
        "pending_messages",
        "config",
        "imported",
        "watermark",
        "checksum",
    }
    assert snap["watermark"] == 1

    status, stored = await call(http, "POST", f"{ub}/state", snap)
    assert (status, stored) == (200, {"checksum": snap["checksum"], "master": "master-a"})
    assert await call(http, "POST", f"{ub}/state", snap) == (200, stored)  # idempotent
    _, b_state = await call(http, "GET", f"{ub}/state")
    assert b_state["checksum"] == snapshot_checksum(b_state)
    assert list(b_state["imported"]) == ["master-a"]
    imported = b_state["imported"]["master-a"]
    assert imported["sessions"] == snap["sessions"]
    assert [m["id"] for m in imported["pending_messages"]] == ["p1"]
    assert imported["checksum"] == snapshot_checksum(imported) == stored["checksum"]
    assert b.sessions != a.sessions  # imported, not merged into its own

    assert await call(http, "DELETE", f"{ub}/state/master-a") == (200, {"removed": True})
    assert await call(http, "DELETE", f"{ub}/state/master-a") == (200, {"removed": False})
    assert b.imported == {}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"sessions": {}}, "checksum does not match"),
        ({"checksum": "0" * 64}, "checksum does not match"),
        ({"checksum": None}, "'checksum' has the wrong type"),
        ({"master": ""}, "'master' is empty"),
        ({"pending_messages": {}}, "'pending_messages' has the wrong type"),
    ],
)
async def test_a_bad_snapshot_is_refused(pair, change, reason):
    _, b, ua, ub, http = pair
    _, snap = await call(http, "GET", f"{ua}/state")
    status, body = await call(http, "POST", f"{ub}/state", {**snap, **change})
    assert status == 400 and reason in body["error"]
    missing = {k: v for k, v in snap.items() if k != "sessions"}
    status, body = await call(http, "POST", f"{ub}/state", missing)
    assert status == 400 and "lacks 'sessions'" in body["error"]
    assert b.imported == {}


async def test_a_snapshot_above_the_message_limit_still_imports(pair):
    a, b, ua, ub, http = pair
    a.sessions.update({f"big{i}": {"phone": "+1", "note": "x" * 1000} for i in range(1500)})
    async with http.get(f"{ua}/state") as r:
        raw = await r.read()
    assert len(raw) > MAX_BODY
    async with http.post(f"{ub}/state", data=raw) as r:
        assert r.status == 200 and (await r.json())["master"] == "master-a"
    assert len(b.imported["master-a"]["sessions"]) == len(a.sessions)


async def test_activate_deactivate_and_fencing(pair):
    _, _, ua, ub, http = pair
    status, body = await call(http, "POST", f"{ub}/messages", {"id": "y0"})
    assert (status, body) == (503, {"error": "inactive"})  # a standby takes nothing
    for _ in range(2):  # idempotent
        assert await call(http, "POST", f"{ub}/activate", {"taken_over": "master-a"}) == (
            200,
            {"active": True, "duties": ["master-a"]},
        )
    assert (await call(http, "POST", f"{ub}/messages", {"id": "y1"}))[0] == 202
    assert (await health(http, ub))["active"] is True
    # releasing its only duty sends it back to standby
    assert await call(http, "POST", f"{ub}/deactivate", {"taken_over": "master-a"}) == (
        200,
        {"active": False, "duties": []},
    )

    assert await call(http, "POST", f"{ua}/activate", {"taken_over": "master-c"}) == (
        200,
        {"active": True, "duties": ["master-a", "master-c"]},
    )
    assert await call(http, "POST", f"{ua}/deactivate", {"taken_over": "master-c"}) == (
        200,
        {"active": True, "duties": ["master-a"]},
    )
    for _ in range(2):  # fencing, idempotent
        async with http.post(f"{ua}/deactivate") as r:  # no body at all
            assert (r.status, await r.json()) == (200, {"active": False, "duties": []})
    assert await call(http, "POST", f"{ua}/messages", {"id": "z"}) == (503, {"error": "inactive"})
    assert (await health(http, ua))["active"] is False
    assert await call(http, "POST", f"{ua}/activate") == (
        200,
        {"active": True, "duties": ["master-a"]},
    )
    assert (await call(http, "POST", f"{ua}/activate", {"taken_over": 5}))[0] == 400


async def test_chaos_error_garbage_down_and_heal(pair):
    _, _, ua, _, http = pair
    await call(http, "POST", f"{ua}/messages", {"id": "kept"})
    await call(http, "POST", f"{ua}/chaos", {"mode": "error"})
    for method, path in (("GET", "/health"), ("GET", "/state"), ("POST", "/activate")):
        status, body = await call(http, method, f"{ua}{path}")
        assert status == 500 and "error" in body, path

    await call(http, "POST", f"{ua}/chaos", {"mode": "garbage"})
    async with http.get(f"{ua}/health") as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ContentTypeError):
            await r.json()
        with pytest.raises(ValueError):
            json.loads(await r.text())

    await call(http, "POST", f"{ua}/chaos", {"mode": "down"})
    assert (await health(http, ua))["status"] == "down"
    for method, path in (("GET", "/state"), ("POST", "/messages"), ("POST", "/deactivate")):
        status, body = await call(http, method, f"{ua}{path}", {"id": "lost"})
        assert (status, body) == (503, {"error": "master is down"}), path
    # /chaos and GET /messages are exempt: a test can still count and heal
    assert await call(http, "GET", f"{ua}/messages") == (200, {"ids": ["kept"], "count": 1})
    assert (await call(http, "POST", f"{ua}/chaos", {"mode": "ok"}))[1]["mode"] == "ok"
    assert (await health(http, ua))["status"] == "ok"


async def test_chaos_hang_holds_requests_until_healed(pair):
    _, _, ua, _, http = pair
    await call(http, "POST", f"{ua}/chaos", {"mode": "hang"})
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        async with http.get(f"{ua}/health", timeout=SHORT) as r:
            await r.read()
    assert time.monotonic() - t0 >= 0.5
    assert (await call(http, "GET", f"{ua}/messages"))[0] == 200  # exempt, answers at once
    held = asyncio.create_task(health(http, ua))
    done, _ = await asyncio.wait({held}, timeout=0.2)
    assert not done  # still held 0.2 s later
    await call(http, "POST", f"{ua}/chaos", {"mode": "ok"})
    assert (await asyncio.wait_for(held, 2))["status"] == "ok"


async def test_chaos_slow_delays_and_degrades(pair):
    _, _, ua, _, http = pair
    await call(http, "POST", f"{ua}/chaos", {"mode": "slow", "delay_seconds": 0.3})
    t0 = time.monotonic()
    h = await health(http, ua)
    assert time.monotonic() - t0 >= 0.3 and h["status"] == "degraded"


@pytest.mark.parametrize(
    "body",
    [
        {"mode": "sideways"},
        {"mode": "slow", "delay_seconds": -1},
        {"mode": "slow", "delay_seconds": "1s"},
        {"queue_length": -5},
        {"queue_length": 1.5},
    ],
)
async def test_bad_chaos_is_refused_and_changes_nothing(pair, body):
    a, _, ua, _, http = pair
    status, answer = await call(http, "POST", f"{ua}/chaos", body)
    assert status == 400 and "error" in answer
    assert (a.mode, a.backlog) == ("ok", 0)


async def _chunks(total: int) -> AsyncIterator[bytes]:
    for _ in range(total // 65536):
        yield b" " * 65536


@pytest.mark.parametrize("chunked", [False, True])
async def test_too_large_body_is_413(pair, chunked):
    _, _, ua, _, http = pair
    size = MAX_BODY + (1 << 20)
    data = _chunks(size) if chunked else b" " * size
    async with http.post(f"{ua}/messages", data=data) as r:
        assert r.status == 413 and "larger than" in (await r.json())["error"]


async def test_unknown_paths_and_methods_answer_json(pair):
    _, _, ua, _, http = pair
    assert await call(http, "GET", f"{ua}/nope") == (404, {"error": "not found"})
    assert await call(http, "PUT", f"{ua}/health") == (405, {"error": "method not allowed"})


async def test_serve_master_stops_when_cancelled():
    urls: list[str] = []
    task = asyncio.create_task(
        serve_master("m0", 0, "usa", "standby", on_listening=urls.append)
    )
    try:
        await wait_for(lambda: urls or task.done(), 5, "m0 to listen")
        assert urls, task  # it listens (and has not ended with an error)
        (url,) = urls
        assert not url.endswith(":0"), "port 0 is resolved to the bound port"
        async with aiohttp.ClientSession() as http:
            h = await health(http, url)
        assert (h["name"], h["region"], h["active"]) == ("m0", "usa", False)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)
    assert task.done()


async def test_master_process_stops_cleanly_on_sigterm_even_while_hung(processes: Processes):
    master = await processes.master("m1")  # `ha-exporter master --port 0`, port read back
    base = master.url
    sent = asyncio.Event()

    async def headers_sent(*_: object) -> None:
        sent.set()

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(headers_sent)
    async with aiohttp.ClientSession() as http, \
            aiohttp.ClientSession(trace_configs=[trace]) as held_http:
        assert (await health(http, base))["name"] == "m1"
        await call(http, "POST", f"{base}/chaos", {"mode": "hang"})

        async def hung() -> None:
            with contextlib.suppress(aiohttp.ClientError):
                async with held_http.get(f"{base}/health") as r:
                    await r.read()

        held = asyncio.create_task(hung())  # held until the shutdown lets it go
        await wait_for(sent.is_set, 5, "the request to be on its way")
        t0 = time.monotonic()
        master.kill(signal.SIGTERM)
        code = await asyncio.to_thread(master.wait, 5)
        assert code == 0, master.output()
        assert time.monotonic() - t0 < 2
        await asyncio.wait_for(held, 2)
