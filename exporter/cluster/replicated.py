"""The local store, with every fact a new leader needs marked for etcd as it is written.

A leader writes through this store exactly as a single node does; each write of a shared fact
(assignments, maintenance, pause and strategy, queued undo calls, a move's journal, a finished
move) marks what changed. ``FactWriter`` (``facts.py``) copies the marked facts to etcd before
the next control call goes out, so a move's journal is in etcd before the step it announces
runs. A follower's store is written with marking off: its facts come from the leader.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from exporter.store import Store

ASSIGNMENTS, MAINTENANCE, FLAGS, CLEANUPS = "assignments", "maintenance", "flags", "cleanups"
SHARED_FLAGS = ("paused", "strategy", "resets")


class ReplicatedStore(Store):
    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.marking = False  # on while this replica leads
        self.dirty: set[str] = set()
        self.dirty_moves: set[int] = set()
        self.replaces: dict[int, str] = {}  # local move id -> journal key of the leader before
        self.dirty_audit: list[dict[str, Any]] = []  # entries not in etcd yet, oldest first
        self.on_mark: Callable[[], None] = lambda: None

    def _mark(self, fact: str | None = None, move: int | None = None) -> None:
        if not self.marking:
            return
        if fact is not None:
            self.dirty.add(fact)
        if move is not None:
            self.dirty_moves.add(move)
        self.on_mark()

    def audit(self, actor: str, action: str, master: str | None = None,
              detail: dict[str, Any] | None = None, ts: float | None = None) -> int:
        ts = time.time() if ts is None else ts
        entry = super().audit(actor, action, master, detail, ts)
        if self.marking:
            self.dirty_audit.append({"ts": ts, "actor": actor, "action": action,
                                     "master": master, "detail": detail or {}})
            self.on_mark()
        return entry

    def has_audit(self, ts: float, actor: str, action: str) -> bool:
        """Whether this entry is here already (imported once)."""
        return bool(self._read_or([], "SELECT 1 FROM audit WHERE ts = ? AND actor = ? AND"
                                  " action = ?", (ts, actor, action)))

    def move_duties(self, duties: Sequence[str], holder: str, since: float,
                    failover_id: int | None = None) -> None:
        super().move_duties(duties, holder, since, failover_id)
        self._mark(ASSIGNMENTS)

    def set_maintenance(self, master: str, on: bool, since: float | None = None) -> None:
        super().set_maintenance(master, on, since)
        self._mark(MAINTENANCE)

    def set_flag(self, name: str, value: Any) -> None:
        super().set_flag(name, value)
        if name in SHARED_FLAGS:
            self._mark(FLAGS)

    def add_cleanup(self, master: str, action: str, arg: str | None, failover_id: int | None,
                    error: str = "") -> None:
        super().add_cleanup(master, action, arg, failover_id, error)
        self._mark(CLEANUPS)

    def cleanup_done(self, cleanup_id: int) -> None:
        super().cleanup_done(cleanup_id)
        self._mark(CLEANUPS)

    def begin_failover(self, master: str, trigger: str, reason: str, started: float,
                       kind: str = "failover") -> int:
        move = super().begin_failover(master, trigger, reason, started, kind)
        self._mark(move=move)
        return move

    def journal(self, failover_id: int, step: str, status: str, backup: str | None = None,
                detail: dict[str, Any] | None = None, ts: float | None = None) -> None:
        super().journal(failover_id, step, status, backup, detail, ts)
        self._mark(move=failover_id)

    def finish_failover(self, failover_id: int, result: str, backup: str | None,
                        finished: float, duration: float, steps: list[dict[str, Any]],
                        candidates: list[dict[str, Any]], reason: str | None = None) -> None:
        super().finish_failover(failover_id, result, backup, finished, duration, steps,
                                candidates, reason)
        self._mark(move=failover_id)

    def record_failover(self, master: str, result: str, trigger: str, reason: str,
                        started: float, backup: str | None = None, duration: float = 0.0,
                        steps: list[dict[str, Any]] | None = None,
                        candidates: list[dict[str, Any]] | None = None,
                        kind: str = "failover") -> int:
        move = super().record_failover(master, result, trigger, reason, started, backup,
                                       duration, steps, candidates, kind)
        self._mark(move=move)
        return move

    def has_failover(self, master: str, started: float) -> bool:
        """Whether a record of this move is here already (history imported once)."""
        return bool(self._read_or([], "SELECT 1 FROM failovers WHERE master = ? AND started = ?",
                                  (master, started)))
