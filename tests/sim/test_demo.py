"""`ha-exporter demo --chaos`, the README's first command: fleet visible, chaos fails over."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import socket

import aiohttp

from tests.processes import Proc
from tests.support import free_port, wait_for


def free_block(n: int) -> int:
    """First port of n consecutive free ports on 127.0.0.1 (bounded number of tries)."""
    for _ in range(50):
        first = random.randint(20000, 60000)
        socks = []
        try:
            for p in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports found")


async def test_demo_shows_the_fleet_and_chaos_causes_a_failover(tmp_path):
    port, first = free_port(), free_block(4)
    demo = Proc(["demo", "--chaos", "--chaos-every", "3", "--duration", "90", "--interval",
                 "500ms", "--port", str(port), "--master-port", str(first), "--state-dir",
                 str(tmp_path)], tmp_path / "demo.log")
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_for(lambda: "Ctrl-C stops everything" in demo.output(), 20, "the URLs")
        out = demo.output()
        for path in ("/metrics", "/api/v1/masters", "/api/v1/failovers"):
            assert f"{base}{path}" in out
        token = re.search(r"API token\s+(\S+)", out).group(1)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/api/v1/masters") as r:
                masters = (await r.json())["masters"]
            assert [m["name"] for m in masters] == ["master-a", "master-b", "master-c",
                                                    "master-d"]
            assert {m["region"] for m in masters} == {"uae", "usa"}
            assert sum(m["role"] == "standby" for m in masters) == 2
            async with http.get(f"{base}/metrics") as r:
                text = await r.text()
            assert all(f'ha_master_up{{master="{m["name"]}"' in text for m in masters)

            async def failover() -> dict | None:
                async with http.get(f"{base}/api/v1/failovers") as r:
                    items = (await r.json())["items"]
                return next((f for f in items if f["result"] == "success"), None)
            record = await wait_for(failover, 15, "a failover caused by chaos", poll=0.2)
            assert record["backup"] in ("master-c", "master-d")
            async with http.post(f"{base}/api/v1/failover/pause",
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200  # the printed token works
        demo.kill(signal.SIGINT)  # Ctrl-C
        assert await asyncio.to_thread(demo.wait, 15) == 0
        assert "demo stopped" in demo.output()
    finally:
        demo.stop()
