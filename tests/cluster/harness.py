"""A cluster on loopback for tests: one real etcd, `ha-exporter master` processes and N
`ha-exporter run` replicas in cluster mode, each with its own directory (config, state, log).

Replicas are named ``exporter-1``..``exporter-N`` and bind port 0; ``urls`` follows each
replica's actual address (a restarted replica has a new one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from tests.cluster.etcd_server import EtcdServer
from tests.processes import Proc, Spec, master_proc, spawn_exporter, stop_all
from tests.support import get_json, master_entry, wait_for, wait_ready, write_config

SPECS: list[Spec] = [("master-a", "uae", "active", 1), ("master-b", "uae", "active", 1),
                     ("master-c", "uae", "standby", 2), ("master-d", "uae", "standby", 3)]
STANDBYS = ("master-c", "master-d")
TTL = 2.0  # the stack's default lease_ttl, in seconds
PROBE = {"interval": "250ms", "timeout": "200ms", "failure_threshold": 2,
         "recovery_threshold": 2, "degraded_latency": "150ms", "jitter": 0.1}


class ClusterStack:
    def __init__(self, tmp: Path, etcd: EtcdServer, specs: Sequence[Spec], replicas: int = 3,
                 *, lease_ttl: str = "2s", observers: int = 2, quorum: int = 2,
                 **sections: Any) -> None:
        self.tmp, self.etcd, self.specs = tmp, etcd, list(specs)
        self.count = replicas
        self.cluster = {"etcd": {"endpoints": [etcd.endpoint], "prefix": "/ha-test",
                                 "timeout": "1s"},
                        "lease_ttl": lease_ttl, "observers": observers, "quorum": quorum}
        self.sections = {"probe": PROBE, **sections}
        self.masters: dict[str, Proc] = {}
        self.urls: dict[str, str] = {}
        self.replicas: dict[str, Proc] = {}
        self.bases: dict[str, str] = {}
        self.configs: dict[str, Path] = {}

    async def start(self, timeout: float = 30.0) -> ClusterStack:
        for name, region, role, _ in self.specs:
            self.masters[name] = master_proc(self.tmp, name, region, role)
        urls = await asyncio.gather(*(m.listening(timeout) for m in self.masters.values()))
        self.urls = dict(zip(self.masters, urls, strict=True))
        await asyncio.gather(*(self.start_replica(f"exporter-{i}")
                               for i in range(1, self.count + 1)))
        return self

    async def start_replica(self, member: str) -> Proc:
        home = self.tmp / member
        home.mkdir(exist_ok=True)
        if member not in self.configs:
            self.configs[member] = write_config(
                home, [master_entry(n, self.urls[n], region, role, prio)
                       for n, region, role, prio in self.specs],
                cluster={**self.cluster, "member": member}, **self.sections)
        proc = await spawn_exporter(home, self.configs[member])
        assert proc.url is not None
        self.replicas[member] = proc
        self.bases[member] = proc.url
        return proc

    def stop(self) -> None:
        stop_all([*self.replicas.values(), *self.masters.values()])

    async def __aenter__(self) -> ClusterStack:
        try:
            return await self.start()
        except BaseException:
            self.stop()
            raise

    async def __aexit__(self, *_: object) -> None:
        self.stop()

    # --- what the cluster says ---------------------------------------------------------------
    async def status(self, http: aiohttp.ClientSession, member: str) -> dict[str, Any]:
        """``GET /api/v1/cluster`` of ``member``; a paused replica fails it in 2 s."""
        async with http.get(self.bases[member] + "/api/v1/cluster",
                            timeout=aiohttp.ClientTimeout(total=2)) as resp:
            assert resp.status == 200, (member, resp.status)
            result: dict[str, Any] = await resp.json()
            return result

    async def leaders(self, http: aiohttp.ClientSession,
                      members: Sequence[str] | None = None) -> dict[str, str | None]:
        """Each live replica's idea of the leader (member name, None when it knows none)."""
        out: dict[str, str | None] = {}
        for m in members or self.live():
            try:
                st = await self.status(http, m)
            except (TimeoutError, aiohttp.ClientError):
                continue
            out[m] = st["leader"]["member"] if st["leader"] else None
        return out

    def live(self) -> list[str]:
        return [m for m, p in self.replicas.items() if p.popen.poll() is None]

    async def settled_leader(self, http: aiohttp.ClientSession, timeout: float = 20.0,
                             members: Sequence[str] | None = None) -> str:
        """The one leader every live replica (or ``members``) agrees on, and that says it
        leads."""
        async def agreed() -> str | None:
            views = await self.leaders(http, members)
            names = set(views.values())
            if len(names) != 1 or None in names or len(views) < len(members or self.live()):
                return None
            (leader,) = names
            assert leader is not None
            st = await self.status(http, leader)
            return leader if st["leading"] else None
        return await wait_for(agreed, timeout, "one leader agreed by every replica")

    async def shards(self, http: aiohttp.ClientSession, member: str) -> Mapping[str, list[str]]:
        st = await self.status(http, member)
        return {m["member"]: m["masters"] for m in st["members"]}


# --- what the masters say (the truth the tests check) -----------------------------------


async def ready(http: aiohttp.ClientSession, cluster: ClusterStack) -> str:
    """Every replica ready (a member), and the leader they agree on."""
    for base in cluster.bases.values():
        await wait_ready(http, base, timeout=30)
    return await cluster.settled_leader(http)


async def chaos(http: aiohttp.ClientSession, cluster: ClusterStack, master: str) -> Any:
    return await get_json(http, cluster.urls[master] + "/chaos")


async def health(http: aiohttp.ClientSession, cluster: ClusterStack, master: str) -> Any:
    return await get_json(http, cluster.urls[master] + "/health")


async def holders(http: aiohttp.ClientSession, cluster: ClusterStack, duty: str,
                  among: tuple[str, ...]) -> list[str]:
    """The masters that report serving ``duty`` themselves."""
    out = []
    for name in among:
        h = await health(http, cluster, name)
        if h.get("active") and duty in (h.get("duties") or []):
            out.append(name)
    return out


async def activations(http: aiohttp.ClientSession, cluster: ClusterStack) -> int:
    return sum([(await chaos(http, cluster, m))["activations"] for m in STANDBYS])


async def probers(http: aiohttp.ClientSession, cluster: ClusterStack,
                  window: float = 1.5) -> dict[str, set[str]]:
    """Which replicas probed each live master during ``window`` seconds, as the master
    counted them."""
    names = [n for n, p in cluster.masters.items() if p.popen.poll() is None]
    before = {n: (await chaos(http, cluster, n))["probes_by_observer"] for n in names}
    await asyncio.sleep(window)
    out = {}
    for n in names:
        after = (await chaos(http, cluster, n))["probes_by_observer"]
        out[n] = {o for o, count in after.items() if count > before[n].get(o, 0)}
    return out


async def settled_probers(http: aiohttp.ClientSession, cluster: ClusterStack,
                          observers: int = 2) -> dict[str, set[str]]:
    """``probers`` once every live master is probed by exactly ``observers`` replicas."""
    async def settled() -> dict[str, set[str]] | None:
        seen = await probers(http, cluster, 0.8)
        return seen if all(len(o) == observers for o in seen.values()) else None
    return await wait_for(settled, 20, f"every master probed by {observers} replicas")
