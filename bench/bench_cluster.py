"""Cluster mode on a real etcd, measured from outside the processes.

Run: python bench/bench_cluster.py [--quick] [--parts 1 2 3 4] [--json FILE] [--keep]

What runs (everything on 127.0.0.1 and unix sockets; see bench/cluster_stack.py): etcd 3.4
(Debian etcd-server, one member on unix sockets, as tests/cluster/etcd_server.py starts it),
nginx answering /health for the bulk of the fleet by path (as bench_process.py does for big
fleets), a few real `ha-exporter master` processes in pairs (``a{k}`` active, ``s{k}`` its
standby), and `ha-exporter run` replicas in cluster mode (or one single node). The replicas
are pinned to core 0, etcd, nginx, the masters and this driver to core 1.

1. Leader change after SIGKILL of the leader (3 replicas, 100 masters, lease_ttl 2s and 10s):
   the leader and the active master ``a{k}`` are SIGKILLed together; the survivors'
   ``GET /api/v1/cluster`` and ``s{k}``'s ``/health`` are polled every 50 ms: kill -> a survivor
   says it leads, kill -> ``s{k}`` reports ``a{k}``'s duty (the first failover the new leader
   makes). The killed replica is started again (same member, config and state) before the next.
2. Failover end to end at 1,000 masters, cluster mode (3 replicas, observers 2, quorum 2, lease
   10s) vs one single node, the same probe settings (the defaults: 1 s interval, 750 ms
   timeout, threshold 3): SIGKILL ``a{k}``, time until ``s{k}``'s /health reports the duty.
3. Probes per replica at 6,000 masters every 2 s (3,000 probes/s per observer copy), with 1, 2
   and 3 replicas (observers 1; replicas added one at a time to the running cluster), and 3
   replicas with observers 2: each replica's CPU seconds per wall second (/proc/PID/stat),
   probes/s kept (nginx counts each replica's probes by its X-HA-Observer header),
   ``ha_probe_rounds_skipped_total`` growth and schedule lag (two scrapes at the window's ends,
   outside its CPU), RSS.
4. etcd writes (etcd's own /metrics: store revisions, puts, deletes, txns, bytes put, raft
   proposals; and what was written, read back from etcd's history with a watch) in part 2's
   cluster: over a steady window (every master's figures constant), a window where the bulk
   masters' queues move every probe (0 to 9), during each failover, and after the failovers
   with the killed masters still down; also in part 3's windows.

Every part runs under a time limit and kills what it started (its stack) whatever happens.
``--quick``: fewer repeats and shorter windows (about 2.5 minutes); the default run takes about 8.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from bench.bench_process import LOAD_CORE, _raise_nofile, lateness, measure
from bench.cluster_stack import (
    ALL,
    Replica,
    Stack,
    etcd_delta,
    machine_line,
    metric_sum,
)
from bench.common import cpu_seconds

#: The probe defaults, written out: both modes of part 2 and part 1 run exactly these.
PROBE = {"interval": "1s", "timeout": "750ms", "failure_threshold": 3,
         "recovery_threshold": 2, "jitter": 0.1}
FAILOVER = {"cooldown": "1s"}  # every real pair fails once; the rest are defaults
POLL = 0.05


def spread(values: Iterable[float], unit: str = "s", digits: int = 2) -> str:
    v = sorted(values)
    if not v:
        return "no value"
    return (f"min {v[0]:.{digits}f} / median {statistics.median(v):.{digits}f} / max "
            f"{v[-1]:.{digits}f} {unit} (n={len(v)})")


class Report:
    """Prints the figures; keeps the summary lines; appends JSON lines with ``--json``."""

    def __init__(self, json_path: Path | None) -> None:
        self.json_path = json_path
        self.results: list[str] = []

    def say(self, text: str) -> None:
        print(text, flush=True)

    def result(self, text: str) -> None:
        """A summary figure: printed now and again at the end."""
        self.results.append(text.strip())
        self.say(text)

    def record(self, kind: str, **fields: Any) -> None:
        if self.json_path is not None:
            with self.json_path.open("a") as f:
                f.write(json.dumps({"kind": kind, "at": time.strftime("%Y-%m-%d %H:%M:%S"),
                                    "machine": machine_line(), **fields}) + "\n")


async def poll_until(check: Callable[[], Any], timeout: float, what: str,
                     every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(every)


async def master_state(http: aiohttp.ClientSession, r: Replica, name: str) -> str:
    try:
        async with http.get(f"{r.base}/api/v1/masters/{name}",
                            timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return str((await resp.json()).get("state")) if resp.status == 200 else ""
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return ""


async def failover_record(http: aiohttp.ClientSession, r: Replica, master: str
                          ) -> dict[str, Any] | None:
    """The newest failover record of ``master`` on replica ``r`` (history is shared)."""
    try:
        async with http.get(f"{r.base}/api/v1/failovers", params={"master": master,
                                                                  "limit": "5"},
                            timeout=aiohttp.ClientTimeout(total=5)) as resp:
            body = await resp.json()
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return None
    items = body.get("items") if isinstance(body, dict) else body
    return items[0] if items else None


async def duty_served(stack: Stack, http: aiohttp.ClientSession, standby: str, duty: str
                      ) -> bool:
    return duty in ((await stack.master_health(http, standby)).get("duties") or [])


# --- 1. leader change ------------------------------------------------------------------------


async def leader_change(args: argparse.Namespace, rep: Report, ttl: float, repeats: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-cluster-lc{ttl:g}-"))
    rep.say(f"\n== 1. leader change, lease_ttl {ttl:g}s, 3 replicas, 100 masters "
            f"({repeats} kills) [{machine_line()}]")
    stack = await Stack.start(tmp, bulk=100 - 2 * repeats, pairs=repeats, replicas=3,
                              probe=PROBE, failover=FAILOVER,
                              cluster={"lease_ttl": f"{ttl:g}s", "observers": 2, "quorum": 2})
    leads, keys, duties = [], [], []
    try:
        async with aiohttp.ClientSession() as http:
            for k in range(repeats):
                leader = await stack.settled(http, 60 + ttl)
                a, s = f"a{k}", f"s{k}"
                await poll_until(lambda a=a, s=s, leader=leader: _both_healthy(
                    http, leader, a, s), 30, f"{a} and {s} healthy")
                status = await stack.cluster_status(http, leader, 5) or {}
                observers = [m["member"] for m in status.get("members", [])
                             if a in m["masters"]]
                survivors = [r for r in stack.live() if r is not leader]
                load = os.getloadavg()[0]
                wall0, t0 = time.time(), time.monotonic()
                leader.kill()
                stack.masters[a].kill()
                t_lead = t_key = t_duty = None
                new = None
                deadline = t0 + ttl + 45
                tick = 0
                while (t_lead is None or t_duty is None) and time.monotonic() < deadline:
                    tick += 1
                    got = await asyncio.gather(
                        *(stack.cluster_status(http, r, 1.0) for r in survivors),
                        duty_served(stack, http, s, a))
                    now = time.monotonic() - t0
                    for st in got[:-1]:
                        if not st:
                            continue
                        named = st["leader"]["member"] if st.get("leader") else None
                        if t_key is None and named not in (None, leader.member):
                            t_key = now
                        if t_lead is None and st.get("leading"):
                            t_lead, new = now, st["member"]
                    if t_duty is None and got[-1]:
                        t_duty = now
                    await asyncio.sleep(max(0.0, t0 + tick * POLL - time.monotonic()))
                record = None
                if new is not None:
                    record = await failover_record(http, stack.replicas[new], a)
                detect = (f"move started {record['started'] - wall0:.2f} s after the kill, "
                          f"took {record.get('duration', 0):.2f} s, {record.get('result')}"
                          if record else "no failover record")
                rep.say(f"  kill {k + 1}: killed {leader.member} (observer of {a}: "
                        f"{leader.member in observers}); leader key taken "
                        f"{_s(t_key)}, {new} leading {_s(t_lead)}, {s} serves {a} "
                        f"{_s(t_duty)} ({detect}); load {load:.2f}")
                rep.record("leader_change", ttl=ttl, kill=k + 1, killed=leader.member,
                           observer=leader.member in observers, new=new, key_s=t_key,
                           leading_s=t_lead, duty_s=t_duty, record=record, load=load)
                if t_lead is not None:
                    leads.append(t_lead)
                if t_key is not None:
                    keys.append(t_key)
                if t_duty is not None:
                    duties.append(t_duty)
                await leader.start()  # back, same member, config and state
        rep.result(f"  RESULT lease_ttl {ttl:g}s: kill -> leader key taken: {spread(keys)}")
        rep.result(f"  RESULT lease_ttl {ttl:g}s: kill -> new leader says it leads: "
                   f"{spread(leads)}")
        rep.result(f"  RESULT lease_ttl {ttl:g}s: kill -> first failover served (standby's "
                   f"/health): {spread(duties)}  [{machine_line()}]")
        _problems(rep, stack)
    finally:
        stack.stop()
        _cleanup(tmp, args.keep)


async def _both_healthy(http: aiohttp.ClientSession, r: Replica, a: str, s: str) -> bool:
    return all(x == "healthy" for x in await asyncio.gather(
        master_state(http, r, a), master_state(http, r, s)))


def _s(t: float | None) -> str:
    return f"{t:.2f} s" if t is not None else "never (deadline)"


# --- 2 and 4. failover at 1,000 masters, etcd writes ------------------------------------------


async def failover_e2e(args: argparse.Namespace, rep: Report, cluster: bool, kills: int,
                       steady: float) -> list[float]:
    mode = "cluster (3 replicas, observers 2, quorum 2, lease_ttl 10s)" if cluster else \
        "single node"
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-fo-"))
    rep.say(f"\n== 2. failover end to end, 1,000 masters, {mode} ({kills} kills) "
            f"[{machine_line()}]")
    stack = await Stack.start(
        tmp, bulk=1000 - 2 * kills, pairs=kills, replicas=3 if cluster else 0, probe=PROBE,
        failover=FAILOVER, cluster={"observers": 2, "quorum": 2} if cluster else None)
    times: list[float] = []
    per_failover: list[dict[str, float]] = []
    try:
        async with aiohttp.ClientSession() as http:
            leader = await stack.settled(http, 90)
            for k in range(kills):
                await poll_until(lambda k=k: _both_healthy(http, leader, f"a{k}", f"s{k}"),
                                 60, f"a{k} and s{k} healthy")
            # one checkpoint round after every master was seen (every replica checkpoints
            # the active masters every 10 s, the first round found none serving)
            await asyncio.sleep(12)
            if cluster and steady:
                await steady_writes(rep, stack, steady,
                                    "steady state, 3 replicas, 1,000 masters (queues constant)")
                stack.churn(True)  # every bulk master's queue moves each probe (0 to 9)
                await asyncio.sleep(3)
                await steady_writes(rep, stack, steady / 3,
                                    "3 replicas, 1,000 masters whose queues move every probe "
                                    "(0 to 9)")
                stack.churn(False)
                await asyncio.sleep(5)
            for k in range(kills):
                a, s = f"a{k}", f"s{k}"
                await poll_until(lambda a=a, s=s: _both_healthy(http, leader, a, s), 30,
                                 f"{a} and {s} healthy")
                e0 = await stack.etcd.metrics() if stack.etcd else {}
                rev0 = int(e0.get("etcd_debugging_mvcc_current_revision", 0))
                load = os.getloadavg()[0]
                wall0, t0 = time.time(), time.monotonic()
                stack.masters[a].kill()
                t_duty = None
                tick = 0
                while t_duty is None and time.monotonic() < t0 + 40:
                    tick += 1
                    if await duty_served(stack, http, s, a):
                        t_duty = time.monotonic() - t0
                    await asyncio.sleep(max(0.0, t0 + tick * POLL - time.monotonic()))
                extra = ""
                writes: dict[str, float] = {}
                if stack.etcd is not None:  # the failover's writes: kill to 3 s after served
                    await asyncio.sleep(3)
                    span = time.monotonic() - t0
                    writes = etcd_delta(e0, await stack.etcd.metrics())
                    keys = await changed_keys(stack, rev0)
                    extra = (f"; etcd over kill+{span:.1f} s: {writes['revisions']:.0f} write "
                             f"txns, {writes['puts']:.0f} puts, {writes['deletes']:.0f} "
                             f"deletes, {writes['put_bytes'] / 1024:.1f} KiB put, "
                             f"{writes['proposals']:.0f} proposals; written: {keys}")
                record = await failover_record(http, leader, a)
                detect = (f"move started {record['started'] - wall0:.2f} s after the kill, "
                          f"took {record.get('duration', 0):.2f} s, {record.get('result')}"
                          if record else "no failover record")
                rep.say(f"  kill {k + 1}: {s} serves {a} {_s(t_duty)} ({detect}); load "
                        f"{load:.2f}{extra}")
                rep.record("failover", cluster=cluster, kill=k + 1, duty_s=t_duty,
                           record=record, load=load, etcd=writes)
                if t_duty is not None:
                    times.append(t_duty)
                if writes:
                    per_failover.append({**writes, "span": span})
                await asyncio.sleep(1)
            if cluster and steady:  # the killed masters stay down: their fences are queued
                await steady_writes(rep, stack, steady / 2,
                                    f"steady state after the {kills} failovers, 3 replicas, "
                                    f"1,000 masters (the {kills} killed masters still down)")
        rep.result(f"  RESULT {mode}: kill -> standby serves the duty: {spread(times)}  "
                   f"[{machine_line()}]")
        if per_failover:
            rep.result(
                "  4. etcd during a failover (kill to 3 s after the standby serves): write txns "
                + spread([w["revisions"] for w in per_failover], "", 0) + "; puts "
                + spread([w["puts"] for w in per_failover], "", 0) + "; KiB put "
                + spread([w["put_bytes"] / 1024 for w in per_failover], "", 1)
                + "; write txns/s over the span "
                + spread([w["revisions"] / w["span"] for w in per_failover], "", 1))
        _problems(rep, stack)
    finally:
        stack.stop()
        _cleanup(tmp, args.keep)
    return times


async def steady_writes(rep: Report, stack: Stack, seconds: float, what: str) -> None:
    """Part 4: etcd's counters over ``seconds`` of a settled cluster, the keys written, and the
    CPU of etcd and of each replica meanwhile."""
    assert stack.etcd is not None
    e0 = await stack.etcd.metrics()
    pids = {**stack.pids(), "etcd": stack.etcd.pid}
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
    secs = time.monotonic() - t0
    d = etcd_delta(e0, await stack.etcd.metrics())
    written = await changed_keys(stack, int(e0.get("etcd_debugging_mvcc_current_revision", 0)))
    cpus = ", ".join(f"{k} {v / secs:.3f}" for k, v in cpu.items())
    rep.result(f"  4. etcd, {what}, {secs:.0f} s: "
               f"{d['revisions'] / secs:.2f} write txns/s ({d['revisions']:.0f}), "
               f"{d['puts'] / secs:.2f} puts/s, {d['deletes'] / secs:.2f} deletes/s, "
               f"{d['put_bytes'] / secs:,.0f} B/s put, {d['proposals'] / secs:.2f} proposals/s, "
               f"{d['lease_renewals'] / secs:.2f} lease keep-alives/s; written: {written}; "
               f"CPU-s/s: {cpus}  [{machine_line()}]")
    rep.record("etcd_window", what=what, seconds=secs, delta=d, keys=written,
               cpu={k: v / secs for k, v in cpu.items()})


async def changed_keys(stack: Stack, since: int, upto: int | None = None) -> str:
    """What was written under the prefix after revision ``since`` (to ``upto``, default the
    revision now), read back from etcd's history with a watch from ``since + 1``: puts and
    deletes per key group (a fact by its name, the rest by the first path part; for verdicts,
    how many masters' were written), with the bytes put."""
    assert stack.etcd is not None
    if upto is None:
        upto = int((await stack.etcd.metrics()).get("etcd_debugging_mvcc_current_revision", 0))
    if upto <= since:
        return "none"
    enc = base64.b64encode
    groups: dict[str, list[int]] = {}  # group -> [puts, deletes, bytes]
    masters: set[str] = set()  # masters whose verdicts were written
    connector = aiohttp.UnixConnector(path=str(stack.etcd.socket))
    body = {"create_request": {"key": enc(b"/bench/").decode(),
                               "range_end": enc(b"/bench0").decode(),
                               "start_revision": since + 1}}
    try:
        async with aiohttp.ClientSession(connector=connector) as http, asyncio.timeout(5):
            async with http.post("http://localhost/v3/watch", json=body) as resp:
                buf = b""
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    if b"\n" not in buf:
                        continue
                    *lines, buf = buf.split(b"\n")
                    events = [ev for line in lines if line.strip()
                              for ev in json.loads(line).get("result", {}).get("events") or []]
                    last = 0
                    for ev in events:
                        kv = ev["kv"]
                        last = max(last, int(kv.get("mod_revision", 0)))
                        key = base64.b64decode(kv["key"]).decode(errors="replace")
                        parts = key.removeprefix("/bench/").split("/")
                        group = "/".join(parts[:2]) if parts[0] == "facts" else parts[0]
                        if parts[0] == "verdicts":
                            masters.add(parts[1] if len(parts) > 1 else "")
                        g = groups.setdefault(group, [0, 0, 0])
                        if ev.get("type") == "DELETE":
                            g[1] += 1
                        else:
                            g[0] += 1
                            g[2] += len(base64.b64decode(kv.get("value", "")))
                    if last >= upto:
                        break
    except Exception as exc:  # a figure missing, not the run
        return f"(not read: {type(exc).__name__}: {exc})"
    def name(group: str) -> str:
        return f"verdicts (of {len(masters)} masters)" if group == "verdicts" else group

    return ", ".join(f"{name(g)} {p} put{'s' if p != 1 else ''}"
                     + (f" {d} del" if d else "") + f" {b / 1024:.1f} KiB"
                     for g, (p, d, b) in sorted(groups.items(), key=lambda kv: -kv[1][2]))


# --- 3. probes per replica ----------------------------------------------------------------


async def probes_per_replica(args: argparse.Namespace, rep: Report, observers: int,
                             stages: list[int], windows: int, seconds: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-pr-"))
    masters, interval = 6000, 2.0
    rep.say(f"\n== 3. probes per replica, {masters:,} masters every {interval:g}s, observers "
            f"{observers}, replicas {stages} [{machine_line()}]")
    stack = await Stack.start(
        tmp, bulk=masters, pairs=0, replicas=max(stages), probe={**PROBE, "interval": "2s"},
        failover={}, cluster={"observers": observers, "quorum": observers},
        start_replicas=stages[0])
    try:
        async with aiohttp.ClientSession() as http:
            for n in stages:
                while len(stack.live()) < n:
                    await next(r for r in stack.replicas.values() if r.proc is None).start()
                await stack.settled(http, 120)
                want = masters * min(observers, n)
                await poll_until(lambda want=want: _probed_total(stack, http, want), 60,
                                 f"{want} probe slots over {n} replicas", every=1.0)
                await asyncio.sleep(3 * interval)  # a new shard's first round ramps up
                rows: list[list[dict[str, Any]]] = []
                for w in range(windows):
                    rows.append(await probe_window(rep, stack, http, n, observers, masters,
                                                   interval, seconds, w + 1))
                rep.result(f"  3. {n} replica(s), observers {observers}, {masters:,} masters "
                           f"every {interval:g}s, {windows} window(s) of {seconds:g} s "
                           f"[{machine_line()}]:" + "".join(
                               _replica_summary(member, [x for ws in rows for x in ws
                                                         if x["member"] == member])
                               for member in sorted({x["member"] for ws in rows for x in ws})))
        _problems(rep, stack)
    finally:
        stack.stop()
        _cleanup(tmp, args.keep)


async def _probed_total(stack: Stack, http: aiohttp.ClientSession, want: int) -> bool:
    texts = await asyncio.gather(*(stack.metrics(http, r) for r in stack.live()))
    return sum(metric_sum(t, "ha_cluster_probed_masters") for t in texts) == want


def _replica_summary(member: str, xs: list[dict[str, Any]]) -> str:
    def rng(key: str, fmt: str) -> str:
        vals = [x[key] for x in xs]
        lo, hi = min(vals), max(vals)
        return format(lo, fmt) if lo == hi else f"{lo:{fmt}}-{hi:{fmt}}"

    lead = " (leader)" if any(x["leader"] for x in xs) else ""
    return (f"\n      {member}{lead}: {rng('probed', ',.0f')} masters, "
            f"{rng('kept', ',.0f')} of {rng('scheduled', ',.0f')} probes/s kept, "
            f"{rng('cpu_s_per_s', '.3f')} CPU-s/s, skipped +{sum(x['skipped'] for x in xs):.0f},"
            f" lag p99 {rng('lag_p99_ms', '.0f')} ms, RSS {rng('rss_mib', '.0f')} MiB")


async def probe_window(rep: Report, stack: Stack, http: aiohttp.ClientSession, n: int,
                       observers: int, masters: int, interval: float, seconds: float,
                       w: int) -> list[dict[str, Any]]:
    live = stack.live()
    assert stack.nginx is not None and stack.etcd is not None
    before = await asyncio.gather(*(stack.metrics(http, r) for r in live))
    e0 = await stack.etcd.metrics()
    load0 = os.getloadavg()[0]
    pids = {r.member: r.pid for r in live}
    pids["etcd"] = stack.etcd.pid
    pids["nginx"] = stack.nginx.proc.pid
    window, _, _ = await measure(stack.nginx, pids, seconds)
    after = await asyncio.gather(*(stack.metrics(http, r) for r in live))
    e = etcd_delta(e0, await stack.etcd.metrics())
    secs = window.seconds
    scheduled = masters * min(observers, n) / interval
    rep.say(f"  {n} replica(s), observers {observers}, window {w} ({secs:.1f} s, load "
            f"{load0:.2f}->{os.getloadavg()[0]:.2f}): all replicas "
            f"{window.requests[ALL] / secs:,.0f} probes/s of {scheduled:,.0f} "
            f"scheduled; GET /state (checkpoints, all replicas) "
            f"{window.states[ALL][0] / secs:,.0f} 200/s + {window.states[ALL][1] / secs:,.0f} "
            f"304/s; etcd {e['revisions'] / secs:.2f} write txns/s, "
            f"{window.cpu['etcd'] / secs:.3f} CPU-s/s; nginx {window.cpu['nginx'] / secs:.3f} "
            f"CPU-s/s")
    rows = []
    for r, t0, t1 in zip(live, before, after, strict=True):
        probed = metric_sum(t1, "ha_cluster_probed_masters")
        kept = window.requests[r.member] / secs
        cpu = window.cpu[r.member] / secs
        late = lateness(t1).since(lateness(t0))
        rows.append({"member": r.member, "probed": probed, "scheduled": probed / interval,
                     "kept": kept, "cpu_s_per_s": cpu, "us_per_probe": 1e6 * cpu / max(kept, 1),
                     "skipped": late.skipped, "lag_p50_ms": 1000 * late.quantile(0.5),
                     "lag_p99_ms": 1000 * late.quantile(0.99), "rss_mib": r.rss_mib(),
                     "leader": metric_sum(t1, "ha_cluster_leader")})
        x = rows[-1]
        rep.say(f"    {r.member}{' (leader)' if x['leader'] else ''}: {probed:,.0f} masters, "
                f"{kept:,.0f} of {probed / interval:,.0f} probes/s kept, {cpu:.3f} CPU-s/s "
                f"({x['us_per_probe']:.0f} CPU-µs per probe, all its work included), "
                f"skipped +{late.skipped:.0f}, lag p50 {x['lag_p50_ms']:.1f} ms p99 "
                f"{x['lag_p99_ms']:.1f} ms, RSS {x['rss_mib']:.0f} MiB")
    rep.record("probes", replicas=n, observers=observers, window=w, seconds=secs,
               total=window.requests[ALL] / secs, rows=rows, etcd=e, load=load0,
               state_200_s=window.states[ALL][0] / secs, state_304_s=window.states[ALL][1] / secs,
               etcd_cpu=window.cpu["etcd"] / secs, nginx_cpu=window.cpu["nginx"] / secs)
    return rows


# --- what went wrong -------------------------------------------------------------------------


def _problems(rep: Report, stack: Stack) -> None:
    """Warnings and errors the replicas logged, counted by kind (digits masked), and every
    ERROR or traceback line: evidence of what broke, if anything did."""
    for r in stack.replicas.values():
        if r.proc is None:
            continue
        lines = [ln for ln in r.log_lines(" ERROR ", "Traceback", " WARNING ", " CRITICAL ")
                 if "--insecure-no-auth" not in ln]
        kinds: dict[str, int] = {}
        for ln in lines:
            level, _, msg = ln.split(" ", 2)[-1].partition(" ")
            key = f"{level} {msg.split(' event=')[0][:90]}"
            key = "".join(c if not c.isdigit() else "#" for c in key)
            kinds[key] = kinds.get(key, 0) + 1
        top = sorted(kinds.items(), key=lambda kv: -kv[1])[:8]
        rep.say(f"  log of {r.member} ({r.starts} start(s)): {len(lines)} warning/error "
                f"lines" + "".join(f"\n      {n}x {k}" for k, n in top))
        for ln in [x for x in lines if " ERROR " in x or "Traceback" in x][:3]:
            rep.say(f"      ! {ln[:300]}")


def _cleanup(tmp: Path, keep: bool) -> None:
    import shutil

    if keep:
        print(f"  (kept {tmp})", flush=True)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


# --- main ----------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    rep = Report(args.json)
    q = args.quick
    rep.say(f"bench_cluster {'--quick ' if q else ''}{time.strftime('%Y-%m-%d %H:%M')}; "
            f"{machine_line()}; Python {sys.version.split()[0]}")
    budget = {1: 120 if q else 330, 2: 110 if q else 240, 3: 110 if q else 260}
    parts = set(args.parts)
    started = time.monotonic()

    async def bounded(part: int, coro: Any) -> None:
        try:
            async with asyncio.timeout(budget[part] * args.budget_scale):
                await coro
        except Exception as exc:  # the part stopped (its stack is killed), the others run
            rep.say(f"  PART {part} FAILED: {type(exc).__name__}: {exc}")
            rep.record("failed", part=part, error=str(exc))

    if 1 in parts:
        async def part1() -> None:
            for ttl in ((2.0,) if q else (2.0, 10.0)):
                await leader_change(args, rep, ttl, 2 if q else 5)
        await bounded(1, part1())
    if 2 in parts or 4 in parts:
        async def part2() -> None:
            kills = 2 if q else 5
            c = await failover_e2e(args, rep, True, kills, (15 if q else 60) if 4 in parts else 0)
            s = await failover_e2e(args, rep, False, kills, 0)
            if c and s:
                rep.result(f"  RESULT failover at 1,000 masters: cluster median "
                           f"{statistics.median(c):.2f} s vs single node "
                           f"{statistics.median(s):.2f} s")
        await bounded(2, part2())
    if 3 in parts:
        async def part3() -> None:
            if q:
                await probes_per_replica(args, rep, 1, [1, 3], 1, 8)
            else:
                await probes_per_replica(args, rep, 1, [1, 2, 3], 2, 15)
                await probes_per_replica(args, rep, 2, [3], 2, 15)
        await bounded(3, part3())
    rep.say("\nSUMMARY\n" + "\n".join(rep.results))
    rep.say(f"\ndone in {time.monotonic() - started:.0f} s; {machine_line()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, shorter windows")
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4],
                    choices=[1, 2, 3, 4])
    ap.add_argument("--json", type=Path, help="append every figure here (JSON lines)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs (logs, configs)")
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help="scale each part's time limit (a part past it is stopped and said)")
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs two cores: the replicas on core 0, the rest on core 1")
    os.sched_setaffinity(0, {LOAD_CORE})
    _raise_nofile()

    async def guarded() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await run(args)

    asyncio.run(guarded())


if __name__ == "__main__":
    main()
