"""The leader's facts against a real etcd: written only while its leader key stands, kept when
etcd refuses, copied by a follower, bounded in retention."""

from __future__ import annotations

import json
from pathlib import Path

from exporter.cluster.etcd import Compare, Etcd, Put
from exporter.cluster.facts import Facts, Owners
from exporter.cluster.keys import Keys
from exporter.cluster.replicated import ReplicatedStore
from tests.cluster.etcd_server import EtcdServer


def owners(seen: list[str]) -> Owners:
    return Owners(assignments=lambda: seen.append("assignments"),
                  maintenance=lambda m, on: seen.append(f"maintenance {m} {on}"),
                  paused=lambda p: seen.append(f"paused {p}"),
                  strategy=lambda s: seen.append(f"strategy {s}"),
                  reset=lambda m: seen.append(f"reset {m}"))


async def lead(etcd: Etcd, keys: Keys) -> int:
    done = await etcd.txn([Compare(keys.leader, "create", 0)],
                          [Put(keys.leader, b'{"member": "a", "url": "http://a"}')])
    assert done.succeeded
    return done.revision


async def test_the_leaders_facts_reach_a_follower_and_stop_when_it_no_longer_leads(
    tmp_path: Path, etcd_server: EtcdServer,
) -> None:
    keys = Keys("/t")
    async with Etcd([etcd_server.endpoint], timeout=2.0) as etcd:
        leader_store = ReplicatedStore(tmp_path / "leader.db")
        follower_store = ReplicatedStore(tmp_path / "follower.db")
        leader = Facts(etcd, keys, leader_store, owners([]))
        seen: list[str] = []
        follower = Facts(etcd, keys, follower_store, owners(seen))
        leader.lead(await lead(etcd, keys), 7)
        leader_store.marking = True
        leader_store.move_duties(["m1"], "m3", 100.0, 1)
        leader_store.set_maintenance("m2", True, 50.0)
        leader_store.set_paused(True)
        leader_store.audit("api", "pause", None, {"why": "test"}, ts=123.5)
        assert await leader.flush() is None
        assert not leader_store.dirty and not leader_store.dirty_audit
        kvs, _ = await etcd.get_prefix(keys.root)
        follower.take_all({kv.key: kv for kv in kvs})
        assert follower_store.assignments()["m1"]["backup"] == "m3"
        assert follower_store.maintenance() == {"m2": 50.0} and follower_store.paused()
        assert sorted(seen) == ["assignments", "maintenance m2 True", "paused True"]
        assert [e["action"] for e in follower_store.list_audit()] == ["pause"]
        follower.take_all({kv.key: kv for kv in kvs})  # a second copy changes nothing
        assert len(follower_store.list_audit()) == 1 and len(seen) == 3

        await etcd.delete(keys.leader)  # another replica's turn now
        leader_store.move_duties(["m1"], "m1", 200.0, 2)
        why = await leader.flush()
        assert why is not None and "no longer" in why
        assert leader_store.dirty == {"assignments"}  # kept for a later flush
        kv = await etcd.get(keys.fact("assignments"))
        assert kv is not None and "m1" in json.loads(kv.value)  # not overwritten


async def test_retention_keeps_the_newest_records(tmp_path: Path,
                                                 etcd_server: EtcdServer) -> None:
    keys = Keys("/t")
    async with Etcd([etcd_server.endpoint], timeout=2.0) as etcd:
        facts = Facts(etcd, keys, ReplicatedStore(tmp_path / "s.db"), owners([]))
        facts.lead(await lead(etcd, keys), 1)
        names = [f"{keys.history}{t:017.6f}-1-{t}" for t in range(12)]
        for name in names:
            await etcd.put(name, b"{}")
        await facts.prune(names, 5)
        kvs, _ = await etcd.get_prefix(keys.history)
        assert [kv.key for kv in kvs] == names[-5:]


async def test_a_fact_rewritten_unchanged_costs_etcd_no_write(
    tmp_path: Path, etcd_server: EtcdServer,
) -> None:
    """A queued undo call retried every round (the same row, its error updated) must not
    rewrite the table in etcd each time: steady state writes nothing."""
    keys = Keys("/t")
    async with Etcd([etcd_server.endpoint], timeout=2.0) as etcd:
        store = ReplicatedStore(tmp_path / "leader.db")
        facts = Facts(etcd, keys, store, owners([]))
        facts.lead(await lead(etcd, keys), 3)
        store.marking = True
        store.add_cleanup("m1", "fence", None, 4, "connect refused")
        assert await facts.flush() is None
        _, before = await etcd.get_prefix(keys.root)
        writes = facts.writes
        for attempt in range(5):  # each round: retried, failed again, queued again
            store.add_cleanup("m1", "fence", None, 4, f"connect refused ({attempt})")
            assert await facts.flush() is None
        _, after = await etcd.get_prefix(keys.root)
        assert (after, facts.writes) == (before, writes)
        store.add_cleanup("m2", "fence", None, 5, "")  # a real change is written
        assert await facts.flush() is None
        kv = await etcd.get(keys.fact("cleanups"))
        assert kv is not None and [r["master"] for r in json.loads(kv.value)] == ["m1", "m2"]
