"""The facts a new leader needs, between the leader's store and etcd.

The leader writes what its store marked (``replicated.py``) in one transaction per flush,
conditioned on the leader key still being the one it created: a replica that lost the lead
cannot overwrite its successor's facts. Layout under the prefix:

* ``facts/assignments``, ``facts/maintenance``, ``facts/flags``, ``facts/cleanups``: the whole
  table each (small, rewritten when it changes);
* ``journal/<epoch>-<id>``: a move in flight with its journal entries, deleted when it ends;
* ``history/<finished>-<epoch>-<id>``: each finished move, the newest ``HISTORY_KEPT`` kept.

A follower copies facts into its store as they change, and imports each finished move into
its own history once, so the API shows the same history on every replica and a follower that
becomes leader starts with the cooldowns and the journal of the leader before it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exporter.cluster.etcd import Compare, Delete, Etcd, EtcdError, KeyValue, Put
from exporter.cluster.keys import Keys
from exporter.cluster.replicated import (
    ASSIGNMENTS,
    CLEANUPS,
    FLAGS,
    MAINTENANCE,
    ReplicatedStore,
)

log = logging.getLogger(__name__)

HISTORY_KEPT = 500
AUDIT_KEPT = 1000
AUDIT_PER_TXN = 40
MOVES_PER_TXN = 24  # etcd allows 128 operations per transaction by default
CANDIDATES_KEPT = 20  # a record's candidate list is cut in etcd (all of it stays local)


@dataclass
class Owners:
    """Where a follower's copied facts take effect, besides its store."""

    assignments: Callable[[], None]  # the duty table re-reads the store
    maintenance: Callable[[str, bool], None]  # a master's health machine drained or not
    paused: Callable[[bool], None]
    strategy: Callable[[str | None], None]
    reset: Callable[[str], None]  # an operator's reset reaches this replica's observer


def _dumps(value: Any) -> bytes:
    return json.dumps(value, default=str, sort_keys=True, separators=(",", ":")).encode()


class Facts:
    def __init__(self, etcd: Etcd, keys: Keys, store: ReplicatedStore, owners: Owners) -> None:
        self.etcd = etcd
        self.keys = keys
        self.store = store
        self.owners = owners
        self.leader_revision = 0  # create revision of our leader key; 0 while following
        self.epoch = 0
        self.writes = 0  # transactions written, for the benchmark of steady-state writes
        self._written: dict[str, bytes] = {}  # each fact table as last written to etcd
        self._pending: dict[str, bytes] = {}  # ... and as the transaction in flight writes it
        self._lock = asyncio.Lock()

    # --- the leader's side ---------------------------------------------------------------
    def lead(self, revision: int, epoch: int) -> None:
        """Write as the leader whose key was created at ``revision``; what an earlier term
        wrote may have been overwritten since, so every table is written afresh."""
        self.leader_revision, self.epoch = revision, epoch
        self._written.clear()

    async def flush(self) -> str | None:
        """Write every marked fact; None when all are in etcd, else why not."""
        async with self._lock:
            store = self.store
            while store.dirty or store.dirty_moves or store.dirty_audit:
                if not self.leader_revision:
                    return "not the cluster leader"
                facts = set(store.dirty)
                moves = sorted(store.dirty_moves)[:MOVES_PER_TXN]
                audit = store.dirty_audit[:AUDIT_PER_TXN]
                store.dirty -= facts
                store.dirty_moves -= set(moves)
                del store.dirty_audit[:len(audit)]
                self._pending.clear()
                ops, replaced = self._ops(facts, moves)
                if not ops and not audit:
                    continue
                ops += [Put(f"{self.keys.audit}{float(e['ts']):017.6f}-{self.epoch}-{i}-"
                            f"{self.writes}", _dumps(e)) for i, e in enumerate(audit)]
                try:
                    done = await self.etcd.txn(
                        [Compare(self.keys.leader, "create", self.leader_revision)], ops)
                except EtcdError as exc:
                    self._unmark(facts, moves, audit)
                    return f"etcd did not take the write: {exc}"
                if not done.succeeded:
                    self._unmark(facts, moves, audit)
                    return "the leader key is no longer this replica's"
                self.writes += 1
                self._written.update(self._pending)
                for move in replaced:
                    store.replaces.pop(move, None)
            return None

    def _unmark(self, facts: set[str], moves: list[int], audit: list[dict[str, Any]]) -> None:
        """What a failed flush took is marked again, in its order."""
        store = self.store
        store.dirty |= facts
        store.dirty_moves |= set(moves)
        store.dirty_audit[:0] = audit

    def _ops(self, facts: set[str], moves: list[int]) -> tuple[list[Put | Delete], list[int]]:
        store, keys = self.store, self.keys
        ops: list[Put | Delete] = []
        tables: dict[str, Callable[[], Any]] = {
            ASSIGNMENTS: store.assignments, MAINTENANCE: store.maintenance,
            FLAGS: lambda: {"paused": store.paused(), "strategy": store.flag("strategy"),
                            "resets": store.flag("resets", {})},
            CLEANUPS: lambda: sorted(
                ({"master": r["master"], "action": r["action"], "arg": r["arg"],
                  "failover_id": r["failover_id"]} for r in store.cleanups()),
                key=lambda r: (r["master"], r["action"], r["arg"] or ""))}
        for name in sorted(facts):  # a table is written only when its content changed
            value = _dumps(tables[name]())
            if self._written.get(name) != value:
                ops.append(Put(keys.fact(name), value))
                self._pending[name] = value
        replaced = []
        for move in moves:
            row = store.get_failover(move)
            if row is None:
                continue
            journal_key = f"{keys.journal}{self.epoch}-{move}"
            if row.get("finished") is None:
                ops.append(Put(journal_key, _dumps(
                    {"failover": row, "journal": store.journal_entries(move)})))
            else:
                ops.append(Delete(journal_key))
                row["candidates"] = (row.get("candidates") or [])[:CANDIDATES_KEPT]
                ops.append(Put(f"{keys.history}{float(row['finished']):017.6f}-{self.epoch}-"
                               f"{move}", _dumps(row)))
            if move in store.replaces:
                ops.append(Delete(store.replaces[move]))
                replaced.append(move)
        return ops, replaced

    async def prune(self, keys: list[str], kept: int) -> None:
        """Keep the newest ``kept`` of ``keys`` in etcd (finished moves or audit entries:
        their keys sort by time)."""
        extra = sorted(keys)[:-kept] if len(keys) > kept else []
        for start in range(0, len(extra), MOVES_PER_TXN * 4):
            chunk = extra[start:start + MOVES_PER_TXN * 4]
            try:
                await self.etcd.txn([Compare(self.keys.leader, "create", self.leader_revision)],
                                    [Delete(key) for key in chunk])
            except EtcdError as exc:
                log.warning("cluster: pruning old records in etcd failed: %s", exc)
                return

    # --- taking the leader's facts --------------------------------------------------------
    def take(self, key: str, kv: KeyValue | None) -> None:
        """A follower copies one changed fact (or finished move) into its store."""
        if kv is None:
            return  # facts are rewritten, never deleted; pruned history stays imported
        try:
            value = json.loads(kv.value)
        except ValueError:
            log.warning("cluster: %s in etcd is not JSON; ignored", key)
            return
        try:
            if key.startswith(self.keys.facts):
                self._take_fact(key[len(self.keys.facts):], value)
            elif key.startswith(self.keys.history):
                self._import(value)
            elif key.startswith(self.keys.audit):
                self._import_audit(value)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("cluster: %s in etcd is malformed (%s); ignored", key, exc)

    def _take_fact(self, name: str, value: Any) -> None:
        store, owners = self.store, self.owners
        if name == ASSIGNMENTS:
            old = store.assignments()
            if old == value:
                return
            for duty in old.keys() - value.keys():
                store.move_duties([duty], duty, 0.0)
            for duty, a in value.items():
                if old.get(duty) != a:
                    store.move_duties([duty], str(a["backup"]), float(a["since"]),
                                      a.get("failover_id"))
            owners.assignments()
        elif name == MAINTENANCE:
            old_m = store.maintenance()
            for master in old_m.keys() - value.keys():
                store.set_maintenance(master, False)
                owners.maintenance(master, False)
            for master, since in value.items():
                if master not in old_m:
                    store.set_maintenance(master, True, float(since))
                    owners.maintenance(master, True)
        elif name == FLAGS:
            paused, strategy = bool(value["paused"]), value.get("strategy")
            if paused != store.paused():
                store.set_paused(paused)
                owners.paused(paused)
            if strategy != store.flag("strategy"):
                store.set_flag("strategy", strategy)
                owners.strategy(strategy)
            resets, seen = value.get("resets") or {}, store.flag("resets", {})
            if resets != seen:
                store.set_flag("resets", resets)
                for master, at in resets.items():
                    if float(at) > float(seen.get(master, 0.0)):
                        owners.reset(str(master))
        elif name == CLEANUPS:
            self._take_cleanups(value)

    def _take_cleanups(self, rows: list[dict[str, Any]]) -> None:
        store = self.store
        wanted = {(r["master"], r["action"], r.get("arg") or "") for r in rows}
        for row in store.cleanups():
            if (row["master"], row["action"], row["arg"] or "") not in wanted:
                store.cleanup_done(row["id"])
        for r in rows:
            store.add_cleanup(str(r["master"]), str(r["action"]), r.get("arg"),
                              r.get("failover_id"), str(r.get("last_error") or ""))

    def _import(self, row: dict[str, Any]) -> None:
        master, started = str(row["master"]), float(row["started"])
        if self.store.has_failover(master, started):
            return
        self.store.record_failover(
            master, str(row["result"]), str(row["trigger"]), str(row.get("reason") or ""),
            started, row.get("backup"), float(row.get("duration") or 0.0),
            row.get("steps") or [], row.get("candidates") or [], str(row.get("kind") or
                                                                     "failover"))

    def _import_audit(self, e: dict[str, Any]) -> None:
        ts, actor, action = float(e["ts"]), str(e["actor"]), str(e["action"])
        if not self.store.has_audit(ts, actor, action):
            master = e.get("master")
            self.store.audit(actor, action, str(master) if master is not None else None,
                             dict(e.get("detail") or {}), ts)

    def take_all(self, kvs: dict[str, KeyValue]) -> None:
        """Every fact and finished move at once (a follower starting, a leader taking over)."""
        for key in sorted(kvs):
            self.take(key, kvs[key])

    def adopt_journal(self, kvs: dict[str, KeyValue]) -> int:
        """A new leader makes each move its predecessors left open its own: a local move with
        the same journal, which crash recovery then completes or rolls back; in etcd the new
        journal key replaces the old one in one transaction. Returns how many."""
        store, adopted = self.store, 0
        for key in sorted(kvs):
            try:
                entry = json.loads(kvs[key].value)
                row, journal = entry["failover"], entry["journal"]
                move = store.begin_failover(str(row["master"]), str(row["trigger"]),
                                            str(row.get("reason") or ""),
                                            float(row["started"]), str(row.get("kind")
                                                                       or "failover"))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("cluster: open move %s in etcd is malformed (%s); left as is", key,
                          exc)
                continue
            for e in journal:
                store.journal(move, str(e["step"]), str(e["status"]), e.get("backup"),
                              e.get("detail") or {}, float(e["ts"]))
            store.replaces[move] = key
            store.dirty_moves.add(move)
            adopted += 1
            log.warning("cluster: move %s of %s left open by the leader before is now #%d "
                        "here; recovery completes or rolls it back", key, row["master"], move,
                        extra={"event": "cluster_adopt_move", "key": key, "failover_id": move})
        return adopted
