"""The pieces bench_cluster.py starts: a real etcd, nginx standing for most of a big fleet, a few
real `ha-exporter master` processes, and `ha-exporter run` replicas (cluster mode or single).

Built on what exists: bench.bench_process (nginx's process, log counting and flushing, the
/state snapshot, core pinning, the open-files limit) and the test harness (tests.cluster's
etcd on unix sockets, tests.processes's child processes that say where they listen).

The fleet: ``na{i}`` masters configured active (their /health says active, serving the duty
named after them) and ``ns{i}`` configured standby, all served by one nginx on one port by
path, region ``bulk``, ``failover: never`` (nginx cannot be activated, so none is ever a backup
and none is failed over). Beside them, pairs of real masters: ``a{k}`` active and ``s{k}``
standby in region ``r{k}``, ``a{k}`` allowing only ``r{k}`` as backup region, so killing
``a{k}`` moves its duty to ``s{k}``, and ``s{k}``'s own /health says when it serves it.

nginx counts /health requests per observer (the ``X-HA-Observer`` header each replica sends in
cluster mode) in an access log each, plus one log of every /health and one of every /state.

Every bulk master reports a queue of 3, unless the file ``churn`` exists in the stack's
directory (``Stack.churn(True)``): then each answer's queue is the last digit of nginx's
millisecond clock, 0 to 9, a queue that moves every probe.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.bench_process import (
    EXPORTER_CORE,
    LOAD_CORE,
    NOFILE,
    Nginx,
    pinned,
    snapshot,
    spawn_nginx,
)
from bench.common import cpu_seconds, free_port, rss_kib, wait_http
from tests.cluster.etcd_server import EtcdServer
from tests.processes import EXPORTER_LISTENING, MASTER_LISTENING, Proc, exporter_cli

#: nginx's answer for a bulk master, ``$m`` its name (the shape `ha-exporter master` sends).
BULK_BODY = (
    '{"status": "ok", "queue_length": $q, "active_messages": 1, "cpu_percent": 12.5, '
    '"memory_percent": 40.0, "name": "$m", "region": "bulk", "active": %s, "duties": %s, '
    '"epoch": 0}'
)
ALL = "all"  # nginx's log of every /health request, whoever sent it
STATE_LOGS = ".state.log"
START_TIMEOUT = 120.0


# --- etcd ----------------------------------------------------------------------------------


class PinnedEtcd(EtcdServer):
    """tests.cluster's etcd (unix sockets, one member), on the load core."""

    def argv(self) -> list[str]:
        return pinned(LOAD_CORE, super().argv())

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    async def metrics(self) -> dict[str, float]:
        """etcd's own /metrics (on the client socket), every sample without labels."""
        connector = aiohttp.UnixConnector(path=str(self.socket))
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=10)
        ) as http, http.get("http://localhost/metrics") as resp:
            text = await resp.text()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, _, value = line.partition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    continue
        return out


#: etcd counters read around a window: the store's revision (one per write transaction),
#: puts and deletes applied, transactions, bytes put, raft proposals, lease keep-alives.
ETCD_COUNTERS = {
    "revisions": "etcd_debugging_mvcc_current_revision",
    "puts": "etcd_mvcc_put_total",
    "deletes": "etcd_mvcc_delete_total",
    "txns": "etcd_mvcc_txn_total",
    "put_bytes": "etcd_debugging_mvcc_total_put_size_in_bytes",
    "proposals": "etcd_server_proposals_committed_total",
    "lease_renewals": "etcd_debugging_lease_renewed_total",
    "ranges": "etcd_mvcc_range_total",
    "keys": "etcd_debugging_mvcc_keys_total",
}


def etcd_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {short: after.get(name, 0.0) - before.get(name, 0.0)
            for short, name in ETCD_COUNTERS.items()}


# --- nginx ---------------------------------------------------------------------------------


def start_fleet_nginx(tmp: Path, observers: list[str]) -> tuple[Nginx, int]:
    """nginx answering every bulk master's /health on one port; counts by observer. Returns
    bench_process's Nginx (clients: ALL and each observer, all on the same port) and the port."""
    port = free_port()
    keys = [ALL, *observers]
    logs = {c: tmp / f"nginx-{i}.log" for i, c in enumerate(keys)}
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "www"):
        (tmp / sub).mkdir(exist_ok=True)
    (tmp / "www" / "state.json").write_bytes(snapshot())
    maps = "\n".join(
        f'  map "$uri|$http_x_ha_observer" $obs{i} {{ "~/health[|]{o}$" 1; default 0; }}'
        for i, o in enumerate(observers, 1))
    per_observer = "\n".join(
        f"    access_log {logs[o]} one buffer=16k flush=1s if=$obs{i};"
        for i, o in enumerate(observers, 1))
    active = BULK_BODY % ("true", '["$m"]')
    standby = BULK_BODY % ("false", "[]")
    http = f"""  map $msec $qdigit {{ "~[.][0-9][0-9](?<d>[0-9])$" $d; default 0; }}
{maps}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    access_log {logs[ALL]} one buffer=16k flush=1s if=$health;
    access_log {logs[ALL].with_suffix(STATE_LOGS)} status buffer=16k flush=1s if=$state;
{per_observer}
    location ~ ^/(?<m>na[0-9]+)/health$ {{ default_type application/json; set $q 3;
                                           if (-f {tmp}/churn) {{ set $q $qdigit; }}
                                           return 200 '{active}'; }}
    location ~ ^/(?<m>ns[0-9]+)/health$ {{ default_type application/json; set $q 3;
                                           if (-f {tmp}/churn) {{ set $q $qdigit; }}
                                           return 200 '{standby}'; }}
    location ~ /state$ {{ root {tmp}/www; default_type application/json;
                         try_files /state.json =404; }}
    location / {{ default_type application/json; return 404 '{{"error": "not here"}}'; }}
  }}
"""
    proc = spawn_nginx(tmp, NOFILE, NOFILE - 500, http)
    try:
        wait_http(f"http://127.0.0.1:{port}/na0/health")
    except RuntimeError:
        proc.kill()
        proc.wait(5)
        raise RuntimeError(f"nginx did not start: {(tmp / 'nginx.out').read_text()[-2000:]}"
                           ) from None
    return Nginx(proc, {c: port for c in keys}, logs), port


# --- the fleet -----------------------------------------------------------------------------


def fleet(port: int, bulk: int, real: dict[str, str], pairs: int) -> list[dict[str, Any]]:
    """``masters:`` of every replica: ``bulk`` nginx masters (half active, half standby) and
    ``pairs`` real pairs ``a{k}``/``s{k}`` at the URLs in ``real``."""
    out: list[dict[str, Any]] = []
    for k in range(pairs):
        out.append({"name": f"a{k}", "url": real[f"a{k}"], "region": f"r{k}", "role": "active",
                    "priority": 1, "failover_regions": [f"r{k}"]})
        out.append({"name": f"s{k}", "url": real[f"s{k}"], "region": f"r{k}",
                    "role": "standby", "priority": 1})
    for i in range(bulk):
        kind = "na" if i % 2 == 0 else "ns"
        out.append({"name": f"{kind}{i}", "url": f"http://127.0.0.1:{port}/{kind}{i}",
                    "region": "bulk", "role": "active" if kind == "na" else "standby",
                    "failover": "never"})
    return out


async def start_real_masters(tmp: Path, pairs: int) -> dict[str, Proc]:
    """``a{k}`` (active) and ``s{k}`` (standby) for each pair: `ha-exporter master` on port 0,
    on the load core."""
    procs = {}
    for k in range(pairs):
        for name, role in ((f"a{k}", "active"), (f"s{k}", "standby")):
            procs[name] = Proc(pinned(LOAD_CORE, exporter_cli(
                "master", "--name", name, "--port", "0", "--region", f"r{k}", "--role", role)),
                tmp / f"master-{name}.log", listening=MASTER_LISTENING)
    await asyncio.gather(*(p.listening(START_TIMEOUT) for p in procs.values()))
    return procs


# --- replicas ------------------------------------------------------------------------------


@dataclass
class Replica:
    """One `ha-exporter run`, on the exporter core, its own directory, config and state."""

    member: str
    home: Path
    config: Path
    proc: Proc | None = None
    base: str = ""
    starts: int = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.popen.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.popen.poll() is None

    async def start(self) -> Replica:
        self.proc = Proc(pinned(EXPORTER_CORE, exporter_cli(
            "--log-level", "info", "run", "--config", str(self.config), "--insecure-no-auth")),
            self.home / "exporter.log", listening=EXPORTER_LISTENING)
        self.starts += 1
        self.base = await self.proc.listening(START_TIMEOUT)
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill(signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss_mib(self) -> float:
        return rss_kib(self.pid) / 1024 if self.alive else 0.0

    def log_lines(self, *needles: str) -> list[str]:
        text = self.proc.output() if self.proc else ""
        return [ln for ln in text.splitlines() if any(n in ln for n in needles)]


def write_config(home: Path, masters: list[dict[str, Any]], probe: dict[str, Any],
                 failover: dict[str, Any], cluster: dict[str, Any] | None) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "state_path": str(home / "state.db"),
        "probe": probe,
        "masters": masters,
        "failover": failover,
    }
    if cluster is not None:
        cfg["cluster"] = cluster
    path = home / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@dataclass
class Stack:
    """etcd (cluster mode only), nginx, real masters and replicas; ``stop()`` kills them all."""

    tmp: Path
    replicas: dict[str, Replica] = field(default_factory=dict)
    etcd: PinnedEtcd | None = None
    nginx: Nginx | None = None
    masters: dict[str, Proc] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    fleet: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    async def start(cls, tmp: Path, *, bulk: int, pairs: int, replicas: int,
                    probe: dict[str, Any], failover: dict[str, Any],
                    cluster: dict[str, Any] | None, observers_logged: int = 3,
                    start_replicas: int | None = None) -> Stack:
        """``replicas`` 0: one single-node exporter (no etcd). ``start_replicas``: how many of
        the configured replicas start now (the others by ``add_replica``)."""
        stack = cls(tmp)
        try:
            members = [f"exporter-{i}" for i in range(1, max(replicas, observers_logged) + 1)]
            if replicas:
                stack.etcd = PinnedEtcd(tmp / "etcd", "/usr/bin/etcd")
                (tmp / "etcd").mkdir()
                await stack.etcd.start()
            stack.nginx, port = start_fleet_nginx(tmp, members)
            stack.masters = await start_real_masters(tmp, pairs)
            stack.urls = {n: p.url or "" for n, p in stack.masters.items()}
            stack.fleet = fleet(port, bulk, stack.urls, pairs)
            names = members[:replicas] if replicas else ["single"]
            for member in names:
                section = None
                if cluster is not None and replicas:
                    assert stack.etcd is not None
                    section = {"etcd": {"endpoints": [stack.etcd.endpoint],
                                        "prefix": "/bench"}, "member": member, **cluster}
                home = tmp / member
                stack.replicas[member] = Replica(
                    member, home, write_config(home, stack.fleet, probe, failover, section))
            first = list(stack.replicas.values())[:start_replicas or len(stack.replicas)]
            await asyncio.gather(*(r.start() for r in first))
            return stack
        except BaseException:
            stack.stop()
            raise

    def churn(self, on: bool) -> None:
        """Bulk masters' queues move every probe (0 to 9) while on; 3 otherwise."""
        flag = self.tmp / "churn"
        if on:
            flag.touch()
        else:
            flag.unlink(missing_ok=True)

    def live(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.alive]

    def pids(self) -> dict[str, int]:
        return {r.member: r.pid for r in self.live()}

    def stop(self) -> None:
        """Kill everything this stack started (replicas first); safe to call twice."""
        for r in self.replicas.values():
            try:
                r.stop()
            except Exception as exc:  # still stop the others
                print(f"  stopping {r.member}: {exc}", file=sys.stderr)
        for p in self.masters.values():
            try:
                p.stop()
            except Exception as exc:
                print(f"  stopping a master: {exc}", file=sys.stderr)
        if self.nginx is not None and self.nginx.proc.poll() is None:
            self.nginx.proc.kill()
            self.nginx.proc.wait(10)
        if self.etcd is not None:
            self.etcd.cleanup()

    # --- what the replicas say ---------------------------------------------------------------
    async def cluster_status(self, http: aiohttp.ClientSession, r: Replica,
                             timeout: float = 1.0) -> dict[str, Any] | None:
        try:
            async with http.get(f"{r.base}/api/v1/cluster",
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                return await resp.json() if resp.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None

    async def ready(self, http: aiohttp.ClientSession, r: Replica) -> bool:
        try:
            async with http.get(f"{r.base}/readyz",
                                timeout=aiohttp.ClientTimeout(total=2)) as resp:
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def settled(self, http: aiohttp.ClientSession, timeout: float) -> Replica:
        """Every live replica ready, a member of a cluster of all of them, agreeing on one
        leader that says it leads; that leader (a single node is its own)."""
        deadline = time.monotonic() + timeout
        while True:
            live = self.live()
            states = await asyncio.gather(*(self.cluster_status(http, r) for r in live))
            readies = await asyncio.gather(*(self.ready(http, r) for r in live))
            if all(readies) and all(states):
                if states[0] and states[0].get("mode") == "single":
                    return live[0]
                leaders = {s["leader"]["member"] if s and s["leader"] else None for s in states}
                counts = {len(s["members"]) for s in states if s}
                if len(leaders) == 1 and None not in leaders and counts == {len(live)}:
                    (name,) = leaders
                    lead = self.replicas.get(name or "")
                    if lead is not None and lead.alive and any(
                            s and s["member"] == name and s["leading"] for s in states):
                        return lead
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not settled in {timeout:g} s: ready {readies}, "
                                   f"status {[_brief(s) for s in states]}")
            await asyncio.sleep(0.2)

    async def metrics(self, http: aiohttp.ClientSession, r: Replica) -> str:
        async with http.get(f"{r.base}/metrics",
                            timeout=aiohttp.ClientTimeout(total=30)) as resp:
            return (await resp.read()).decode()

    async def master_health(self, http: aiohttp.ClientSession, name: str) -> dict[str, Any]:
        try:
            async with http.get(f"{self.urls[name]}/health",
                                timeout=aiohttp.ClientTimeout(total=1)) as resp:
                return await resp.json()  # type: ignore[no-any-return]
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return {}


def _brief(s: dict[str, Any] | None) -> str:
    if not s:
        return "no answer"
    lead = s["leader"]["member"] if s.get("leader") else None
    return f"{s.get('member')}: leading={s.get('leading')} leader={lead} " \
           f"members={len(s.get('members', []))}"


def metric_sum(text: str, name: str, where: str = "") -> float:
    """Sum of every sample of ``name`` (with labels containing ``where``) in a scrape."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name):len(name) + 1] in ("{", " ")) and (
                where in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def machine_line() -> str:
    """``lscpu`` model name and ``uptime``'s load average, as the figures are taken."""
    model = "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                      if ln.startswith("Model name")), "?")
    except (OSError, subprocess.TimeoutExpired):
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores, {model}; load {load}"
