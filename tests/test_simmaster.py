"""The simulated master speaks the whole master protocol, and misbehaves on request."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from exporter.simmaster import SimulatedMaster, create_app, snapshot_checksum
from tests.support import free_port, serve_app, wait_for


@pytest.fixture
async def pair():
    a = SimulatedMaster("master-a", "uae", "active", drain_rate=20)
    b = SimulatedMaster("master-b", "uae", "standby")
    async with (
        serve_app(create_app(a)) as ua,
        serve_app(create_app(b)) as ub,
        aiohttp.ClientSession() as http,
    ):
        yield a, b, ua, ub, http


async def test_health_payload_and_queue_drains(pair):
    _a, _, ua, _, http = pair
    async with http.get(f"{ua}/health") as r:
        h = await r.json()
    assert h["status"] == "ok" and h["name"] == "master-a" and h["active"] is True
    assert {"queue_length", "active_messages", "cpu_percent", "memory_percent"} <= set(h)
    for i in range(40):
        async with http.post(f"{ua}/messages", json={"id": f"m{i}", "chat": "c1"}) as r:
            assert r.status == 202
    async with http.get(f"{ua}/health") as r:
        assert (await r.json())["queue_length"] >= 20

    async def drained() -> bool:
        async with http.get(f"{ua}/health") as r:
            return (await r.json())["queue_length"] == 0

    await wait_for(drained, 5, "the queue to drain")


async def test_messages_are_idempotent_and_need_an_active_master(pair):
    _, _, ua, ub, http = pair
    async with http.post(f"{ua}/messages", json={"id": "x1"}) as r:
        assert r.status == 202 and (await r.json())["duplicate"] is False
    async with http.post(f"{ua}/messages", json={"id": "x1"}) as r:
        assert r.status == 200 and (await r.json())["duplicate"] is True
    async with http.get(f"{ua}/messages") as r:
        assert (await r.json()) == {"ids": ["x1"], "count": 1}
    async with http.post(f"{ub}/messages", json={"id": "x2"}) as r:
        assert r.status == 503  # a standby takes nothing until activated
    async with http.post(f"{ua}/messages", json={"text": "no id"}) as r:
        assert r.status == 400


async def test_state_transfer_with_checksum(pair):
    _a, b, ua, ub, http = pair
    async with http.post(f"{ua}/messages", json={"id": "p1", "chat": "+97150000001"}):
        pass
    async with http.get(f"{ua}/state") as r:
        snap = await r.json()
    assert snap["checksum"] == snapshot_checksum(snap)
    async with http.post(f"{ub}/state", json=snap) as r:
        stored = await r.json()
        assert r.status == 200 and stored["master"] == "master-a"
    async with http.post(f"{ub}/state", json=snap) as r:  # idempotent
        assert (await r.json())["checksum"] == stored["checksum"]
    async with http.get(f"{ub}/state") as r:
        b_state = await r.json()
    imported = b_state["imported"]["master-a"]
    assert imported["sessions"] == snap["sessions"]
    assert [m["id"] for m in imported["pending_messages"]] == ["p1"]
    assert imported["checksum"] == stored["checksum"] == snap["checksum"]
    tampered = dict(snap, sessions={})
    async with http.post(f"{ub}/state", json=tampered) as r:
        assert r.status == 400 and "checksum" in (await r.json())["error"]
    async with http.delete(f"{ub}/state/master-a") as r:
        assert (await r.json()) == {"removed": True}
    assert b.imported == {}


async def test_activate_deactivate_and_fencing(pair):
    _a, _b, ua, ub, http = pair
    async with http.post(f"{ub}/activate", json={"taken_over": "master-a"}) as r:
        assert await r.json() == {"active": True, "duties": ["master-a"]}
    async with http.post(f"{ub}/messages", json={"id": "y"}) as r:
        assert r.status == 202
    async with http.post(f"{ub}/deactivate", json={"taken_over": "master-a"}) as r:
        assert await r.json() == {"active": False, "duties": []}  # nothing left: standby
    async with http.post(f"{ua}/deactivate") as r:
        assert (await r.json())["active"] is False
    async with http.post(f"{ua}/messages", json={"id": "z"}) as r:
        assert r.status == 503 and (await r.json())["error"] == "inactive"


@pytest.mark.parametrize("mode", ["down", "error", "garbage", "hang", "slow"])
async def test_chaos_modes(pair, mode):
    _, _, ua, _, http = pair
    async with http.post(f"{ua}/chaos", json={"mode": mode, "delay_seconds": 0.3}) as r:
        assert r.status == 200
    t0 = time.monotonic()
    try:
        async with http.get(f"{ua}/health", timeout=aiohttp.ClientTimeout(total=0.6)) as r:
            status, text = r.status, await r.text()
    except TimeoutError:
        status, text = None, ""
    took = time.monotonic() - t0
    expected = {
        "down": lambda: status == 200 and '"down"' in text,
        "error": lambda: status == 500,
        "garbage": lambda: status == 200 and not text.startswith("{"),
        "hang": lambda: status is None and took >= 0.6,
        "slow": lambda: status == 200 and took >= 0.3,
    }
    assert expected[mode](), (mode, status, text[:80], took)
    async with http.post(f"{ua}/chaos", json={"mode": "sideways"}) as r:
        assert r.status == 400


async def test_too_large_body_is_413(pair):
    _, _, ua, _, http = pair
    async with http.post(
        f"{ua}/messages", data=b"x" * (2 << 20), headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 413 and "error" in await r.json()


async def test_master_process_stops_cleanly_on_sigterm():
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter.cli",
            "master",
            "--name",
            "m1",
            "--port",
            str(port),
            "--region",
            "uae",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as http:

            async def up() -> bool:
                async with http.get(f"http://127.0.0.1:{port}/health") as r:
                    return r.status == 200

            await wait_for(up, 10, "the master process to answer")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
