"""The cluster from an operator's and a producer's side: actions sent to a follower reach the
leader and every replica learns them; readiness is membership; producers route without any
replica."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import yaml

from exporter.client import Client
from tests.cluster.etcd_server import EtcdServer
from tests.cluster.harness import PROBE, SPECS, ClusterStack, ready, settled_probers
from tests.processes import spawn_exporter, spawn_master
from tests.support import TOKEN, get_json, master_entry, wait_for, write_config

AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_an_action_sent_to_a_follower_is_redirected_to_the_leader_and_shared(
    cluster: ClusterStack,
) -> None:
    async with aiohttp.ClientSession() as http:
        leader = await ready(http, cluster)
        follower = next(m for m in cluster.replicas if m != leader)
        url = cluster.bases[follower] + "/api/v1/failover/pause"
        async with http.post(url, headers=AUTH, allow_redirects=False) as resp:
            assert resp.status == 307, await resp.text()
            location = resp.headers["Location"]
            assert location == cluster.bases[leader] + "/api/v1/failover/pause"
            assert (await resp.json())["leader"] == cluster.bases[leader]
        async with http.post(location, headers=AUTH) as resp:
            assert resp.status == 200 and (await resp.json())["paused"] is True

        async def everywhere(paused: bool) -> bool:
            states = [await get_json(http, b + "/api/v1/failover/status")
                      for b in cluster.bases.values()]
            return all(s["paused"] is paused for s in states)
        await wait_for(lambda: everywhere(True), 10, "every replica paused")

        async def audited() -> bool:  # the leader's audit is readable on the follower
            page = await get_json(http, cluster.bases[follower] + "/api/v1/audit")
            return any(e["action"] == "pause" for e in page["items"])
        await wait_for(audited, 10, "the pause in the follower's audit")
        url = cluster.bases[follower] + "/api/v1/masters/master-b/maintenance"
        async with http.post(url, headers=AUTH, json={"enabled": True},
                             allow_redirects=False) as resp:
            assert resp.status == 307
            target = resp.headers["Location"]
        async with http.post(target, headers=AUTH, json={"enabled": True}) as r:
            assert r.status == 200, await r.text()

        async def drained() -> bool:
            states = [(await get_json(http, b + "/api/v1/masters/master-b"))["state"]
                      for b in cluster.bases.values()]
            return states == ["maintenance"] * len(states)
        await wait_for(drained, 10, "master-b in maintenance on every replica")
        async with http.post(cluster.bases[leader] + "/api/v1/failover/resume",
                             headers=AUTH) as resp:
            assert resp.status == 200
        await wait_for(lambda: everywhere(False), 10, "every replica resumed")
        async with http.post(cluster.bases[follower] + "/-/reload", headers=AUTH,
                             allow_redirects=False) as resp:
            assert resp.status == 200  # per-replica calls are never redirected
        path = cluster.configs[follower]
        path.write_text(path.read_text().replace("lease_ttl: 2s", "lease_ttl: 5s"))
        async with http.post(cluster.bases[follower] + "/-/reload", headers=AUTH) as resp:
            body = await resp.json()
            assert resp.status == 400 and body["errors"][0].startswith("cluster:"), body


async def test_a_replica_that_cannot_reach_etcd_is_not_ready_but_serves_metrics(
    tmp_path: Path, etcd_server: EtcdServer,
) -> None:
    home = tmp_path / "lonely"
    home.mkdir()
    config = write_config(
        home, [master_entry("m", "http://127.0.0.1:9/")],
        cluster={"etcd": {"endpoints": [f"unix://{tmp_path}/nothing.sock"], "timeout": "300ms"},
                 "member": "lonely", "lease_ttl": "2s"})
    proc = await spawn_exporter(home, config)
    try:
        assert proc.url is not None
        async with aiohttp.ClientSession() as http:
            await asyncio.sleep(1.5)  # several membership attempts
            async with http.get(proc.url + "/readyz") as resp:
                assert resp.status == 503
                assert "not a cluster member" in (await resp.json())["reason"]
            async with http.get(proc.url + "/metrics") as resp:
                assert resp.status == 200
                assert "ha_cluster_leader 0.0" in await resp.text()
    finally:
        proc.stop()


async def test_producers_keep_routing_with_every_replica_down(cluster: ClusterStack) -> None:
    async with aiohttp.ClientSession() as http:
        await ready(http, cluster)
        await settled_probers(http, cluster)
        bases = list(cluster.bases.values())
        sent: list[str] = []
        async with Client(bases, token=TOKEN, attempts=4, timeout=0.5, watch_wait=0.5,
                          stale_after=0.5, replay=False) as client:
            for i in range(20):
                await client.send({"id": f"up-{i}"})
                sent.append(f"up-{i}")
            for proc in cluster.replicas.values():
                proc.kill()
            started = time.monotonic()
            while time.monotonic() - started < 2.0:  # bounded: two seconds of traffic
                msg_id = f"down-{len(sent)}"
                result = await client.send({"id": msg_id})
                assert result["master"] in ("master-a", "master-b"), result
                sent.append(msg_id)
            stats = client.stats()
            assert not stats["exporter_up"] and stats["table_age_seconds"] > 1.0
        accepted: set[str] = set()
        for name in ("master-a", "master-b"):
            accepted |= set((await get_json(http, cluster.urls[name] + "/messages"))["ids"])
        assert len(sent) > 40 and set(sent) <= accepted, (len(sent), len(set(sent) - accepted))


async def test_a_reset_sent_to_a_follower_reaches_every_observer(
    tmp_path: Path, etcd_server: EtcdServer,
) -> None:
    """A standby that ran out of recovery attempts stays failed on every observer until an
    operator's reset, sent to a follower, reaches them all."""
    probe = {**PROBE, "recovery_threshold": 12}  # a three-second window to be caught in
    async with ClusterStack(tmp_path, etcd_server, SPECS, probe=probe,
                            failover={"max_recovery_attempts": 1}) as stack, \
            aiohttp.ClientSession() as http:
        leader = await ready(http, stack)
        await settled_probers(http, stack)
        follower = next(m for m in stack.replicas if m != leader)
        chaos = stack.urls["master-d"] + "/chaos"

        async def state(member: str = leader) -> str:
            body = await get_json(http, stack.bases[member] + "/api/v1/masters/master-d")
            return str(body["state"])

        async def mode(name: str) -> None:
            async with http.post(chaos, json={"mode": name}) as resp:
                assert resp.status == 200
        await mode("error")
        await wait_for(lambda: _is(state(), "failed"), 10, "master-d failed")
        await mode("ok")
        await wait_for(lambda: _is(state(), "recovering"), 10, "master-d recovering")
        await asyncio.sleep(1.0)  # both observers recovering (3 s to healthy)...
        await mode("error")  # ...fail while recovering: no attempt left on either
        await wait_for(lambda: _is(state(), "failed"), 10, "master-d failed again")
        await mode("ok")
        await asyncio.sleep(4.0)  # longer than the recovery threshold: it stays failed
        assert await state() == "failed"
        url = stack.bases[follower] + "/api/v1/masters/master-d/reset"
        async with http.post(url, headers=AUTH, allow_redirects=False) as resp:
            assert resp.status == 307
            target = resp.headers["Location"]
        async with http.post(target, headers=AUTH) as resp:
            assert resp.status == 200, await resp.text()
        for member in stack.replicas:
            await wait_for(lambda m=member: _is(state(m), "healthy"), 15,
                           f"master-d healthy on {member}")


async def _is(value: object, expected: str) -> bool:
    return await value == expected  # type: ignore[misc]


async def test_a_master_added_by_reload_is_probed_by_its_observers(
    cluster: ClusterStack,
) -> None:
    async with aiohttp.ClientSession() as http:
        await ready(http, cluster)
        extra = await cluster_master(cluster, "master-e")
        for member, path in cluster.configs.items():
            text = path.read_text()
            entry = yaml.safe_dump([master_entry("master-e", extra, "uae", "standby", 4)])
            path.write_text(text.replace("masters:\n", "masters:\n" + entry, 1))
            async with http.post(cluster.bases[member] + "/-/reload", headers=AUTH) as resp:
                assert resp.status == 200, await resp.text()
        seen = await settled_probers(http, cluster)
        assert len(seen["master-e"]) == 2, seen


async def cluster_master(cluster: ClusterStack, name: str) -> str:
    proc = await spawn_master(cluster.tmp, name, "uae", "standby")
    cluster.masters[name] = proc
    cluster.urls[name] = proc.url or ""
    return cluster.urls[name]
