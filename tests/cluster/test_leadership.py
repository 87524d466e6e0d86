"""Losing the leader or etcd: a move in flight ends exactly once, a paused leader cannot act
after its lease, and without etcd nobody acts while probing and /metrics go on."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.cluster.etcd_server import EtcdServer
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
from tests.support import metric_value, serve_app, wait_for


class Hook:
    """A pre-hook receiver that holds the first call for ``hold`` seconds and answers the
    others at once: a move that stays in flight as long as a test needs."""

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self.calls = 0
        self.first = asyncio.Event()

    async def handle(self, _: web.Request) -> web.Response:
        self.calls += 1
        if self.calls == 1:
            self.first.set()
            await asyncio.sleep(self.hold)
        return web.json_response({"ok": True})

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        async with serve_app(app) as base:
            yield base + "/hook"


@asynccontextmanager
async def stack(tmp: Path, etcd: EtcdServer, hook_url: str | None = None,
                ) -> AsyncIterator[ClusterStack]:
    failover: dict[str, object] = {"cooldown": "1s", "fleet_cooldown": "0s"}
    if hook_url is not None:
        failover["pre_hook"] = {"url": hook_url, "timeout": "10s"}
        failover["step_timeout"] = "10s"
    async with ClusterStack(tmp, etcd, SPECS, failover=failover) as cluster:
        yield cluster


async def one_holder_and_one_activation(http: aiohttp.ClientSession, cluster: ClusterStack,
                                        duty: str) -> list[str]:
    held = await wait_for(lambda: holders(http, cluster, duty, STANDBYS), 30,
                          f"a standby serving {duty}'s duty")
    await asyncio.sleep(2 * TTL)  # room for a second activation, were there one
    assert await holders(http, cluster, duty, STANDBYS) == held
    assert len(held) == 1
    assert await activations(http, cluster) == 1
    return held


async def test_a_move_in_flight_when_the_leader_dies_ends_exactly_once(
    tmp_path: Path, etcd_server: EtcdServer,
) -> None:
    hook = Hook(hold=30.0)
    async with hook.serving() as url, stack(tmp_path, etcd_server, url) as cluster, \
            aiohttp.ClientSession() as http:
        leader = await ready(http, cluster)
        await settled_probers(http, cluster)
        cluster.masters["master-a"].kill()
        await asyncio.wait_for(hook.first.wait(), 20)  # the leader's move waits in pre_hook
        cluster.replicas[leader].kill(signal.SIGKILL)
        others = [m for m in cluster.replicas if m != leader]
        new = await cluster.settled_leader(http, timeout=3 * TTL + 10, members=others)
        await one_holder_and_one_activation(http, cluster, "master-a")
        log = cluster.replicas[new].output()
        assert "left open by the leader before" in log, log[-3000:]


async def test_a_paused_leader_cannot_act_after_another_took_over(
    tmp_path: Path, etcd_server: EtcdServer,
) -> None:
    hook = Hook(hold=4 * TTL)
    async with hook.serving() as url, stack(tmp_path, etcd_server, url) as cluster, \
            aiohttp.ClientSession() as http:
        leader = await ready(http, cluster)
        await settled_probers(http, cluster)
        cluster.masters["master-a"].kill()
        await asyncio.wait_for(hook.first.wait(), 20)  # its move waits in pre_hook...
        paused = cluster.replicas[leader]
        paused.kill(signal.SIGSTOP)  # ...and the leader freezes mid-move
        try:
            others = [m for m in cluster.replicas if m != leader]
            new = await cluster.settled_leader(http, timeout=3 * TTL + 10, members=others)
            assert new != leader
            held = await one_holder_and_one_activation(http, cluster, "master-a")
        finally:
            paused.kill(signal.SIGCONT)
        # the woken replica's hook call returns and its move goes on: every call it tries
        # is refused by its own fence (lease gone) or by the masters (stale epoch)
        await asyncio.sleep(2 * TTL + 2)
        assert await holders(http, cluster, "master-a", STANDBYS) == held
        assert await activations(http, cluster) == 1
        out = paused.output()
        assert "stops leading" in out or "not sent" in out, out[-3000:]
        views = await cluster.leaders(http)
        assert set(views.values()) == {new}, views


async def test_without_etcd_nobody_acts_and_probing_goes_on_then_it_recovers(
    tmp_path: Path, etcd_server: EtcdServer,
) -> None:
    async with stack(tmp_path, etcd_server) as cluster, aiohttp.ClientSession() as http:
        leader = await ready(http, cluster)
        await settled_probers(http, cluster)
        etcd_server.stop()

        async def stepped_down() -> bool:
            return await metric_value(http, cluster.bases[leader], "ha_cluster_leader") == 0
        await wait_for(stepped_down, TTL + 5, "the leader stops acting without etcd")
        cluster.masters["master-a"].kill()
        deadline = time.monotonic() + 3 * TTL
        while time.monotonic() < deadline:
            assert await activations(http, cluster) == 0
            await asyncio.sleep(0.5)
        seen = await probers(http, cluster, 1.0)  # probing goes on, each master still probed
        assert all(len(obs) >= 1 for obs in seen.values()), seen
        for base in cluster.bases.values():
            async with http.get(base + "/metrics") as resp:
                assert resp.status == 200
        await etcd_server.restart()
        await cluster.settled_leader(http, timeout=3 * TTL + 15)
        await one_holder_and_one_activation(http, cluster, "master-a")
