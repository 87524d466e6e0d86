"""`ha-exporter demo --chaos`, the README's first command: fleet visible, chaos fails over."""

from __future__ import annotations

import asyncio
import re
import signal

import aiohttp

from tests.processes import Processes, exporter_cli
from tests.support import wait_for


async def test_demo_shows_the_fleet_and_chaos_causes_a_failover(tmp_path, processes: Processes):
    # port 0 for the exporter and every master: the demo prints the URLs they bound
    demo = processes.start(
        exporter_cli("demo", "--chaos", "--chaos-every", "3", "--duration", "90", "--interval",
                     "500ms", "--port", "0", "--master-port", "0", "--state-dir",
                     str(tmp_path)),
        "demo",
    )
    await demo.wait_output("Ctrl-C stops everything", 20, "the URLs")
    out = demo.output()
    base = re.search(r"exporter on (http://127\.0\.0\.1:\d+)", out).group(1)
    assert not base.endswith(":0")
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
        # every master on a port of its own, as printed
        urls = {m["url"] for m in masters}
        assert len(urls) == 4 and not any(u.endswith(":0") for u in urls)
        assert all(f"{m['name']}={m['url']}" in out for m in masters)
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
