"""One replica's part in the cluster: membership, leadership, its shard, the facts.

Every replica registers ``members/<member>`` on its lease, reads everything under the prefix
through one watch (``Mirror``), probes the masters rendezvous hashing gives it, publishes its
verdicts and settles every master on its observers' quorum (``Observing``). The replica whose
lease holds the leader key acts: it raises the fencing epoch, takes the facts from etcd into
its store, makes the moves its predecessor left open its own (crash recovery completes or
rolls them back) and from then on writes every fact back (``Facts``). It stops acting the
moment its lease is in doubt; every control call first asks ``fence``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from exporter.cluster.etcd import Etcd, EtcdError, KeyValue, Put
from exporter.cluster.facts import AUDIT_KEPT, HISTORY_KEPT, Facts, Owners
from exporter.cluster.figures import ClusterFigures
from exporter.cluster.keys import Keys
from exporter.cluster.leadership import Election, Leader, read_leader
from exporter.cluster.lease import MemberLease
from exporter.cluster.mirror import Mirror
from exporter.cluster.observing import Observing
from exporter.cluster.replicated import ReplicatedStore
from exporter.cluster.shard import Shards
from exporter.config import ClusterConfig
from exporter.failover import FailoverManager
from exporter.fleet import Fleet, Sample, Transition
from exporter.probing.prober import Prober

log = logging.getLogger(__name__)

PRUNE_EVERY = 60.0  # seconds between the leader's retention passes over history and audit


class ClusterNode:
    def __init__(self, config: ClusterConfig, member: str, url: str, fleet: Fleet,
                 store: ReplicatedStore, owners: Owners,
                 publish: Callable[[Sample | Transition], None]) -> None:
        self.config = config
        self.member = member
        self.url = url
        self.fleet = fleet
        self.store = store
        self.keys = keys = Keys(config.etcd.prefix)
        self.etcd = Etcd(config.etcd.endpoints, timeout=config.etcd.timeout)
        self.lease = MemberLease(self.etcd, config.lease_ttl, self._lease_changed)
        self.mirror = Mirror(self.etcd, keys.root, self._changed)
        self.election = Election(self.etcd, keys, member, url)
        self.facts = Facts(self.etcd, keys, store, owners)
        self.observing = Observing(member, fleet, self.etcd, keys, config.quorum, publish,
                                   lambda: self.lease.id if self.lease.valid() else None)
        self.failover: FailoverManager | None = None
        self.prober: Prober | None = None
        self.members: dict[str, str] = {}  # member -> its API URL
        self.leader: Leader | None = None
        self.leading = False
        self.registered: int | None = None  # the lease our member key is on
        self.leader_changes = 0
        self._pruned_at = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[None] | None = None
        store.on_mark = self._wake.set

    # --- what the service and the web layer ask ---------------------------------------------
    def not_leading(self) -> str | None:
        """None while this replica may act; else why not (FailoverManager.leading)."""
        if not self.leading:
            who = self.leader.member if self.leader else "nobody (election pending)"
            return f"not the cluster leader (leader: {who})"
        if not self.lease.valid():
            return "the cluster lease is not confirmed (etcd keep-alive failing)"
        return None

    async def fence(self) -> str | None:
        """Asked before every control call: the facts (the move's journal first) must be in
        etcd, and the lease still ours, or the call is not made."""
        why = self.not_leading()
        if why is not None:
            return why
        why = await self.facts.flush()
        if why is not None:
            return f"the failover journal is not in etcd: {why}"
        return self.not_leading()

    def not_ready(self) -> str | None:
        if self.registered is None or not self.mirror.synced.is_set():
            return "not a cluster member yet (etcd unreachable or not answered yet)"
        return None

    def epoch(self) -> int:
        kv = self.mirror.kvs.get(self.keys.epoch)
        try:
            return int(kv.value) if kv is not None else 0
        except ValueError:
            return 0

    def figures(self) -> ClusterFigures:
        return ClusterFigures(self.member, len(self.members), self.leading and
                              self.lease.valid(), self.epoch(),
                              self.prober.probed if self.prober else 0,
                              self.observing.observer_failed())

    def status(self) -> dict[str, Any]:
        """``GET /api/v1/cluster``."""
        shards = self.observing.shards.as_dict()
        leader = self.leader
        return {
            "mode": "cluster", "member": self.member, "leading": self.not_leading() is None,
            "leader": {"member": leader.member, "url": leader.url} if leader else None,
            "epoch": self.epoch(), "etcd_synced": self.mirror.synced.is_set(),
            "observers": self.config.observers, "quorum": self.config.quorum,
            "lease_ttl": self.config.lease_ttl,
            "members": [{"member": m, "url": url, "masters": shards.get(m, [])}
                        for m, url in sorted(self.members.items())],
        }

    def reset(self, master: str) -> None:
        """The leader's side of an operator's reset: its own observer now, every other
        replica's through ``facts/flags``."""
        self.observing.reset(master)
        self.store.set_flag("resets", {**self.store.flag("resets", {}), master: time.time()})

    def leader_url(self) -> str | None:
        return self.leader.url if self.leader is not None else None

    # --- lifecycle ------------------------------------------------------------------------
    def attach(self, failover: FailoverManager, prober: Prober) -> None:
        self.failover, self.prober = failover, prober
        failover.leading = self.not_leading
        failover.on_reset = self.reset
        failover.client.fence = self.fence
        prober.retarget(frozenset())  # nothing until the membership is known

    def start(self) -> None:
        self.lease.start()
        self.mirror.start()
        self.observing.start()
        self._task = asyncio.create_task(self._run(), name="cluster-node")

    async def stop(self) -> None:
        """Leave: stop acting, revoke the lease (the others take over at once)."""
        self._step_down("shutting down")
        for task in (self._task, self._recovery):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.observing.stop()
        await self.mirror.stop()
        await self.lease.stop(revoke=True)
        await self.etcd.close()

    async def _run(self) -> None:
        period = min(1.0, self.config.lease_ttl / 3)
        while True:
            try:
                await self._step()
            except EtcdError as exc:
                log.debug("cluster step: %s", exc)
            except Exception:
                log.exception("cluster step failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period):
                    await self._wake.wait()
            self._wake.clear()

    async def _step(self) -> None:
        lease = self.lease.id if self.lease.valid() else None
        if lease is not None and self.registered != lease:
            body = json.dumps({"url": self.url, "since": time.time()}).encode()
            await self.etcd.txn([], [Put(self.keys.member(self.member), body, lease)])
            self.registered = lease
            self.observing.republish()
            log.info("cluster: %s joined as a member (lease %x)", self.member, lease,
                     extra={"event": "cluster_join", "member": self.member})
        synced = self.mirror.synced.is_set()
        leader = self.leader
        if lease is not None and synced and leader is None:
            revision = await self.election.campaign(lease)
            if revision is not None:
                leader = Leader(self.member, self.url, revision, lease)
        mine = (leader is not None and lease is not None and leader.lease == lease
                and leader.member == self.member)
        if mine and not self.leading and leader is not None:
            await self._take_over(leader)
        elif not mine and self.leading:
            self._step_down("the lease or the leader key is no longer ours")
        if self.leading and (self.store.dirty or self.store.dirty_moves
                             or self.store.dirty_audit):
            why = await self.facts.flush()
            if why is not None:
                log.debug("cluster: facts not written yet: %s", why)
        if self.leading and time.monotonic() - self._pruned_at > PRUNE_EVERY:
            self._pruned_at = time.monotonic()
            await self._prune()

    async def _take_over(self, leader: Leader) -> None:
        failover = self.failover
        if failover is None:
            return
        epoch = await self.election.raise_epoch(leader.revision, self.store.epoch())
        if epoch is None:
            return
        self.store.set_flag("epoch", epoch)
        self.facts.lead(leader.revision, epoch)
        self.facts.take_all(self.mirror.under(self.keys.facts))
        self.store.marking = True
        adopted = self.facts.adopt_journal(self.mirror.under(self.keys.journal))
        failover.take_over(epoch)
        self.leader, self.leading = leader, True
        self.leader_changes += 1
        log.warning("cluster: %s is the leader (epoch %d, %d open moves adopted)", self.member,
                    epoch, adopted, extra={"event": "cluster_leader", "member": self.member,
                                           "epoch": epoch})
        why = await self.facts.flush()
        if why is not None:
            log.warning("cluster: the new leader's facts are not in etcd yet: %s", why)
        self._recovery = asyncio.create_task(self._recover(failover), name="cluster-recovery")

    async def _recover(self, failover: FailoverManager) -> None:
        records = await failover.recover_journal()
        if records:
            log.warning("cluster: %d open moves closed by the new leader", len(records))

    async def _prune(self) -> None:
        """Bounded retention of finished moves and audit entries in etcd."""
        await self.facts.prune(list(self.mirror.under(self.keys.history)), HISTORY_KEPT)
        await self.facts.prune(list(self.mirror.under(self.keys.audit)), AUDIT_KEPT)

    def _step_down(self, why: str) -> None:
        if not self.leading:
            return
        self.leading = False
        self.facts.leader_revision = 0
        store = self.store
        store.marking = False
        store.dirty.clear()
        store.dirty_moves.clear()
        store.dirty_audit.clear()
        store.replaces.clear()
        log.warning("cluster: %s stops leading: %s", self.member, why,
                    extra={"event": "cluster_step_down", "member": self.member, "why": why})
        self.facts.take_all(self.mirror.under(self.keys.facts))

    def _lease_changed(self, lease: int | None) -> None:
        if lease is None:
            self._step_down("the cluster lease is in doubt")
        self._wake.set()

    # --- the mirror ---------------------------------------------------------------------
    def _changed(self, key: str, kv: KeyValue | None) -> None:
        keys = self.keys
        try:
            if key.startswith(keys.verdicts):
                self.observing.take(key, kv)
            elif key.startswith(keys.members):
                self._member_changed(keys.member_of(key), kv)
            elif key == keys.leader:
                self.leader = read_leader(kv)
                if self.leading and (self.leader is None or self.leader.lease != self.lease.id):
                    self._step_down("the leader key is gone or another's")
                self._wake.set()
            elif (key.startswith((keys.history, keys.audit))
                  or (key.startswith(keys.facts) and not self.leading)):
                self.facts.take(key, kv)
        except Exception:
            log.exception("cluster: applying %s failed", key)

    def _member_changed(self, member: str, kv: KeyValue | None) -> None:
        if kv is None:
            if self.members.pop(member, None) is None:
                return
            log.warning("cluster: member %s left", member,
                        extra={"event": "cluster_member_left", "member": member})
        else:
            try:
                url = str(json.loads(kv.value)["url"])
            except (ValueError, KeyError, TypeError):
                log.warning("cluster: member key of %s is malformed; ignored", member)
                return
            if self.members.get(member) == url:
                return
            self.members[member] = url
            log.info("cluster: member %s at %s", member, url,
                     extra={"event": "cluster_member", "member": member})
        self.reshard()

    def reshard(self) -> None:
        shards = Shards(self.members, [rt.name for rt in self.fleet], self.config.observers)
        mine = self.observing.set_shards(shards)
        if self.prober is not None:
            self.prober.retarget(mine)
        log.info("cluster: %d members; %s probes %d masters", len(self.members), self.member,
                 len(mine), extra={"event": "cluster_shard", "masters": len(mine)})
