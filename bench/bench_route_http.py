"""HTTP GET /api/v1/route throughput and p99, driven by wrk (Debian package `wrk`).

Run: python -m bench.bench_route_http [--masters 10 1000] [--connections 16 64] [--seconds 10]
A real `ha-exporter run` process pinned to core 0 (taskset), wrk and the masters' stand-in
pinned to core 1; masters are one keep-alive target standing for every master by path, probed
every 5 s as usual, so the probe rounds' cost is part of what is measured.

Target: >= 5,000 requests/s with p99 < 5 ms on one core. Each configuration runs twice:
saturated (every connection always busy: the most the core can do; by Little's law the mean
latency there is connections / throughput, ~3-4 ms at 64 connections, so its p99 says little
about service latency) and paced at a little over 5,000 requests/s offered, whose p99 is the one
the target is about. Both are printed on one line, with the verdict on the paced run.
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

TOKEN = "bench-token-0123456789"
TARGET_RPS, TARGET_P99_MS = 5_000, 5.0
EXPORTER_CORE, LOAD_CORE = 0, 1
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def start_exporter(tmp: Path, target_port: int, masters: int) -> tuple[subprocess.Popen, str]:
    """`ha-exporter run` on its own core; its log goes to a file (the bench prints results)."""
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
    with (tmp / "exporter.log").open("wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            ["taskset", "-c", str(EXPORTER_CORE), sys.executable, "-m", "exporter.cli",
             "--log-level", "warning", "run", "--config", str(path)],
            env={**os.environ, "HA_EXPORTER_TOKEN": TOKEN}, stdout=log, stderr=log,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", timeout=60)
    except RuntimeError:
        proc.kill()
        sys.exit(f"exporter not ready; its log:\n{(tmp / 'exporter.log').read_text()[-4000:]}")
    return proc, base


def to_ms(value: str) -> float:
    """wrk's latency figure (``850.00us``, ``2.05ms``, ``1.10s``) in milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    if m is None:
        raise ValueError(f"unexpected wrk latency {value!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def run_wrk(
    url: str, connections: int, seconds: int, rate: int | None = None
) -> tuple[float, float]:
    """Requests/s and p99 in ms; any non-2xx answer aborts the benchmark (it would flatter).

    Without ``rate`` every connection sends its next request as soon as the answer is in
    (saturation). With it, each connection pauses between requests (a wrk Lua ``delay``),
    aiming 10% over ``rate`` since the answer's own time adds to each cycle; wrk takes whole
    ms, so the script picks the neighbouring whole values at random to average the fraction.
    wrk times a request from its send: the pause is not counted as latency.
    """
    cmd = ["taskset", "-c", str(LOAD_CORE), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
           "--latency"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        if rate is not None:
            pause = 1000 * connections / (rate * 1.1)
            whole, frac = int(pause), pause - int(pause)
            script.write(f"function delay() if math.random() < {frac:.3f} then return "
                         f"{whole + 1} end return {whole} end\n")
            script.flush()
            cmd += ["-s", script.name]
        out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True,
                             timeout=seconds + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if rps is None or p99 is None:
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    if bad:
        raise RuntimeError(f"wrk saw errors ({bad.group(0)}):\n{out}")
    return float(rps.group(1)), to_ms(p99.group(1))


def verdict(rps: float, p99_ms: float) -> str:
    return "met" if rps >= TARGET_RPS and p99_ms < TARGET_P99_MS else "MISSED"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--masters", type=int, nargs="+", default=[10, 1000])
    ap.add_argument("--connections", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    if not shutil.which("wrk") or not shutil.which("taskset"):
        sys.exit("wrk and taskset are needed (apt-get install wrk util-linux)")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs two cores: one for the exporter, one for wrk")
    print(f"machine: {machine()}; exporter on core {EXPORTER_CORE}, wrk on core {LOAD_CORE}; "
          f"target >= {TARGET_RPS} requests/s with p99 < {TARGET_P99_MS:g} ms")
    target, target_port = start_target()
    os.sched_setaffinity(target.pid, {LOAD_CORE})  # keep the probe answers off the measured core
    try:
        for n in args.masters:
            with tempfile.TemporaryDirectory() as tmp:
                exporter, base = start_exporter(Path(tmp), target_port, n)
                try:
                    url = f"{base}/api/v1/route?key=chat-42"
                    run_wrk(url, 16, 2)  # warm up
                    for c in args.connections:
                        top, top_p99 = run_wrk(url, c, args.seconds)
                        paced, paced_p99 = run_wrk(url, c, args.seconds, rate=TARGET_RPS)
                        print(f"route over HTTP, {n:>5} masters, {c:>3} connections: "
                              f"saturated {top:6.0f} requests/s p99 {top_p99:5.2f} ms; "
                              f"paced {paced:5.0f} requests/s p99 {paced_p99:5.2f} ms, "
                              f"target {verdict(paced, paced_p99)}", flush=True)
                finally:
                    exporter.terminate()
                    exporter.wait(15)
    finally:
        target.terminate()
        target.wait(5)


if __name__ == "__main__":
    main()
