"""This replica's verdicts on the masters it probes, and the cluster's view of every master.

Each probe of a master in this replica's shard feeds the figures of its record and an observer
health machine of this replica's own (its SDOWN). The observer's verdict is published to etcd
when it changes, on this replica's lease, so it vanishes with the replica. Every replica reads
all verdicts and settles each master's record on the quorum of its current observers
(``quorum.aggregate``, ODOWN): the record's health, and so routing and failover, follow the
cluster, never one replica alone. Masters outside the shard also take their figures
(up, active, duties) from the verdict the view was taken from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from exporter.cluster.etcd import Delete, Etcd, EtcdError, KeyValue, Put
from exporter.cluster.keys import Keys
from exporter.cluster.quorum import MAX_REASON, ClusterView, Verdict, aggregate, published_queue
from exporter.cluster.shard import Shards
from exporter.config import ProbeConfig
from exporter.fleet import Fleet, HealthMachine, MasterRuntime, Outcome, Sample, State, Transition

log = logging.getLogger(__name__)

PUBLISH_EVERY = 0.05  # seconds: verdicts changed meanwhile go out in one transaction
OPS_PER_TXN = 100


class Observing:
    def __init__(self, member: str, fleet: Fleet, etcd: Etcd, keys: Keys, quorum: int,
                 publish: Callable[[Sample | Transition], None],
                 lease: Callable[[], int | None]) -> None:
        self.member = member
        self.fleet = fleet
        self.etcd = etcd
        self.keys = keys
        self.quorum = quorum
        self.publish = publish
        self.lease = lease
        self.shards = Shards((), (), 1)
        self.mine: frozenset[str] = frozenset()
        self.machines: dict[str, HealthMachine] = {}  # this replica's own view (SDOWN)
        self.verdicts: dict[str, dict[str, Verdict]] = {}  # master -> observer -> verdict
        self.views: dict[str, ClusterView] = {}
        self._published: dict[str, Verdict] = {}
        self._earned: set[str] = set()  # masters with a verdict of ours worth publishing
        self._pending: dict[str, Verdict | None] = {}  # None: delete our verdict
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.writes = 0

    # --- this replica's probes ---------------------------------------------------------------
    def observe(self, rt: MasterRuntime, outcome: Outcome, probe: ProbeConfig,
                max_recovery_attempts: int) -> None:
        """One probe of a master of this shard (``Service.on_probe`` in cluster mode)."""
        now = time.time()
        ok, reason = rt.record(outcome, now)
        name = rt.name
        machine = self.machines.get(name)
        if machine is None:
            machine = self.machines[name] = HealthMachine(
                name, probe.failure_threshold, probe.recovery_threshold, max_recovery_attempts)
        machine.observe(ok, outcome.degraded, reason, now)
        # a new observer says nothing until its probes have shown something either way
        if ok or machine.state is State.FAILED or name in self._earned:
            self._earned.add(name)
            last = self._published.get(name)
            state = str(machine.state)
            queue = published_queue(last.queue if last else None, rt.queue_length)
            if last is None or (last.state, last.up, last.active, last.duties, last.queue) != (
                    state, ok, rt.reported_active, rt.reported_duties, queue):
                try:
                    verdict = Verdict(self.member, state, ok, rt.reported_active,
                                      rt.reported_duties, reason[:MAX_REASON], queue)
                except ValueError:  # duties past a verdict's bounds: published as unknown
                    verdict = Verdict(self.member, state, ok, rt.reported_active, None,
                                      reason[:MAX_REASON], queue)
                self._published[name] = verdict
                self._pending[name] = verdict
                self._wake.set()
        self.publish(Sample(name, rt.up, rt.health.state, rt.queue_length))

    def observer_failed(self) -> dict[str, bool]:
        """``ha_master_observer_failed`` of this replica: its own view of its shard."""
        return {name: m.state is State.FAILED for name, m in self.machines.items()
                if name in self.mine}

    def reset(self, master: str) -> None:
        """An operator's reset: this observer's counters and attempt limit cleared too."""
        machine = self.machines.get(master)
        if machine is not None:
            machine.reset(time.time())

    # --- the shard -------------------------------------------------------------------------
    def set_shards(self, shards: Shards) -> frozenset[str]:
        """A new membership: this replica's shard, verdicts it no longer owes withdrawn, and
        every master settled again on its new observers."""
        self.shards = shards
        mine = frozenset(shards.shard(self.member))
        for name in self.mine - mine:
            self.machines.pop(name, None)
            self._earned.discard(name)
            if self._published.pop(name, None) is not None:
                self._pending[name] = None
                self._wake.set()
        self.mine = mine
        for rt in self.fleet:
            self.settle(rt.name)
        return mine

    # --- everybody's verdicts ----------------------------------------------------------------
    def take(self, key: str, kv: KeyValue | None) -> None:
        """Mirror listener for ``verdicts/``."""
        master, observer = self.keys.verdict_of(key)
        seen = self.verdicts.setdefault(master, {})
        if kv is None:
            seen.pop(observer, None)
        else:
            try:
                seen[observer] = Verdict.from_json(observer, kv.value)
            except ValueError as exc:
                log.warning("cluster: verdict of %s on %s is malformed (%s); ignored",
                            observer, master, exc)
                seen.pop(observer, None)
        self.settle(master)

    def settle(self, master: str) -> None:
        rt = self.fleet.get(master)
        if rt is None:
            return
        view = aggregate(self.verdicts.get(master, {}), self.shards.observers(master),
                         self.quorum)
        self.views[master] = view
        verdict = view.verdict
        if verdict is None and not view.failed:
            return  # nobody has seen it yet: keep what the record holds
        if master not in self.mine and verdict is not None:
            rt.adopt(verdict.up, verdict.active, verdict.duties, verdict.queue)
        if view.failed:
            reason = (f"failed for {len(view.failed_by)} of "
                      f"{len(self.shards.observers(master))} observers "
                      f"({', '.join(view.failed_by)}): {verdict.reason if verdict else ''}")
        else:
            reason = f"{view.state} for {verdict.observer if verdict else 'nobody'}"
        transition = rt.health.assume(State(view.state), reason, time.time())
        if master not in self.mine:
            self.publish(Sample(master, rt.up, rt.health.state, rt.queue_length))
        if transition is not None:
            self.publish(transition)

    # --- publishing ----------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster-verdicts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def republish(self) -> None:
        """A new lease: every verdict again (the old ones went with the old lease)."""
        for name, verdict in self._published.items():
            self._pending[name] = verdict
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            lease = self.lease()
            if lease is None or not self._pending:
                continue  # republish() after the next grant
            batch = dict(list(self._pending.items())[:OPS_PER_TXN])
            ops: list[Put | Delete] = [
                Put(self.keys.verdict(name, self.member), v.to_json(), lease) if v is not None
                else Delete(self.keys.verdict(name, self.member)) for name, v in batch.items()]
            try:
                await self.etcd.txn([], ops)
            except EtcdError as exc:
                log.debug("cluster: verdicts not published: %s", exc)
                await asyncio.sleep(0.5)
                self._wake.set()
                continue
            self.writes += 1
            for name, v in batch.items():
                if self._pending.get(name) is v:
                    del self._pending[name]
            if self._pending:
                self._wake.set()
            await asyncio.sleep(PUBLISH_EVERY)

