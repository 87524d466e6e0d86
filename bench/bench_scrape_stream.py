"""Component benchmark of /metrics: render time, event-loop stalls and memory, in-process.

A component benchmark, not the real process: a synthetic fleet (every master's record filled
by three rounds of varied probe outcomes, as the prober would) is rendered in this process.
The process-level figure, /metrics under full probing load, is ``bench.bench_process``.

Run: python -m bench.bench_scrape_stream [--sizes 1000 10000] [--renders 40]

Per size, over ``--renders`` scrapes each:

* ``direct, whole body``: ``ExporterMetrics.render`` (the body built in memory, then sent);
* ``direct, streamed``: ``ExporterMetrics.stream`` consumed in an event loop, as the /metrics
  handler does, with a 1 ms ticker running: the longest the ticker waited is the longest the
  scrape held the loop (the probes' schedule is held as long);
* ``prometheus_client``: the same per-master families and values as prometheus_client metrics
  in a registry of their own, one child per label set, rendered by ``generate_latest``.

Render time p50/p99 (ms), Python's peak allocation during one scrape (tracemalloc, separate
pass), and, in a fresh child process per path, the RSS the path keeps (prometheus_client's
children, built once) and the RSS still held after five scrapes. prometheus_client renders
``--renders`` / 4 times (it is slow). ``--freeze`` moves the fleet out of the garbage
collector's sight first (``gc.freeze()``), to tell its full collections apart from the render.
Run the "before" figures by running this file against an older tree (``PYTHONPATH=<tree>``):
the whole-body path needs nothing newer.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from bench.common import machine, rss_kib
from exporter.config import parse_config
from exporter.fleet import PROBE_BUCKETS, RESULTS, STATES, Outcome, Result
from exporter.service import Service

PATHS = ("whole", "streamed", "client")
LABELS = {
    "whole": "direct, whole body",
    "streamed": "direct, streamed",
    "client": "prometheus_client",
}


def synthetic_service(n: int, seed: int = 1) -> Service:
    """A service over ``n`` masters whose records hold three rounds of varied outcomes."""
    cfg = parse_config({
        "state_path": str(Path(tempfile.mkdtemp()) / "bench.db"),
        "probe": {"interval": "5s", "timeout": "2s"},
        "masters": [
            {
                "name": f"master-{i:05d}",
                "url": f"http://127.0.0.1:9/m{i}",
                "region": ("uae", "usa", "eu")[i % 3],
                "priority": i,
                "role": "standby" if i % 4 == 3 else "active",
            }
            for i in range(n)
        ],
    })
    service = Service(cfg)
    rnd = random.Random(seed)
    now = time.time()
    for k in range(3):
        for i, rt in enumerate(service.fleet):
            active = i % 4 != 3
            payload = {
                "status": "ok",
                "queue_length": rnd.randrange(50),
                "active_messages": rnd.randrange(5),
                "cpu_percent": round(rnd.uniform(0, 100), 1),
                "memory_percent": round(rnd.uniform(0, 100), 2),
                "active": active,
                "duties": [rt.name] if active else [],
            }
            if rnd.random() < 0.02:
                rt.apply(Outcome(Result.TIMEOUT, 2.0, detail="timeout"), now + k)
            else:
                rt.apply(Outcome(Result.SUCCESS, rnd.expovariate(200), payload=payload), now + k)
    return service


def client_registry(service: Service) -> CollectorRegistry:
    """The per-master families as prometheus_client metrics, one child per label set, holding
    the same values as the fleet's records."""
    disable_created_metrics()  # the direct renderer writes no _created series either
    reg = CollectorRegistry(auto_describe=False)
    up = Gauge("ha_master_up", "up", ["master", "region", "role"], registry=reg)
    info = Gauge("ha_master_info", "info", ["master", "region", "role", "priority"], registry=reg)
    state = Gauge("ha_master_state", "state", ["master", "state"], registry=reg)
    hist = Histogram("ha_master_probe_duration_seconds", "duration", ["master"],
                     buckets=PROBE_BUCKETS, registry=reg)
    probes = Counter("ha_master_probes_total", "probes", ["master", "result"], registry=reg)
    gauges = {
        name: Gauge(name, name, ["master"], registry=reg)
        for name in (
            "ha_master_consecutive_failures", "ha_master_last_probe_timestamp_seconds",
            "ha_master_recovery_timed_out", "ha_master_needs_reset", "ha_master_queue_length",
            "ha_master_active_messages", "ha_master_cpu_percent", "ha_master_memory_percent",
            "ha_master_routing_weight",
        )
    }
    weights = service.routing_weights()
    for rt in service.fleet:
        c, name = rt.config, rt.name
        role = service.duties.role_of(name)
        up.labels(name, c.region, role).set(1 if rt.up else 0)
        info.labels(name, c.region, role, str(c.priority)).set(1)
        for st in STATES:
            state.labels(name, str(st)).set(1 if st is rt.health.state else 0)
        child = hist.labels(name)
        for bucket, count in zip(child._buckets, rt.bucket_counts, strict=True):
            bucket.set(count)
        child._sum.set(rt.probe_sum)
        for result, count in zip(RESULTS, rt.result_counts, strict=True):
            probes.labels(name, str(result)).inc(count)
        values = (
            rt.health.consecutive_failures, rt.last_probe_wall, 0, 0, rt.queue_length,
            rt.active_messages, rt.cpu_percent, rt.memory_percent, weights.get(name, 0.0),
        )
        for gauge, value in zip(gauges.values(), values, strict=True):
            if value is not None:
                gauge.labels(name).set(value)
    return reg


def scraper(service: Service, path: str) -> Callable[[], int]:
    """One scrape of ``path``, returning the bytes it produced."""
    metrics = service.metrics
    if path == "whole":
        return lambda: len(metrics.render(None)[0])
    if path == "client":
        reg = client_registry(service)
        return lambda: len(generate_latest(reg))
    stream = getattr(metrics, "stream", None)
    if stream is None:
        raise SystemExit("this tree has no ExporterMetrics.stream")

    async def consume() -> int:
        return sum([len(data) async for data in stream(False)])

    return lambda: asyncio.run(consume())


async def streamed_times(service: Service, renders: int) -> tuple[list[float], list[float]]:
    """Wall time of each streamed scrape and the longest the 1 ms ticker waited during it."""
    loop = asyncio.get_running_loop()
    stalls: list[float] = []
    worst = [0.0]

    handle: list[asyncio.TimerHandle] = []

    def tick(due: float) -> None:
        now = loop.time()
        worst[0] = max(worst[0], now - due)
        handle[:] = [loop.call_at(now + 0.001, tick, now + 0.001)]

    tick(loop.time())
    times = []
    for _ in range(renders):
        await asyncio.sleep(0.005)
        worst[0] = 0.0
        t0 = time.perf_counter()
        async for _data in service.metrics.stream(False):
            pass
        times.append(time.perf_counter() - t0)
        stalls.append(worst[0])
    handle[0].cancel()
    return times, stalls


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def peak_mib(scrape: Callable[[], int]) -> float:
    gc.collect()
    tracemalloc.start()
    scrape()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def child(n: int, path: str, freeze: bool) -> None:
    """In a fresh process: RSS before and after building the path, and after five scrapes."""
    service = synthetic_service(n)
    gc.collect()
    if freeze:
        gc.freeze()
    base = rss_kib()
    scrape = scraper(service, path)
    built = rss_kib()
    for _ in range(5):
        scrape()
    gc.collect()
    print(json.dumps({"base": base, "built": built, "after": rss_kib()}))


def held_mib(n: int, path: str, freeze: bool) -> tuple[float, float]:
    argv = [sys.executable, "-m", "bench.bench_scrape_stream", "--child", str(n), "--path", path]
    out = subprocess.run(
        argv + (["--freeze"] if freeze else []),
        capture_output=True, text=True, check=True, timeout=600,
    )
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    return (mem["built"] - mem["base"]) / 1024, (mem["after"] - mem["built"]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000])
    ap.add_argument("--renders", type=int, default=40)
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    ap.add_argument("--freeze", action="store_true", help="gc.freeze() once the fleet is built")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.path, args.freeze)
        return
    print(f"component benchmark (in-process, synthetic fleet); machine: {machine()}; load "
          f"{os.getloadavg()[0]:.2f}{'; gc.freeze()' if args.freeze else ''}")
    for n in args.sizes:
        service = synthetic_service(n)
        gc.collect()
        if args.freeze:
            gc.freeze()
        for path in args.paths:
            t0 = time.perf_counter()
            try:
                scrape = scraper(service, path)
            except SystemExit as exc:
                print(f"{n:>6} masters, {LABELS[path]:<19}: skipped ({exc})")
                continue
            build = time.perf_counter() - t0
            size = scrape()
            stall = ""
            if path == "streamed":
                times, stalls = asyncio.run(streamed_times(service, args.renders))
                stall = (f", loop held p50 {statistics.median(stalls) * 1000:4.1f} / p99 "
                         f"{pct(stalls, 0.99) * 1000:5.1f} ms")
            else:
                times = []
                for _ in range(args.renders if path == "whole" else max(3, args.renders // 4)):
                    s0 = time.perf_counter()
                    scrape()
                    times.append(time.perf_counter() - s0)
            peak = peak_mib(scrape)
            kept, held = held_mib(n, path, args.freeze)
            extra = f", children built in {build * 1000:.0f} ms" if path == "client" else ""
            print(
                f"{n:>6} masters, {LABELS[path]:<19}: p50 {statistics.median(times) * 1000:6.1f}"
                f" ms, p99 {pct(times, 0.99) * 1000:6.1f} ms{stall}; {size / 1e6:5.2f} MB; "
                f"peak {peak:5.1f} MiB; RSS kept by the path {kept:5.1f} MiB, "
                f"held after 5 scrapes {held:+5.1f} MiB{extra}"
            )
        service.store.close()


if __name__ == "__main__":
    main()
