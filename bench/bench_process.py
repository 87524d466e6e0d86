"""Process-level probe benchmark: the real `ha-exporter run`, measured from outside.

Run: python -m bench.bench_process [--configs 1000x1 2000x1 10000x2] [--seconds 15]
                                   [--repeat 3] [--rev REV] [--json FILE]
     python -m bench.bench_process --checkpoints 2 [--configs 2000x2 10000x2] [--seconds 20]

What runs, on a machine of two or more cores:

* nginx (Debian ``nginx-light``), its config generated into a temp dir: one worker answering the
  same /health JSON for every path, keep-alive (no request limit per connection). Pinned to
  core 1 with the rest of the load.
* ``ha-exporter run`` (this tree, or ``--rev REV`` exported with ``git archive`` for a before
  figure), pinned to core 0 alone with taskset, probing N masters every I seconds: master
  ``m{i}`` is ``http://127.0.0.1:PORT/m{i}``, so every master has its own URL on one nginx.
* prometheus-blackbox-exporter probing the same target (its own nginx port, so its probes are
  counted apart) through ``/probe``, driven from here at a fixed pace (``--blackbox-rate``).
* HAProxy's health checker (Debian ``haproxy``), one backend of min(N, ``--haproxy-servers``)
  servers on the same target, ``check inter I``: HAProxy's own schedule.

For each: probes/s kept vs scheduled (requests counted by nginx, one access-log byte pair per
request on each client's own port), CPU-µs per probe (utime + stime from /proc/PID/stat over
the window), RSS at the end. The exporter is measured in two windows: A without scrapes (the
probe engine alone) and B with /metrics scraped a few times a second (``--scrapes-per-second``,
one at a time), whose latency p50/p99 is reported; B's CPU includes rendering the scrapes.
Every master answers the same JSON, so every probe should be ``success``: the share that was is
read from the last scrape.

``--checkpoints SECONDS`` measures instead what the failover's checkpoint rounds cost the probe
schedule: each run is a pair, the exporter with ``failover.checkpoint_interval`` SECONDS (every
round a GET /state of every active master, ``If-None-Match`` with the ETag nginx sent, 304 while
the file is unchanged) and with it at 1 h (only the round at start-up, which reads every master
in full once: masters start healthy), one after the other. nginx serves /state as a static file
(its own ETag, and 304 to a matching ``If-None-Match``), a valid snapshot shared by every master.
After the warm-up (in both: until every master has been read in full once, so that the start-up
round is over; checkpoints on: one more interval) one window of ``--seconds`` without scrapes
but one at each end; from those two, ``ha_probe_schedule_lag_seconds`` (p50 and p99 interpolated
in the histogram's buckets, and the mean) and ``ha_probe_rounds_skipped_total`` over the window;
nginx counts the probes and the /state answers (200 and 304). Neither blackbox_exporter nor
HAProxy runs. ``python -m bench.pyspy_top`` summarises the profiles ``--py-spy DIR`` records.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import yaml

from bench.common import cpu_seconds, free_port, machine, rss_kib, wait_http
from exporter.failover.protocol import snapshot_checksum

EXPORTER_CORE, LOAD_CORE = 0, 1
REPO = Path(__file__).resolve().parent.parent
#: The shape of `ha-exporter master`'s /health answer (exporter.sim.state).
BODY = (
    '{"status": "ok", "queue_length": 3, "active_messages": 1, "cpu_percent": 12.5, '
    '"memory_percent": 40.0, "name": "m", "region": "uae", "active": false, "duties": [], '
    '"epoch": 0}'
)
NOFILE = 20_000
PROBE_TIMEOUT = "500ms"
#: ``failover.checkpoint_interval`` when checkpoints are off: longer than any run.
NO_CHECKPOINTS = "1h"


def snapshot() -> bytes:
    """The /state every master serves: a valid snapshot (the protocol's checksum) of a master
    with a few sessions and messages, without ``master`` (one file for every master)."""
    body = {
        "region": "uae",
        "sessions": {f"+97150000{i:04d}": {"since": 1_735_689_600 + i, "sent": i}
                     for i in range(20)},
        "pending_messages": [{"id": i, "to": f"+97150000{i:04d}", "text": "hello"}
                             for i in range(5)],
        "config": {"max_sessions": 1000},
        "imported": {},
        "watermark": 42,
    }
    return json.dumps({**body, "checksum": snapshot_checksum(body)}).encode()


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else NOFILE * 4
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(want, NOFILE * 4)), hard))


def pinned(core: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv]


# --- nginx ---------------------------------------------------------------------------------


@dataclass
class Nginx:
    proc: subprocess.Popen
    ports: dict[str, int]  # client name -> the port its probes go to
    logs: dict[str, Path]

    def requests(self, client: str) -> int:
        """/health requests served on that client's port so far (two bytes of access log
        each); other calls (the failover's checkpoints) are not counted."""
        path = self.logs[client]
        return path.stat().st_size // 2 if path.exists() else 0

    def states(self, client: str) -> tuple[int, int]:
        """GET /state answered on that client's port so far: (200s, 304s), from its own
        access log (one status a line)."""
        path = self.logs[client].with_suffix(".state.log")
        text = path.read_bytes() if path.exists() else b""
        return text.count(b"200"), text.count(b"304")

    async def flush(self) -> None:
        """Have nginx write out its buffered access log lines (SIGUSR1 reopens the logs,
        writing the buffers first), so that a count is exact at this moment."""
        self.proc.send_signal(signal.SIGUSR1)
        await asyncio.sleep(0.05)


def start_nginx(tmp: Path, clients: list[str]) -> Nginx:
    ports = {c: free_port() for c in clients}
    logs = {c: tmp / f"nginx-{c}.log" for c in clients}
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "www"):
        (tmp / sub).mkdir()
    (tmp / "www" / "state.json").write_bytes(snapshot())
    body = BODY.replace("'", "\\'")
    servers = "\n".join(
        f"""  server {{
    listen 127.0.0.1:{port} backlog=4096;
    access_log {logs[c]} one buffer=16k flush=1s if=$health;
    access_log {logs[c].with_suffix(".state.log")} status buffer=16k flush=1s if=$state;
    location / {{ default_type application/json; return 200 '{body}'; }}
    location ~ /state$ {{ root {tmp}/www; default_type application/json;
                         try_files /state.json =404; }}
  }}"""
        for c, port in ports.items()
    )
    proc = spawn_nginx(tmp, NOFILE * 2, NOFILE, servers)
    for port in ports.values():
        try:
            wait_http(f"http://127.0.0.1:{port}/warm")
        except RuntimeError:
            proc.kill()
            sys.exit(f"nginx did not start: {(tmp / 'nginx.out').read_text()[-2000:]}")
    return Nginx(proc, ports, logs)


def spawn_nginx(tmp: Path, rlimit: int, connections: int, http: str) -> subprocess.Popen[bytes]:
    """nginx on the load core with ``http`` inside its http block, after the common part: log
    formats ``one`` and ``status``, ``$health`` (probes only, not the failover's calls) and
    ``$state`` (checkpoints), temp paths under ``tmp``, long keep-alive."""
    conf = tmp / "nginx.conf"
    conf.write_text(f"""daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {rlimit};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections {connections}; use epoll; multi_accept on; }}
http {{
  log_format one '.';
  log_format status '$status';
  map $uri $health {{ ~/health$ 1; default 0; }}
  map $request_uri $state {{ ~/state$ 1; default 0; }}
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
{http}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return subprocess.Popen(
        pinned(LOAD_CORE, [nginx, "-c", str(conf), "-p", str(tmp)]),
        stdout=subprocess.DEVNULL, stderr=(tmp / "nginx.out").open("wb"),
        preexec_fn=_raise_nofile,
    )


# --- the exporter --------------------------------------------------------------------------


def export_rev(rev: str, into: Path) -> Path:
    """The tree of git revision ``rev``, exported read-only with ``git archive``."""
    tar = into / "tree.tar"
    with tar.open("wb") as out:
        subprocess.run(["git", "-C", str(REPO), "archive", rev], stdout=out, check=True)
    tree = into / "tree"
    with tarfile.open(tar) as t:
        t.extractall(tree, filter="data")
    return tree


def start_exporter(
    tmp: Path, tree: Path, port: int, masters: int, interval: float, loop: str = "",
    checkpoint_interval: str = NO_CHECKPOINTS,
) -> tuple[subprocess.Popen, str]:
    listen = free_port()
    cfg = {
        "listen": {"host": "127.0.0.1", "port": listen},
        "state_path": str(tmp / "state.db"),
        "probe": {
            "interval": f"{int(interval * 1000)}ms",
            "timeout": PROBE_TIMEOUT,
            "max_connections": min(masters + 64, 65535),
        },
        "masters": [
            {"name": f"m{i}", "url": f"http://127.0.0.1:{port}/m{i}"} for i in range(masters)
        ],
        # off, so that no move runs (every master reports no duty); checkpoints run anyway
        "failover": {"enabled": False, "checkpoint_interval": checkpoint_interval},
    }
    path = tmp / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(tree)}
    if loop:
        env["HA_EXPORTER_EVENT_LOOP"] = loop
    with (tmp / "exporter.log").open("wb") as log:
        proc = subprocess.Popen(
            pinned(EXPORTER_CORE, [sys.executable, "-m", "exporter.cli", "--log-level", "warning",
                                   "run", "--config", str(path), "--insecure-no-auth"]),
            cwd=tree, env=env, stdout=log, stderr=log, preexec_fn=_raise_nofile,
        )
    base = f"http://127.0.0.1:{listen}"
    try:
        wait_http(f"{base}/readyz", timeout=300)
    except RuntimeError:
        proc.kill()
        tail = (tmp / "exporter.log").read_text()[-1500:]
        raise RunFailed(f"exporter not ready within 300 s; its log ends:\n{tail}") from None
    return proc, base


class RunFailed(Exception):
    """One run could not be measured; the others go on."""


# --- blackbox_exporter and HAProxy ---------------------------------------------------------


def start_blackbox(tmp: Path) -> tuple[subprocess.Popen, str] | None:
    binary = shutil.which("prometheus-blackbox-exporter")
    if binary is None:
        return None
    port = free_port()
    conf = tmp / "blackbox.yml"
    conf.write_text(f"modules:\n  http_2xx:\n    prober: http\n    timeout: {PROBE_TIMEOUT}\n")
    proc = subprocess.Popen(
        pinned(LOAD_CORE, [binary, f"--config.file={conf}",
                           f"--web.listen-address=127.0.0.1:{port}"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_http(f"http://127.0.0.1:{port}/metrics")
    return proc, f"http://127.0.0.1:{port}"


def start_haproxy(tmp: Path, port: int, servers: int, interval: float) -> subprocess.Popen | None:
    binary = shutil.which("haproxy")
    if binary is None:
        return None
    ms = int(interval * 1000)
    lines = [
        "global",
        "  maxconn 4000",
        "  nbthread 1",
        "  spread-checks 10",
        "defaults",
        "  mode http",
        "  timeout connect 500ms",
        "  timeout check 500ms",
        "  timeout client 5s",
        "  timeout server 5s",
        "frontend fe",
        f"  bind 127.0.0.1:{free_port()}",
        "  default_backend masters",
        "backend masters",
        "  option httpchk",
        "  http-check send meth GET uri /health ver HTTP/1.1 hdr Host localhost",
        "  http-check expect status 200",
        f"  default-server inter {ms}ms fall 3 rise 2",
        *(f"  server m{i} 127.0.0.1:{port} check" for i in range(servers)),
    ]
    conf = tmp / "haproxy.cfg"
    conf.write_text("\n".join(lines) + "\n")
    return subprocess.Popen(
        pinned(LOAD_CORE, [binary, "-db", "-f", str(conf)]),
        stdout=subprocess.DEVNULL, stderr=(tmp / "haproxy.out").open("wb"),
        preexec_fn=_raise_nofile,
    )


async def drive_blackbox(
    http: aiohttp.ClientSession, base: str, target_port: int, masters: int, rate: float,
    stop: asyncio.Event, done: list[int],
) -> None:
    """Ask blackbox_exporter for ``rate`` probes a second (64 at most at once), each of another
    master's URL, like a Prometheus with one scrape job per master would."""
    sem = asyncio.Semaphore(64)
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        params = {"module": "http_2xx", "target": f"http://127.0.0.1:{target_port}/m{i}/health"}
        try:
            async with http.get(f"{base}/probe", params=params) as resp:
                if "probe_success 1" in await resp.text():
                    done[0] += 1
        finally:
            sem.release()

    i, start = 0, time.monotonic()
    while not stop.is_set():
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await sem.acquire()
        task = asyncio.create_task(one(i % masters))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


# --- one run -------------------------------------------------------------------------------


@dataclass
class Window:
    seconds: float = 0.0
    requests: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    states: dict[str, tuple[int, int]] = field(default_factory=dict)  # /state: (200s, 304s)


@dataclass
class Run:
    masters: int
    interval: float
    scheduled: float
    ours_rate_a: float = 0.0
    ours_us_a: float = 0.0
    ours_rate_b: float = 0.0
    ours_us_b: float = 0.0
    scrape_p50_ms: float = 0.0
    scrape_p99_ms: float = 0.0
    scrapes: int = 0
    success: float = 0.0
    ours_rss_a_mib: float = 0.0  # after window A: before the first scrape
    ours_rss_mib: float = 0.0
    bb_scheduled: float = 0.0
    bb_rate: float = 0.0
    bb_us: float = 0.0
    bb_rss_mib: float = 0.0
    hap_servers: int = 0
    hap_scheduled: float = 0.0
    hap_rate: float = 0.0
    hap_us: float = 0.0
    hap_rss_mib: float = 0.0


def _rss_mib(proc: subprocess.Popen) -> float:
    """RSS of a child still running (0 if it died: then its figures are missing)."""
    return rss_kib(proc.pid) / 1024 if proc.poll() is None else 0.0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _success_share(text: str) -> float:
    ok = total = 0.0
    for line in text.splitlines():
        if line.startswith("ha_master_probes_total{"):
            value = float(line.rsplit(" ", 1)[1])
            total += value
            if 'result="success"' in line:
                ok += value
    return ok / total if total else 0.0


async def measure(
    nginx: Nginx, pids: dict[str, int], seconds: float, scrape: str | None = None,
    scrape_rate: float = 2.0, http: aiohttp.ClientSession | None = None,
) -> tuple[Window, list[float], str]:
    """Requests and CPU of each client over ``seconds``; with ``scrape``, /metrics is fetched
    ``scrape_rate`` times a second meanwhile (one at a time) and each duration kept."""
    durations: list[float] = []
    last = ""
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    t0 = time.monotonic()
    await nginx.flush()  # the count as of t0 (the signal), read 50 ms later
    req0 = {c: nginx.requests(c) for c in nginx.ports}
    st0 = {c: nginx.states(c) for c in nginx.ports}
    end = t0 + seconds
    if scrape is None or http is None:
        await asyncio.sleep(seconds)
    else:
        n = 0
        while time.monotonic() < end:
            due = t0 + n / scrape_rate
            if (delay := due - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            s0 = time.perf_counter()
            try:
                async with http.get(scrape) as resp:
                    body = await resp.read()
                last = body.decode()
            except TimeoutError:  # counted at the timeout: the p99 says so
                pass
            durations.append(time.perf_counter() - s0)
            n += 1
        await asyncio.sleep(max(0.0, end - time.monotonic()))
    t1 = time.monotonic()
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    await nginx.flush()
    window = Window(
        seconds=t1 - t0,
        requests={c: nginx.requests(c) - req0[c] for c in nginx.ports},
        cpu=cpu,
        states={c: (ok - st0[c][0], same - st0[c][1])
                for c in nginx.ports for ok, same in [nginx.states(c)]},
    )
    return window, durations, last


async def run_one(args: argparse.Namespace, tree: Path, masters: int, interval: float) -> Run:
    tmp = Path(tempfile.mkdtemp(prefix="bench-process-"))
    run = Run(masters, interval, masters / interval)
    procs: list[subprocess.Popen] = []
    try:
        nginx = start_nginx(tmp, ["ours", "blackbox", "haproxy"])
        procs.append(nginx.proc)
        exporter, base = start_exporter(
            tmp, tree, nginx.ports["ours"], masters, interval, args.loop
        )
        procs.append(exporter)
        pids = {"ours": exporter.pid}
        bb = None if args.blackbox_rate <= 0 else start_blackbox(tmp)
        if bb is not None:
            procs.append(bb[0])
            pids["blackbox"] = bb[0].pid
        hap_servers = min(masters, args.haproxy_servers)
        hap = start_haproxy(tmp, nginx.ports["haproxy"], hap_servers, interval) if (
            hap_servers > 0) else None
        if hap is not None:
            procs.append(hap)
            pids["haproxy"] = hap.pid
            run.hap_servers, run.hap_scheduled = hap_servers, hap_servers / interval
        stop = asyncio.Event()
        bb_done = [0]
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            driving = None
            if bb is not None:
                run.bb_scheduled = args.blackbox_rate
                driving = asyncio.create_task(drive_blackbox(
                    http, bb[1], nginx.ports["blackbox"], masters, args.blackbox_rate, stop,
                    bb_done,
                ))
            await asyncio.sleep(max(3.0, 2 * interval))  # warm: connections open, code hot
            spy = py_spy(args, exporter.pid, f"{masters}x{interval:g}-{args.py_spy_window}",
                         args.py_spy_window == "A")
            a, _, _ = await measure(nginx, pids, args.seconds)
            run.ours_rss_a_mib = _rss_mib(exporter)
            if spy is not None:
                spy.wait(30)
            spy = py_spy(args, exporter.pid, f"{masters}x{interval:g}-{args.py_spy_window}",
                         args.py_spy_window == "B")
            b, durations, last = await measure(
                nginx, pids, args.seconds, f"{base}/metrics", args.scrapes_per_second, http
            )
            if spy is not None:
                spy.wait(30)
            stop.set()
            if driving is not None:
                await driving
        run.ours_rate_a = a.requests["ours"] / a.seconds
        run.ours_us_a = 1e6 * a.cpu["ours"] / max(1, a.requests["ours"])
        run.ours_rate_b = b.requests["ours"] / b.seconds
        run.ours_us_b = 1e6 * b.cpu["ours"] / max(1, b.requests["ours"])
        run.scrapes = len(durations)
        run.scrape_p50_ms = 1000 * _pct(durations, 0.5)
        run.scrape_p99_ms = 1000 * _pct(durations, 0.99)
        run.success = _success_share(last)
        run.ours_rss_mib = _rss_mib(exporter)
        total = {k: a.cpu.get(k, 0.0) + b.cpu.get(k, 0.0) for k in pids}
        reqs = {k: a.requests[k] + b.requests[k] for k in nginx.ports}
        secs = a.seconds + b.seconds
        if bb is not None:
            run.bb_rate = reqs["blackbox"] / secs
            run.bb_us = 1e6 * total["blackbox"] / max(1, reqs["blackbox"])
            run.bb_rss_mib = _rss_mib(bb[0])
        if hap is not None:
            run.hap_rate = reqs["haproxy"] / secs
            run.hap_us = 1e6 * total["haproxy"] / max(1, reqs["haproxy"])
            run.hap_rss_mib = _rss_mib(hap)
        return run
    finally:
        stop_all(procs, tmp, args.keep)


def py_spy(args: argparse.Namespace, pid: int, name: str, now: bool = True
           ) -> subprocess.Popen | None:
    """With ``--py-spy DIR`` (and ``now``): py-spy records ``pid`` for ``--seconds`` at 200 Hz
    without pausing it (raw folded stacks into DIR; it runs on the load core)."""
    if not args.py_spy or not now:
        return None
    args.py_spy.mkdir(parents=True, exist_ok=True)
    out = args.py_spy / f"{name}-{time.strftime('%H%M%S')}.txt"
    return subprocess.Popen(
        ["py-spy", "record", "--nonblocking", "-r", "200", "-d", str(int(args.seconds)),
         "-f", "raw", "-o", str(out), "-p", str(pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def stop_all(procs: list[subprocess.Popen], tmp: Path, keep: bool) -> None:
    """Stop what a run started (the last started first), then drop its temp dir."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if not keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"  (kept {tmp})")


def median_run(runs: list[Run]) -> Run:
    """Each figure's median over the repeats."""
    out = Run(runs[0].masters, runs[0].interval, runs[0].scheduled)
    for name, value in asdict(out).items():
        if isinstance(value, float) and name not in ("interval", "scheduled"):
            setattr(out, name, statistics.median(getattr(r, name) for r in runs))
    out.scrapes = int(statistics.median(r.scrapes for r in runs))
    out.hap_servers = runs[0].hap_servers
    return out


def show(r: Run, label: str) -> str:
    lines = [
        f"{label}: {r.masters:,} masters every {r.interval:g}s "
        f"(scheduled {r.scheduled:,.0f} probes/s)",
        f"  ha-exporter      A (no scrapes): {r.ours_rate_a:,.0f} probes/s kept, "
        f"{r.ours_us_a:.0f} CPU-µs/probe, {100 * r.ours_rate_a * r.ours_us_a / 1e6:.0f}% of "
        f"its core",
        f"  ha-exporter      B ({r.scrapes} scrapes): {r.ours_rate_b:,.0f} probes/s kept, "
        f"{r.ours_us_b:.0f} CPU-µs/probe (scrapes included), /metrics p50 "
        f"{r.scrape_p50_ms:.0f} ms p99 {r.scrape_p99_ms:.0f} ms; success "
        f"{100 * r.success:.1f}%; RSS {r.ours_rss_a_mib:.1f} MiB before any scrape, "
        f"{r.ours_rss_mib:.1f} MiB after",
    ]
    if r.bb_scheduled:
        lines.append(
            f"  blackbox_exporter: {r.bb_rate:,.0f} of {r.bb_scheduled:,.0f} probes/s, "
            f"{r.bb_us:.0f} CPU-µs/probe; RSS {r.bb_rss_mib:.0f} MiB"
        )
    if r.hap_servers:
        lines.append(
            f"  haproxy checker:  {r.hap_rate:,.0f} of {r.hap_scheduled:,.0f} checks/s "
            f"({r.hap_servers:,} servers), {r.hap_us:.0f} CPU-µs/check; RSS "
            f"{r.hap_rss_mib:.0f} MiB"
        )
    return "\n".join(lines)


# --- checkpoint rounds and the probe schedule (--checkpoints) -------------------------------

#: Longest wait for every master's first full checkpoint before a window (a run fails past it).
WARM_LIMIT = 90.0


@dataclass
class Lateness:
    """The probe engine's figures read from one scrape."""

    buckets: list[tuple[float, float]]  # (le, cumulative probes), +Inf last
    lag_sum: float
    skipped: float

    def since(self, before: Lateness) -> Lateness:
        return Lateness(
            [(le, n - n0) for (le, n), (_, n0) in zip(self.buckets, before.buckets, strict=True)],
            self.lag_sum - before.lag_sum, self.skipped - before.skipped,
        )

    @property
    def started(self) -> float:
        return self.buckets[-1][1] if self.buckets else 0.0

    def quantile(self, q: float) -> float:
        """PromQL's ``histogram_quantile``: linear inside the bucket the rank falls in (from 0
        in the first), the last finite bound when it falls in +Inf."""
        rank, lower, below = q * self.started, 0.0, 0.0
        for le, n in self.buckets:
            if n >= rank and n > below:
                if le == float("inf"):
                    return lower
                return lower + (le - lower) * (rank - below) / (n - below)
            lower, below = le, n
        return lower

    def share_over(self, bound: float) -> float:
        """Share of the probes started later than ``bound`` (one of the bucket bounds)."""
        within = next((n for le, n in self.buckets if le >= bound), self.started)
        return 1 - within / self.started if self.started else 0.0


def lateness(text: str) -> Lateness:
    """``ha_probe_schedule_lag_seconds`` and ``ha_probe_rounds_skipped_total`` of a scrape."""
    buckets: list[tuple[float, float]] = []
    lag_sum = skipped = 0.0
    start = text.find("ha_probe_")
    for line in text[max(0, start - 1):].splitlines() if start >= 0 else ():
        if line.startswith("ha_probe_schedule_lag_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
        elif line.startswith("ha_probe_schedule_lag_seconds_sum "):
            lag_sum = float(line.rsplit(" ", 1)[1])
        elif line.startswith("ha_probe_rounds_skipped_total "):
            skipped = float(line.rsplit(" ", 1)[1])
    if not buckets:
        raise RunFailed("the scrape has no ha_probe_schedule_lag_seconds")
    return Lateness(buckets, lag_sum, skipped)


@dataclass
class CheckpointRun:
    masters: int
    interval: float
    checkpoint_every: float  # 0: interval 1 h, only the start-up round (before the window)
    scheduled: float
    probes_s: float = 0.0
    us_per_probe: float = 0.0
    core: float = 0.0  # share of the exporter's core busy
    lag_p50_ms: float = 0.0
    lag_p99_ms: float = 0.0
    lag_mean_ms: float = 0.0
    late_100ms: float = 0.0  # share of probes started more than 100 ms late
    skipped: float = 0.0  # slots dropped in the window
    started: float = 0.0  # probes started in the window (the histogram's count)
    state_200_s: float = 0.0
    state_304_s: float = 0.0
    first_full_s: float = 0.0  # ready -> every master read in full once (start-up round)
    rss_mib: float = 0.0


async def _lateness_now(http: aiohttp.ClientSession, base: str) -> Lateness:
    async with http.get(f"{base}/metrics") as resp:
        return lateness((await resp.read()).decode())


async def run_checkpoints(
    args: argparse.Namespace, tree: Path, masters: int, interval: float, every: float
) -> CheckpointRun:
    """One run: the exporter probing ``masters`` every ``interval`` s, checkpointing every
    ``every`` s (0: not after start-up), measured over one window of ``--seconds``."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-checkpoints-"))
    run = CheckpointRun(masters, interval, every, masters / interval)
    procs: list[subprocess.Popen] = []
    try:
        nginx = start_nginx(tmp, ["ours"])
        procs.append(nginx.proc)
        exporter, base = start_exporter(
            tmp, tree, nginx.ports["ours"], masters, interval, args.loop,
            f"{int(every * 1000)}ms" if every else NO_CHECKPOINTS,
        )
        procs.append(exporter)
        ready = time.monotonic()
        warm = max(3.0, 2 * interval)  # connections open, code hot
        # and the start-up round over (masters start healthy: it reads every one in full), so
        # that with checkpoints on the rounds are 304s and off none runs in the window
        while nginx.states("ours")[0] < masters:
            if time.monotonic() - ready > WARM_LIMIT:
                raise RunFailed(f"{nginx.states('ours')[0]} of {masters} masters "
                                f"checkpointed after {WARM_LIMIT:g} s")
            await asyncio.sleep(0.5)  # nginx writes its logs out every second
        run.first_full_s = time.monotonic() - ready
        warm = max(warm, run.first_full_s + every)
        await asyncio.sleep(max(0.0, ready + warm - time.monotonic()))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            before = await _lateness_now(http, base)
            variant = f"every{every:g}s" if every else "off"
            spy = py_spy(args, exporter.pid, f"{masters}x{interval:g}-checkpoints-{variant}")
            window, _, _ = await measure(nginx, {"ours": exporter.pid}, args.seconds)
            if spy is not None:
                spy.wait(30)
            late = (await _lateness_now(http, base)).since(before)
        run.rss_mib = _rss_mib(exporter)
        probes, secs = window.requests["ours"], window.seconds
        run.probes_s = probes / secs
        run.us_per_probe = 1e6 * window.cpu["ours"] / max(1, probes)
        run.core = window.cpu["ours"] / secs
        run.lag_p50_ms = 1000 * late.quantile(0.5)
        run.lag_p99_ms = 1000 * late.quantile(0.99)
        run.lag_mean_ms = 1000 * late.lag_sum / max(1.0, late.started)
        run.late_100ms = late.share_over(0.1)
        run.skipped, run.started = late.skipped, late.started
        ok, same = window.states["ours"]
        run.state_200_s, run.state_304_s = ok / secs, same / secs
        return run
    finally:
        stop_all(procs, tmp, args.keep)


def show_checkpoints(r: CheckpointRun, label: str) -> str:
    every = f"every {r.checkpoint_every:g}s" if r.checkpoint_every else "off"
    return (
        f"{label}: {r.masters:,} masters every {r.interval:g}s, checkpoints {every}: "
        f"{r.probes_s:,.0f} of {r.scheduled:,.0f} probes/s, {r.us_per_probe:.0f} CPU-µs/probe "
        f"(checkpoints included), {100 * r.core:.0f}% of its core; lag p50 "
        f"{r.lag_p50_ms:.1f} ms p99 {r.lag_p99_ms:.1f} ms mean {r.lag_mean_ms:.1f} ms, "
        f"{100 * r.late_100ms:.2f}% over 100 ms; skipped {r.skipped:,.0f} of "
        f"{r.started + r.skipped:,.0f} slots; /state {r.state_200_s:,.0f} 200/s "
        f"{r.state_304_s:,.0f} 304/s; every master read in full {r.first_full_s:.1f} s after "
        f"ready; RSS {r.rss_mib:.0f} MiB"
    )


def spread(runs: list[CheckpointRun]) -> str:
    """Median (min to max) of each figure over the runs."""
    out = []
    for name in ("probes_s", "us_per_probe", "core", "lag_p50_ms", "lag_p99_ms", "lag_mean_ms",
                 "late_100ms", "skipped", "state_304_s", "first_full_s", "rss_mib"):
        values = [getattr(r, name) for r in runs]
        scale = 100 if name in ("core", "late_100ms") else 1
        digits = (1 if name.startswith("lag_") or name == "first_full_s"
                  else 2 if name == "late_100ms" else 0)
        low, mid, high = (scale * v for v in (min(values), statistics.median(values),
                                               max(values)))
        out.append(f"{name} {mid:,.{digits}f} ({low:,.{digits}f} to {high:,.{digits}f})")
    return "; ".join(out)


async def main_checkpoints(args: argparse.Namespace, tree: Path, label: str) -> None:
    """Per config, ``--repeat`` pairs (checkpoints off and on, the order alternating)."""
    for spec in args.configs or ["2000x2", "10000x2"]:
        n, interval = spec.split("x")
        runs: dict[float, list[CheckpointRun]] = {0.0: [], args.checkpoints: []}
        for i in range(args.repeat):
            order = (0.0, args.checkpoints) if i % 2 == 0 else (args.checkpoints, 0.0)
            for every in order:
                try:
                    r = await run_checkpoints(args, tree, int(n), float(interval), every)
                except (RunFailed, TimeoutError, aiohttp.ClientError) as exc:
                    print(f"run {i + 1}/{args.repeat} of {spec} (checkpoints "
                          f"{every:g}s) failed: {exc}", flush=True)
                    continue
                print(show_checkpoints(r, f"run {i + 1}/{args.repeat} (load "
                                          f"{os.getloadavg()[0]:.2f})"), flush=True)
                if args.json:
                    with args.json.open("a") as f:
                        f.write(json.dumps({"label": label, **asdict(r)}) + "\n")
                runs[every].append(r)
        for every, done in runs.items():
            if done:
                what = f"every {every:g}s" if every else "off"
                print(f"MEDIAN (min to max) of {len(done)}, {spec}, checkpoints {what}: "
                      f"{spread(done)}", flush=True)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+",
                    help="MASTERSxINTERVAL_SECONDS (default 1000x1 2000x1 10000x2; with "
                    "--checkpoints 2000x2 10000x2)")
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each window")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rev", help="benchmark this git revision (git archive) instead")
    ap.add_argument("--tree", type=Path,
                    help="benchmark the exporter package in this directory instead (e.g. a "
                    "copy of a working tree that others are editing)")
    ap.add_argument("--blackbox-rate", type=float, default=500.0)
    ap.add_argument("--haproxy-servers", type=int, default=1000)
    ap.add_argument("--scrapes-per-second", type=float, default=2.0)
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="",
                    help="the exporter's event loop (default: its own choice, uvloop if installed)")
    ap.add_argument("--json", type=Path, help="append every run's figures here (JSON lines)")
    ap.add_argument("--py-spy", type=Path, metavar="DIR",
                    help="profile the exporter in a window with py-spy (raw folded stacks)")
    ap.add_argument("--py-spy-window", choices=["A", "B"], default="A",
                    help="the window --py-spy profiles (B: with scrapes)")
    ap.add_argument("--checkpoints", type=float, metavar="SECONDS",
                    help="instead: probe lateness with checkpoint rounds every SECONDS vs none")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs (logs, configs)")
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs two cores: the exporter alone on core 0, the load on core 1")
    os.sched_setaffinity(0, {LOAD_CORE})
    _raise_nofile()
    with tempfile.TemporaryDirectory(prefix="bench-tree-") as scratch:
        tree = export_rev(args.rev, Path(scratch)) if args.rev else (args.tree or REPO)
        label = (f"rev {args.rev}" if args.rev else f"tree {args.tree}" if args.tree
                 else "this tree")
        print(f"machine: {machine()}; {label}; {time.strftime('%Y-%m-%d %H:%M')}; load "
              f"{os.getloadavg()[0]:.2f}")
        if args.checkpoints:
            await main_checkpoints(args, tree, label)
            return
        for spec in args.configs or ["1000x1", "2000x1", "10000x2"]:
            n, interval = spec.split("x")
            runs = []
            for i in range(args.repeat):
                try:
                    r = await run_one(args, tree, int(n), float(interval))
                except (RunFailed, TimeoutError, aiohttp.ClientError) as exc:
                    print(f"run {i + 1}/{args.repeat} of {spec} failed: {exc}", flush=True)
                    continue
                print(show(r, f"run {i + 1}/{args.repeat}"), flush=True)
                if args.json:
                    with args.json.open("a") as f:
                        f.write(json.dumps({"label": label, **asdict(r)}) + "\n")
                runs.append(r)
            if len(runs) > 1:
                print(show(median_run(runs), f"MEDIAN of {len(runs)} ({label})"), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
