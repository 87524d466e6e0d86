"""End to end: a real `ha-exporter run` in front of hostile masters keeps serving /metrics.

The exporter starts with one good master; its RSS after a few rounds is the baseline. Hostile
masters (a queue of 1e200, an endless /health body, a 250 kB gzip bomb inflating to 256 MiB)
are then added one at a time by SIGHUP reloads. Throughout, /metrics is scraped: every scrape
must answer 200, parse, and the last one must pass ``promtool check metrics``; the good master
must stay healthy, each hostile one must be ``invalid_response``, and the RSS must stay within
twice the baseline.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.probing.hostile import gzip_bomb, hostile_app
from tests.processes import Processes
from tests.support import get_json, master_entry, serve_app, wait_for, wait_ready, write_config
from tests.tools import require_binary

#: Hostile case -> the start of the detail its probes must report.
HOSTILE = {
    "big-float": "queue_length out of range: 1e+200",
    "endless": "body too large (limit 65536 bytes)",
    "bomb": "compressed body refused",
}
#: Probes of a master that make a round of evidence (FAST_PROBE: one every 500 ms).
ROUNDS = 6
PHASE_TIMEOUT = 30.0
MAX_SCRAPES = 2000
GOOD_HEALTHY = 'ha_master_state{master="good",state="healthy"} 1'


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: resident now, and the peak so far (a transient
    inflation freed since shows in the peak only)."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M))
    assert len(found) == 2, status
    return int(found["VmRSS"]), int(found["VmHWM"])


@dataclass
class Scraper:
    """Scrapes /metrics in the background, a bounded number of times, counting statuses."""

    http: aiohttp.ClientSession
    base: str
    statuses: Counter[int] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    last: str = ""

    async def run(self, stop: asyncio.Event) -> None:
        for _ in range(MAX_SCRAPES):
            if stop.is_set():
                return
            async with self.http.get(f"{self.base}/metrics") as resp:
                self.statuses[resp.status] += 1
                text = await resp.text()
            if resp.status != 200:
                self.problems.append(f"HTTP {resp.status}: {text[:200]}")
                continue
            try:
                list(text_string_to_metric_families(text))
            except ValueError as exc:
                self.problems.append(f"unparseable scrape: {exc}")
            if GOOD_HEALTHY not in text:
                self.problems.append("the good master is not healthy in a scrape")
            self.last = text
            try:
                await asyncio.wait_for(stop.wait(), 0.1)  # the pace of the scrapes, not a sleep
            except TimeoutError:
                pass


async def probes(http: aiohttp.ClientSession, base: str, name: str) -> dict[str, Any]:
    return await get_json(http, f"{base}/api/v1/masters/{name}")


async def test_hostile_masters_cannot_break_the_exporter(tmp_path, processes: Processes, http):
    promtool = require_binary("promtool")
    gzip_bomb()  # built before anything is measured
    seen: Counter[str] = Counter()
    async with serve_app(hostile_app(seen, [])) as url:
        masters = [master_entry("good", f"{url}/good")]
        sections = {"failover": {"enabled": False}}  # probing is under test, not failover
        config = write_config(tmp_path, masters, **sections)
        exporter = await processes.exporter(config)
        base = await exporter.listening()
        pid = exporter.popen.pid
        await wait_ready(http, base)

        scraper = Scraper(http, base)
        stop = asyncio.Event()
        scraping = asyncio.create_task(scraper.run(stop))
        figures: dict[str, tuple[int, int]] = {}
        try:

            async def good_probed() -> bool:
                return (await probes(http, base, "good"))["probes"]["success"] >= ROUNDS

            await wait_for(good_probed, PHASE_TIMEOUT, "rounds of the good master")
            figures["baseline"] = memory_kib(pid)

            for case, detail in HOSTILE.items():
                masters.append(master_entry(case, f"{url}/{case}", priority=2))
                write_config(tmp_path, masters, **sections)
                exporter.kill(signal.SIGHUP)

                async def hostile_probed(case: str = case) -> bool:
                    got = (await probes(http, base, case))["probes"]
                    return got.get("invalid_response", 0) >= ROUNDS

                await wait_for(hostile_probed, PHASE_TIMEOUT, f"rounds of {case}")
                figures[case] = memory_kib(pid)
                state = await probes(http, base, case)
                assert state["probes"]["success"] == 0, state
                assert state["state"] == "failed", state
                assert state["last_error"].startswith(detail), state
                assert scraping.done() is False, "the scraper stopped early"
        finally:
            stop.set()
            await asyncio.wait_for(scraping, 30)

        good = await probes(http, base, "good")
        assert good["state"] == "healthy" and good["up"], good
        async with http.get(f"{base}/api/v1/balancing") as resp:  # its quality overflowed
            assert resp.status == 200, await resp.text()

    report = ", ".join(f"{k} {r / 1024:.1f}/{p / 1024:.1f}" for k, (r, p) in figures.items())
    print(f"\nexporter RSS/peak MiB: {report}; scrapes by status: {dict(scraper.statuses)}")
    assert scraper.problems == [], scraper.problems[:5]
    assert set(scraper.statuses) == {200} and scraper.statuses[200] >= 10, scraper.statuses
    rss, peak = figures["baseline"]
    for case in HOSTILE:
        assert figures[case][0] <= 2 * rss, (case, figures)
        assert figures[case][1] <= 2 * peak, (case, figures)

    res = subprocess.run(
        [promtool, "check", "metrics"],
        input=scraper.last,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "" and res.stderr.strip() == ""
    for case in HOSTILE:
        assert f'ha_master_probes_total{{master="{case}",result="invalid_response"}}' in (
            scraper.last
        )
    assert "Traceback" not in exporter.output(), exporter.tail()
