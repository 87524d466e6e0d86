"""Component benchmark of the probe path: candidates side by side, in-process.

Run: python -m bench.bench_probe [--masters 10000] [--interval 2] [--seconds 15] [--repeat 3]

Each candidate runs in a child process of its own, pinned to core 0 (the target, one keep-alive
asyncio server standing for every master by path, is pinned to core 1). A candidate is the
whole probe path of the service: scheduling, HTTP, JSON, classification, ``Service.on_probe``
(records, health machine, events). Its CPU is its own process's CPU over the window,
divided by the probes it completed. Candidates:

* ``aiohttp``: the path before the engine: a timer and a task per probe, ``probe_once`` over
  the pooled aiohttp session (as the old Prober did, without APScheduler);
* ``engine-asyncio``, ``engine-uvloop``: the Prober's engine on each event loop;
* ``engine-uvloop-tickN``: the same with a tick of N ms (1, 5, 10, 20) instead of the
  shipped one.

``--parsers`` also times the HTTP parsers alone on one nginx-like answer: llhttp through
httptools with the engine's callbacks, and aiohttp's own C parser.

The process-level benchmark (the real `ha-exporter run`, nginx, blackbox_exporter, HAProxy)
is bench/bench_process.py; this one isolates the probe path from the rest of the service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import HERE, free_port, machine, wait_http

CANDIDATES = ("aiohttp", "engine-asyncio", "engine-uvloop", "engine-uvloop-tick1",
              "engine-uvloop-tick5", "engine-uvloop-tick10", "engine-uvloop-tick20")


def _config(port: int, masters: int, interval: float):  # -> Config
    from exporter.config import parse_config

    return parse_config({
        "state_path": str(Path(tempfile.mkdtemp()) / "bench.db"),
        "probe": {"interval": f"{int(interval * 1000)}ms", "timeout": "500ms",
                  "max_connections": masters + 64},
        "masters": [{"name": f"m{i}", "url": f"http://127.0.0.1:{port}/m{i}"}
                    for i in range(masters)],
        "failover": {"enabled": False},
    })


class AiohttpRounds:
    """The old design: each round, a timer per master; each probe a task running probe_once
    over the shared aiohttp session."""

    def __init__(self, fleet, probe, session, on_result) -> None:
        self.fleet, self.probe, self.session, self.on_result = fleet, probe, session, on_result
        self.tasks: set[asyncio.Task[None]] = set()
        self.handles: list[asyncio.TimerHandle] = []
        self.rng = random.Random()
        self.round: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.run_round()

    def run_round(self) -> None:
        from exporter.probing.prober import phase

        loop = asyncio.get_running_loop()
        interval, jitter = self.probe.interval, self.probe.jitter
        spread = interval * (1 - jitter)
        self.round = loop.call_later(interval, self.run_round)
        self.handles = [
            loop.call_later(phase(rt.name) * spread + self.rng.random() * interval * jitter,
                            self.spawn, rt)
            for rt in self.fleet
        ]

    def spawn(self, rt) -> None:
        task = asyncio.get_running_loop().create_task(self.probe_master(rt))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def probe_master(self, rt) -> None:
        from exporter.probing.prober import probe_once

        if rt.in_flight:
            return
        rt.in_flight = True
        try:
            outcome = await probe_once(self.session, rt.config.url + self.probe.path, self.probe)
        finally:
            rt.in_flight = False
        self.on_result(rt, outcome)

    async def stop(self) -> None:
        if self.round is not None:
            self.round.cancel()
        for handle in self.handles:
            handle.cancel()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def one(candidate: str, port: int, masters: int, interval: float, seconds: float) -> dict:
    from exporter.probing import prober as prober_module
    from exporter.probing.prober import Prober, new_session
    from exporter.service import Service

    if "-tick" in candidate:
        prober_module.TICK = int(candidate.rsplit("-tick", 1)[1]) / 1000
    cfg = _config(port, masters, interval)
    service = Service(cfg)
    async with new_session(cfg.probe) as session:
        kind = AiohttpRounds if candidate == "aiohttp" else Prober
        prober = kind(service.fleet, cfg.probe, session, service.on_probe)
        prober.start()
        await asyncio.sleep(2 * interval)  # warm: connections open, code paths hot

        def done() -> int:
            return sum(sum(rt.result_counts) for rt in service.fleet)

        done0, cpu0, wall0 = done(), time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        done1, cpu1, wall1 = done(), time.process_time(), time.monotonic()
        ok = sum(rt.result_counts[0] for rt in service.fleet) / max(1, done1)
        await prober.stop()
    probes = done1 - done0
    return {"candidate": candidate, "rate": probes / (wall1 - wall0),
            "us": 1e6 * (cpu1 - cpu0) / max(1, probes), "busy": (cpu1 - cpu0) / (wall1 - wall0),
            "success": ok}


def run_child(candidate: str, port: int, args: argparse.Namespace) -> dict:
    argv = ["taskset", "-c", "0", sys.executable, "-m", "bench.bench_probe", "--child", candidate,
            "--port", str(port), "--masters", str(args.masters), "--interval",
            str(args.interval), "--seconds", str(args.seconds)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=HERE.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def parsers(n: int = 200_000) -> None:
    """µs per answer: llhttp via httptools with the engine's callbacks, aiohttp's C parser."""
    import httptools

    from exporter.probing.wire import Conn, Pool

    answer = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 30 Nov 2026 18:00:00 GMT"
              b"\r\nContent-Type: application/json\r\nContent-Length: 150\r\n"
              b"Connection: keep-alive\r\n\r\n" + b"x" * 150)

    class Owner:
        def answered(self, status, body): pass
        def refused(self, detail): pass
        def failed(self, detail, retry): pass
        def lost(self, conn): pass
        def broke(self, exc): raise exc

    class FakeTransport:
        def write(self, data): pass
        def abort(self): pass

    conn = Conn(Pool(10), Owner())
    conn.transport = FakeTransport()  # type: ignore[assignment]
    t0 = time.perf_counter()
    for _ in range(n):
        conn.send(b"", 65536)
        conn.data_received(answer)
    engine_us = 1e6 * (time.perf_counter() - t0) / n
    bare = httptools.HttpResponseParser(type("P", (), {"on_body": lambda self, b: None})())
    t0 = time.perf_counter()
    for _ in range(n):
        bare.feed_data(answer)
    bare_us = 1e6 * (time.perf_counter() - t0) / n
    print(f"llhttp (httptools), the engine's callbacks: {engine_us:.2f} µs per answer; "
          f"llhttp with no header callbacks: {bare_us:.2f} µs")
    try:
        from aiohttp._http_parser import HttpResponseParser  # type: ignore[import-not-found]
    except ImportError:
        print("aiohttp's C parser: not built here")
        return

    class Proto:
        def __init__(self) -> None:
            self.transport = None

        def pause_reading(self, **_): pass
        def resume_reading(self, **_): pass

    loop = asyncio.new_event_loop()
    parser = HttpResponseParser(Proto(), loop, 2**16, timer=None, auto_decompress=False)
    t0 = time.perf_counter()
    for _ in range(n):
        messages, _, _ = parser.feed_data(answer)
        message, _payload = messages[0]
        message.headers.get("Content-Encoding")
    aio_us = 1e6 * (time.perf_counter() - t0) / n
    loop.close()
    print(f"aiohttp's C parser (message, headers, payload stream): {aio_us:.2f} µs per answer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--masters", type=int, default=10_000)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    ap.add_argument("--parsers", action="store_true")
    ap.add_argument("--child", choices=CANDIDATES, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if "uvloop" in args.child:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        result = asyncio.run(one(args.child, args.port, args.masters, args.interval,
                                 args.seconds))
        print(json.dumps(result))
        return
    print(f"machine: {machine()}; load {os.getloadavg()[0]:.2f}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    if args.parsers:
        parsers()
    port = free_port()
    target = subprocess.Popen(["taskset", "-c", "1", sys.executable, str(HERE / "target.py"),
                               str(port)])
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        rate = args.masters / args.interval
        print(f"{args.masters:,} masters every {args.interval:g}s: {rate:,.0f} probes/s "
              f"scheduled; median of {args.repeat}")
        for candidate in args.candidates:
            runs = [run_child(candidate, port, args) for _ in range(args.repeat)]
            med = {k: statistics.median(r[k] for r in runs) for k in ("rate", "us", "busy",
                                                                       "success")}
            each = ", ".join(f"{r['us']:.0f}" for r in runs)
            print(f"  {candidate:22} {med['rate']:7,.0f} probes/s  {med['us']:6.1f} CPU-µs/probe"
                  f"  core {100 * med['busy']:3.0f}% busy  success {100 * med['success']:.1f}%"
                  f"  (runs: {each} µs)", flush=True)
    finally:
        target.terminate()
        target.wait(5)


if __name__ == "__main__":
    main()
