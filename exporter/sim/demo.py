"""`ha-exporter demo`: a simulated fleet and the exporter in one process, one command.

Four simulated masters in two regions (uae, usa), two active and two standby, so that a
failover always has a same-region backup: backup selection ranks a standby in the failed
master's region before a better priority elsewhere, so master-a (uae) goes to master-c and
master-b (usa) to master-d. ``--chaos`` takes an active master down, then heals it, on a
schedule, so /metrics, the status page and the failover history move.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import secrets
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from aiohttp import web

from exporter.config import Config, format_duration, parse_config, parse_duration
from exporter.service import Service
from exporter.sim.master import SimulatedMaster, create_app
from exporter.web.server import running

log = logging.getLogger(__name__)

DEMO_FLEET = (
    ("master-a", "uae", "active", 1),
    ("master-b", "usa", "active", 2),
    ("master-c", "uae", "standby", 3),
    ("master-d", "usa", "standby", 4),
)


def demo_config(
    port: int, master_ports: Sequence[int], interval: str, state_dir: Path
) -> Config:
    """The embedded default config: the contract's example fleet on loopback, the masters on
    ``master_ports`` (one per DEMO_FLEET entry, in order)."""
    return parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": port},
            "state_path": str(state_dir / "ha-exporter-demo.db"),
            "probe": {
                "interval": interval,
                "timeout": format_duration(min(1.0, parse_duration(interval) / 2)),
                "failure_threshold": 3,
                "recovery_threshold": 2,
                "degraded_latency": "500ms",
                "jitter": "10%",
            },
            "masters": [
                {
                    "name": n,
                    "url": f"http://127.0.0.1:{master_port}",
                    "priority": prio,
                    "region": region,
                    "role": role,
                }
                for master_port, (n, region, role, prio) in zip(
                    master_ports, DEMO_FLEET, strict=True
                )
            ],
            "balancing": {
                "strategy": "round_robin",
                "panic_threshold": "50%",
                "rebalance": {"imbalance_ratio": 2.0, "for": "30s"},
            },
            "failover": {
                "enabled": True,
                "cooldown": "60s",
                "checkpoint_interval": "5s",
                "recovery_timeout": "30s",
                "max_recovery_attempts": 5,
                "failback": "manual",
            },
            "thresholds": {"queue_warning": 100, "queue_critical": 500},
            "api": {"token_env": None},
        }
    )


async def _start_master(name: str, region: str, role: str, port: int) -> web.AppRunner:
    """One simulated master on 127.0.0.1:port (0: a free port, read from runner.addresses)."""
    runner = web.AppRunner(create_app(SimulatedMaster(name, region, role)), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def _chaos(
    session: aiohttp.ClientSession, service: Service, every: float, stop: asyncio.Event
) -> None:
    """Take one currently active master down, keep it down long enough to be detected and
    failed over, heal it; repeat until stopped."""
    rng = random.Random()
    probe = service.config.probe
    detect = probe.failure_threshold * probe.interval * (1 + probe.jitter) + probe.timeout
    down_for = max(every / 2, detect + 2 * probe.interval)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        active = [rt for rt in service.fleet if service.duties.role_of(rt.name) == "active"]
        if stop.is_set() or not active:
            return
        victim = rng.choice(active)
        log.warning("chaos: taking %s down for %.1fs", victim.name, down_for,
                    extra={"event": "chaos"})
        await _set_mode(session, victim.config.url, "down")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), down_for)
        log.warning("chaos: healing %s", victim.name, extra={"event": "chaos"})
        await _set_mode(session, victim.config.url, "ok")


async def _set_mode(session: aiohttp.ClientSession, url: str, mode: str) -> None:
    try:
        async with session.post(f"{url}/chaos", json={"mode": mode}) as resp:
            await resp.read()
    except aiohttp.ClientError as exc:
        log.error("chaos: could not reach %s: %s", url, exc)


async def run_demo(args: argparse.Namespace) -> None:
    state_dir = Path(args.state_dir) if args.state_dir else Path(tempfile.mkdtemp(prefix="ha-"))
    state_dir.mkdir(parents=True, exist_ok=True)
    # --master-port 0: every master binds a free port of its own; the config names the bound
    # ones, so the masters start before the config is made.
    runners = [
        await _start_master(name, region, role, args.master_port + i if args.master_port else 0)
        for i, (name, region, role, _) in enumerate(DEMO_FLEET)
    ]
    ports = [int(runner.addresses[0][1]) for runner in runners]
    cfg = demo_config(args.port, ports, args.interval, state_dir)
    token = secrets.token_urlsafe(18)
    service = Service(cfg, token=token)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running(service) as server:
        await _serve_demo(args, cfg, service, token, f"http://127.0.0.1:{server.port}", stop)
    for runner in runners:
        await runner.cleanup()
    print("demo stopped", flush=True)


async def _serve_demo(args: argparse.Namespace, cfg: Config, service: Service, token: str,
                      base: str, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    print(
        f"""
ha-exporter demo: {len(cfg.masters)} simulated masters, exporter on {base}
  status page   {base}/
  metrics       {base}/metrics
  masters       {base}/api/v1/masters
  failovers     {base}/api/v1/failovers
  route         {base}/api/v1/route?key=chat-42&region=uae
  API token     {token}
                (e.g. curl -X POST -H 'Authorization: Bearer {token}' \\
                   -d '{{"from":"master-a"}}' {base}/api/v1/failover)
  masters       {", ".join(f"{m.name}={m.url} ({m.region}, {m.role})" for m in cfg.masters)}
  state         {cfg.state_path}
  chaos         {"on: a master fails every " + f"{args.chaos_every:g}s" if args.chaos else "off"}
Ctrl-C stops everything.
""",
        flush=True,
    )
    tasks = []
    async with aiohttp.ClientSession() as session:
        if args.chaos:
            tasks.append(asyncio.create_task(_chaos(session, service, args.chaos_every, stop)))
        if args.duration:
            loop.call_later(args.duration, stop.set)
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
