"""Probe throughput and CPU per probe, ha-exporter side by side with blackbox_exporter.

Run: python bench/bench_probe.py [--masters 10000] [--interval 5] [--seconds 20]
The exporter's real probe path runs in this process (Prober + Service.on_probe: HTTP, JSON,
classification, health machine, records); one keep-alive target process stands for every
master by path. blackbox_exporter (Debian's prometheus-blackbox-exporter) probes the same
target through its /probe endpoint, driven by this process; only its own CPU is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.common import cpu_seconds, free_port, machine, start_target, wait_http
from exporter.config import parse_config
from exporter.probing.prober import Prober, new_session
from exporter.service import Service


class PerMasterJobs(Prober):
    """The alternative design: one APScheduler job per master (measured, not shipped)."""

    def start(self) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        self._scheduler = AsyncIOScheduler()
        self._scheduler.start()
        for rt in self.fleet:
            trigger = IntervalTrigger(
                seconds=self.probe.interval, jitter=self.probe.interval * self.probe.jitter
            )
            self._scheduler.add_job(
                self._probe_master, trigger, args=[rt], id=rt.name, max_instances=1, coalesce=True
            )
        self.first_round_done.set()


async def ours(
    port: int, masters: int, interval: float, seconds: float, per_master: bool = False
) -> dict:
    cfg = parse_config(
        {
            "state_path": str(Path(tempfile.mkdtemp()) / "bench.db"),
            "probe": {
                "interval": f"{int(interval * 1000)}ms",
                "timeout": "2s",
                "jitter": "10%",
                "max_connections": 512,
            },
            "masters": [
                {"name": f"m{i}", "url": f"http://127.0.0.1:{port}/m{i}"} for i in range(masters)
            ],
        }
    )
    service = Service(cfg)
    async with new_session(cfg.probe) as session:
        kind = PerMasterJobs if per_master else Prober
        prober = kind(service.fleet, cfg.probe, session, service.on_probe)
        t0 = time.process_time()
        prober.start()
        setup_cpu = time.process_time() - t0
        await prober.first_round_done.wait()  # warm: connections open, code paths hot
        if per_master:
            await asyncio.sleep(interval * 1.2)
        done0 = sum(sum(rt.result_counts) for rt in service.fleet)
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        cpu1, wall1 = time.process_time(), time.monotonic()
        done1 = sum(sum(rt.result_counts) for rt in service.fleet)
        ok = sum(rt.result_counts[0] for rt in service.fleet)
        total = sum(sum(rt.result_counts) for rt in service.fleet)
        await prober.stop()
    probes = done1 - done0
    return {
        "probes": probes,
        "rate": probes / (wall1 - wall0),
        "cpu": cpu1 - cpu0,
        "wall": wall1 - wall0,
        "success": ok / total if total else 0.0,
        "setup_cpu": setup_cpu,
    }


async def blackbox(target_port: int, probes: int, concurrency: int) -> dict | None:
    binary = "/usr/bin/prometheus-blackbox-exporter"
    if not Path(binary).exists():
        return None
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "blackbox.yml"
        conf.write_text("modules:\n  http_2xx:\n    prober: http\n    timeout: 2s\n")
        proc = subprocess.Popen(
            [binary, f"--config.file={conf}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/metrics")
            url = f"http://127.0.0.1:{port}/probe"
            sem = asyncio.Semaphore(concurrency)
            async with aiohttp.ClientSession() as session:

                async def one(i: int) -> bool:
                    async with (
                        sem,
                        session.get(
                            url,
                            params={
                                "module": "http_2xx",
                                "target": f"http://127.0.0.1:{target_port}/m{i}",
                            },
                        ) as resp,
                    ):
                        return "probe_success 1" in await resp.text()

                await asyncio.gather(*(one(i) for i in range(200)))  # warm up
                cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
                results = await asyncio.gather(*(one(i) for i in range(probes)))
                cpu1, wall1 = cpu_seconds(proc.pid), time.monotonic()
        finally:
            proc.terminate()
            proc.wait(5)
    return {
        "probes": probes,
        "rate": probes / (wall1 - wall0),
        "cpu": cpu1 - cpu0,
        "success": sum(results) / probes,
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--masters", type=int, default=10_000)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--blackbox-probes", type=int, default=10_000)
    args = ap.parse_args()
    logging.getLogger("apscheduler").setLevel(logging.CRITICAL)  # cancelled jobs at stop
    target, port = start_target()
    try:
        print(f"machine: {machine()}")
        target_rate = args.masters / args.interval
        for label, per_master in (
            ("one job per round (shipped)", False),
            ("one job per master", True),
        ):
            r = await ours(port, args.masters, args.interval, args.seconds, per_master)
            print(
                f"ha-exporter, {label}: {args.masters} masters every {args.interval:g}s "
                f"(target {target_rate:.0f} probes/s): {r['rate']:.0f} probes/s over "
                f"{r['wall']:.1f}s, {r['cpu'] / r['probes'] * 1000:.3f} CPU-s per 1,000 "
                f"probes, one core {100 * r['cpu'] / r['wall']:.0f}% busy, success "
                f"{100 * r['success']:.1f}%, scheduling set-up {r['setup_cpu']:.2f} CPU-s"
            )
        b = await blackbox(port, args.blackbox_probes, 64)
        if b is None:
            print("blackbox_exporter: not installed (apt-get install prometheus-blackbox-exporter)")
        else:
            print(
                f"blackbox_exporter: {b['probes']} probes at {b['rate']:.0f} probes/s, "
                f"{b['cpu'] / b['probes'] * 1000:.3f} CPU-s per 1,000 probes, "
                f"success {100 * b['success']:.1f}%"
            )
    finally:
        target.terminate()
        target.wait(5)


if __name__ == "__main__":
    asyncio.run(main())
