"""/metrics render time and size, and exporter memory per master.

Run: python bench/bench_scrape.py [--sizes 1000 10000]
Each fleet is probed for real (one 5 s round against a loopback target), so every family has
data; render time is the median of 15 renders of the full exposition (text and OpenMetrics).
Memory: RSS of a fresh child process before and after building and probing the fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine, rss_kib, start_target
from exporter.config import parse_config
from exporter.probing.prober import Prober, new_session
from exporter.service import Service


def config(port: int, n: int) -> dict:
    return {
        "state_path": str(Path(tempfile.mkdtemp()) / "bench.db"),
        "probe": {"interval": "5s", "timeout": "2s"},
        "masters": [
            {
                "name": f"master-{i:05d}",
                "url": f"http://127.0.0.1:{port}/m{i}",
                "region": ("uae", "usa", "eu")[i % 3],
                "priority": i,
                "role": "standby" if i % 4 == 3 else "active",
            }
            for i in range(n)
        ],
    }


async def probed_service(port: int, n: int) -> Service:
    cfg = parse_config(config(port, n))
    service = Service(cfg)
    async with new_session(cfg.probe) as session:
        prober = Prober(service.fleet, cfg.probe, session, service.on_probe)
        prober.start()
        await prober.first_round_done.wait()  # every master probed once, at 2,000 probes/s
        await prober.stop()
    return service


async def child(port: int, n: int) -> None:
    """Runs in a fresh process: prints RSS before/after as JSON."""
    cfg = parse_config(config(port, 1))
    Service(cfg)  # imports and one-time costs paid before the baseline
    async with new_session(cfg.probe):
        pass
    base = rss_kib()
    built = Service(parse_config(config(port, n)))
    built_kib = rss_kib()
    del built
    service = await probed_service(port, n)
    probed = rss_kib()
    service.metrics.render(None)
    print(
        json.dumps(
            {
                "base_kib": base,
                "built_kib": built_kib,
                "after_kib": probed,
                "rendered_kib": rss_kib(),
            }
        )
    )


def render_times(service: Service, accept: str | None) -> tuple[float, int]:
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        body, _ = service.metrics.render(accept)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(body)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000])
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        await child(args.port, args.child)
        return
    target, port = start_target()
    try:
        print(f"machine: {machine()}")
        for n in args.sizes:
            service = await probed_service(port, n)
            for label, accept in (
                ("text 0.0.4", None),
                ("OpenMetrics", "application/openmetrics-text"),
            ):
                seconds, size = render_times(service, accept)
                print(
                    f"scrape {n:>6} masters, {label:<11}: {seconds * 1000:7.1f} ms median, "
                    f"{size / 1e6:6.2f} MB, {size // n} bytes/master"
                )
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.bench_scrape",
                    "--child",
                    str(n),
                    "--port",
                    str(port),
                ],
                capture_output=True,
                text=True,
                check=True,
                timeout=300,
            )
            mem = json.loads(out.stdout.strip().splitlines()[-1])
            per = (mem["after_kib"] - mem["base_kib"]) / n
            built = (mem["built_kib"] - mem["base_kib"]) / n
            print(
                f"memory {n:>6} masters: base {mem['base_kib'] / 1024:.1f} MiB; records built "
                f"{built:.2f} KiB/master; built + probed (pool of open connections included) "
                f"{mem['after_kib'] / 1024:.1f} MiB = {per:.2f} KiB/master; after one render "
                f"{mem['rendered_kib'] / 1024:.1f} MiB"
            )
    finally:
        target.terminate()
        target.wait(5)


if __name__ == "__main__":
    asyncio.run(main())
