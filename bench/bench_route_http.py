"""HTTP GET /api/v1/route throughput and p99, driven by wrk (Debian package `wrk`).

Run: python -m bench.bench_route_http [--masters 10 1000] [--connections 16 64] [--seconds 10]
A real `ha-exporter run` process pinned to core 0 (taskset), wrk pinned to core 1; masters are
one keep-alive target standing for every master by path, probed every 5 s as usual.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.common import free_port, machine, start_target, wait_http

TOKEN = "bench-token"


def start_exporter(tmp: Path, target_port: int, masters: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cfg = {
        "listen": {"host": "127.0.0.1", "port": port},
        "state_path": str(tmp / "state.db"),
        "probe": {"interval": "5s", "timeout": "2s"},
        "masters": [{"name": f"m{i}", "url": f"http://127.0.0.1:{target_port}/m{i}",
                     "region": ("uae", "usa")[i % 2]} for i in range(masters)],
        "failover": {"enabled": False, "checkpoint_interval": "1h"},
    }
    path = tmp / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "exporter.cli", "--log-level", "warning",
         "run", "--config", str(path)],
        env={**os.environ, "HA_EXPORTER_TOKEN": TOKEN},
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/readyz", timeout=60)
    return proc, base


def run_wrk(url: str, connections: int, seconds: int) -> tuple[float, str]:
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
         url], capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{errors.group(1)} non-2xx answers:\n{out}")
    return rps, p99


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--masters", type=int, nargs="+", default=[10, 1000])
    ap.add_argument("--connections", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (apt-get install wrk)")
    print(f"machine: {machine()}; exporter on core 0, wrk on core 1")
    target, target_port = start_target()
    try:
        for n in args.masters:
            with tempfile.TemporaryDirectory() as tmp:
                exporter, base = start_exporter(Path(tmp), target_port, n)
                try:
                    url = f"{base}/api/v1/route?key=chat-42"
                    run_wrk(url, 16, 2)  # warm up
                    for c in args.connections:
                        rps, p99 = run_wrk(url, c, args.seconds)
                        print(f"route over HTTP, {n:>5} masters, {c:>3} connections: "
                              f"{rps:8.0f} requests/s, p99 {p99}")
                finally:
                    exporter.terminate()
                    exporter.wait(15)
    finally:
        target.terminate()
        target.wait(5)


if __name__ == "__main__":
    main()
