"""Three replicas on a real etcd and a fleet of `ha-exporter master` processes.

What the masters report is the truth these tests check: which replicas probe them (their
``X-HA-Observer`` counts), which duties they serve and how many activations they obeyed.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import Counter
from typing import Any

import aiohttp

from tests.cluster.harness import (
    SPECS,
    STANDBYS,
    TTL,
    ClusterStack,
    activations,
    holders,
    probers,
    ready,
    settled_probers,
)
from tests.support import get_json, metric_value, wait_for


async def test_one_leader_and_every_master_probed_by_exactly_observers_replicas(
    cluster: ClusterStack,
) -> None:
    async with aiohttp.ClientSession() as http:
        leader = await ready(http, cluster)
        assert leader in cluster.replicas
        views = await cluster.leaders(http)
        assert set(views.values()) == {leader}, views

        async def full_shards() -> dict[str, list[str]] | None:
            shards = await cluster.shards(http, leader)
            return shards if len(shards) == 3 else None
        shards = await wait_for(full_shards, 20, "three members with shards")
        told = {name: {m for m, masters in shards.items() if name in masters}
                for name, *_ in SPECS}
        assert Counter(len(v) for v in told.values()) == {2: 4}, shards

        async def as_told() -> dict[str, set[str]] | None:
            seen = await probers(http, cluster, 1.0)
            return seen if seen == told else None
        await wait_for(as_told, 15, f"each master probed by exactly its observers {told}")
        leaders = [m for m in cluster.replicas
                   if await metric_value(http, cluster.bases[m], "ha_cluster_leader") == 1]
        assert leaders == [leader]
        for member, masters in shards.items():  # per-master series: the replica's shard only
            async with http.get(cluster.bases[member] + "/metrics") as resp:
                text = await resp.text()
            exported = set(re.findall(r'^ha_master_up\{[^}]*master="([^"]+)"', text, re.M))
            assert exported == set(masters), (member, exported, masters)
            assert await metric_value(http, cluster.bases[member],
                                      "ha_cluster_probed_masters") == len(masters)
            assert await metric_value(http, cluster.bases[member], "ha_cluster_members") == 3
            # every replica knows every master's queue, probed or not (within a factor 2)
            listed = await get_json(http, cluster.bases[member] + "/api/v1/masters")
            queues = {m["name"]: m["queue_length"] for m in listed["masters"]}
            assert None not in queues.values(), (member, queues)


async def test_a_killed_master_is_failed_over_exactly_once_across_the_cluster(
    cluster: ClusterStack,
) -> None:
    async with aiohttp.ClientSession() as http:
        leader = await ready(http, cluster)
        await settled_probers(http, cluster)
        assert await activations(http, cluster) == 0
        cluster.masters["master-a"].kill()

        async def taken() -> list[str]:
            return await holders(http, cluster, "master-a", STANDBYS)
        held = await wait_for(taken, 20, "a standby serving master-a's duty")
        await asyncio.sleep(3 * TTL)  # every replica had time to act, had it wanted to
        assert await holders(http, cluster, "master-a", STANDBYS) == held
        assert await activations(http, cluster) == 1

        async def recorded(member: str) -> list[dict[str, Any]]:
            page = await get_json(http, cluster.bases[member] + "/api/v1/failovers")
            return [r for r in page["items"]
                    if r["master"] == "master-a" and r["result"] == "success"]
        for member in cluster.replicas:  # the history is the same on every replica
            records = await wait_for(lambda m=member: recorded(m), 10, f"history on {member}")
            assert len(records) == 1 and records[0]["backup"] == held[0], records
        assert leader in cluster.replicas


async def test_one_replica_cut_off_from_a_master_fails_nothing(cluster: ClusterStack) -> None:
    async with aiohttp.ClientSession() as http:
        await ready(http, cluster)
        seen = await settled_probers(http, cluster)
        observers = sorted(seen["master-a"])
        assert len(observers) == 2, seen
        cut = observers[0]
        async with http.post(cluster.urls["master-a"] + "/chaos",
                             json={"refuse_observers": [cut]}) as resp:
            assert resp.status == 200

        async def sdown() -> bool:
            value = await metric_value(
                http, cluster.bases[cut],
                f'ha_master_observer_failed{{master="master-a",observer="{cut}"}}')
            return value == 1
        await wait_for(sdown, 10, f"{cut} sees master-a failed")
        deadline = time.monotonic() + 4 * TTL  # many failure thresholds long
        while time.monotonic() < deadline:
            assert await activations(http, cluster) == 0
            assert await holders(http, cluster, "master-a", ("master-a", *STANDBYS)) == [
                "master-a"]
            await asyncio.sleep(0.5)
        other = observers[1]
        assert await metric_value(
            http, cluster.bases[other],
            f'ha_master_observer_failed{{master="master-a",observer="{other}"}}') == 0
        state = await get_json(http, cluster.bases[other] + "/api/v1/masters/master-a")
        assert state["state"] == "healthy"


async def test_a_killed_replica_hands_its_shard_on_within_the_lease(
    cluster: ClusterStack,
) -> None:
    async with aiohttp.ClientSession() as http:
        leader = await ready(http, cluster)
        victim = next(m for m in cluster.replicas if m != leader)
        before = await settled_probers(http, cluster)
        orphaned = [n for n, obs in before.items() if victim in obs]
        assert orphaned, before
        cluster.replicas[victim].kill()
        killed = time.monotonic()

        async def moved() -> dict[str, set[str]] | None:
            seen = await probers(http, cluster, 0.6)
            ok = all(len(obs) == 2 and victim not in obs for obs in seen.values())
            return seen if ok else None
        after = await wait_for(moved, 3 * TTL + 10, "the shard moved to the two others")
        took = time.monotonic() - killed
        assert took < TTL + 4.0, f"shard moved after {took:.1f}s (lease {TTL}s)"
        for name, obs in before.items():  # masters the victim did not probe kept theirs
            if victim not in obs:
                assert after[name] == obs, (name, obs, after[name])


async def test_leader_killed_a_new_leader_within_the_lease_and_it_fails_over(
    cluster: ClusterStack,
) -> None:
    async with aiohttp.ClientSession() as http:
        leader = await ready(http, cluster)
        cluster.replicas[leader].kill(signal.SIGKILL)
        killed = time.monotonic()
        others = [m for m in cluster.replicas if m != leader]
        new = await cluster.settled_leader(http, timeout=3 * TTL + 10, members=others)
        took = time.monotonic() - killed
        assert new != leader
        assert took < TTL + 2.0, f"new leader after {took:.1f}s (lease {TTL}s)"
        cluster.masters["master-b"].kill()

        async def taken() -> list[str]:
            return await holders(http, cluster, "master-b", STANDBYS)
        await wait_for(taken, 20, "a standby serving master-b's duty")
        await asyncio.sleep(2 * TTL)
        assert await activations(http, cluster) == 1
