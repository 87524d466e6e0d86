"""Durable state in SQLite: audit log, failover history and journal, assignments, flags,
checkpoints.

Why SQLite: one file next to the exporter, transactional, readable with stock tools. WAL with
``synchronous=FULL`` on the main connection makes every committed journal entry survive a
SIGKILL (and a power cut); checkpoints go through a second connection with
``synchronous=NORMAL`` because they are re-pulled every interval anyway, and they can be
written from a worker thread so that a 10 MB snapshot does not stall the event loop.

Every write either commits before its call returns or, while the file fails, waits in memory
and is replayed later (``database.py``); reads see both. The schema is versioned
(``schema.py``); opening an up-to-date file is a no-op.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from exporter.store.backlog import LIMIT, Stmt, execute, insert, rollback
from exporter.store.database import UPSERT_CHECKPOINT, Database, StoreError
from exporter.store.pending import Checkpoint
from exporter.store.schema import OPEN_RESULT, SCHEMA_VERSION

__all__ = ["OPEN_RESULT", "SCHEMA_VERSION", "Store", "StoreError"]

Row = sqlite3.Row | Mapping[str, Any]
BRIEF = ("id", "started", "finished", "master", "backup", "result", "trigger", "reason",
         "duration", "kind")
UPSERT_CLEANUP = (" ON CONFLICT DO UPDATE SET failover_id = excluded.failover_id,"
                  " last_error = excluded.last_error")
UPSERT_FLAG = ("INSERT INTO flags (name, value) VALUES (?, ?) ON CONFLICT(name)"
               " DO UPDATE SET value = excluded.value")


def _decode(row: Row, json_fields: Iterable[str]) -> dict[str, Any]:
    out = dict(row)
    for f in json_fields:
        if f in out and isinstance(out[f], str):
            out[f] = json.loads(out[f])
    return out


RESTAMP_CHECKPOINT = "UPDATE checkpoints SET ts = ? WHERE master = ? AND checksum = ?"


class Store(Database):
    """All persistent state of the exporter; every method is one short transaction (or, while
    the file fails, one entry of the backlog)."""

    def __init__(self, path: str | Path, backlog_limit: int = LIMIT) -> None:
        super().__init__(path, backlog_limit)
        # a 304 stamps a checkpoint in memory; ``flush_stamps`` writes a round's stamps in one
        # transaction. ``_kept``: the checksum of each checkpoint as the file holds it.
        self._kept: dict[str, str] = {}
        self._stamps: dict[str, float] = {}

    def close(self) -> None:
        if not self._closed:
            self.flush_stamps()
        super().close()

    # --- audit ----------------------------------------------------------------------------
    def audit(self, actor: str, action: str, master: str | None = None,
              detail: dict[str, Any] | None = None, ts: float | None = None) -> int:
        """Append one audit entry; returns its id."""
        return self._insert("audit", "audit", {
            "ts": time.time() if ts is None else ts, "actor": actor, "action": action,
            "master": master, "detail": json.dumps(detail or {}, default=str, sort_keys=True),
        }, droppable=True)

    def list_audit(self, limit: int = 50, before: int | None = None, offset: int = 0,
                   master: str | None = None) -> list[dict[str, Any]]:
        """Newest first. Page with ``before`` (an id cursor, stable while entries are added) or
        ``offset``."""
        return [_decode(r, ("detail",))
                for r in self._page("audit", None, limit, before, offset, master)]

    def count_audit(self, master: str | None = None) -> int:
        return self._count("audit", master)

    def _page(self, table: str, columns: Sequence[str] | None, limit: int,
              before: int | None, offset: int, master: str | None) -> Sequence[Row]:
        """A page of ``table`` newest first, with the rows waiting in memory."""
        where, params = self._page_filter(before, master)
        limit, offset = max(0, limit), max(0, offset)
        cols = ", ".join(columns) if columns else "*"
        if not self._view.rows[table]:
            return self._read(f"SELECT {cols} FROM {table} {where} ORDER BY id DESC"
                              " LIMIT ? OFFSET ?", (*params, limit, offset))
        extra = len(self._view.matching(table, before, master))
        rows = self._read(f"SELECT {cols} FROM {table} {where} ORDER BY id DESC LIMIT ?",
                          (*params, limit + offset + extra))
        return self._view.page(table, [dict(r) for r in rows], before, master, limit, offset,
                               columns)

    def _count(self, table: str, master: str | None) -> int:
        where, params = self._page_filter(None, master)
        disk = int(self._read(f"SELECT COUNT(*) FROM {table} {where}", params)[0][0])
        return disk + len(self._view.matching(table, None, master))

    @staticmethod
    def _page_filter(before: int | None, master: str | None) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if before is not None:
            clauses.append("id < ?")
            params.append(before)
        if master is not None:
            clauses.append("master = ?")
            params.append(master)
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", params

    # --- failovers and the journal ----------------------------------------------------------
    def begin_failover(self, master: str, trigger: str, reason: str, started: float,
                       kind: str = "failover") -> int:
        """Open a failover row (result ``in_progress``) before anything is done."""
        return self._insert("failover", "failovers", {
            "started": started, "master": master, "result": OPEN_RESULT, "trigger": trigger,
            "reason": reason, "kind": kind})

    def journal(self, failover_id: int, step: str, status: str, backup: str | None = None,
                detail: dict[str, Any] | None = None, ts: float | None = None) -> None:
        """Write-ahead entry: committed (fsync'd) before the step it announces runs, or kept in
        memory while the file fails."""
        self._insert("journal", "journal", {
            "failover_id": failover_id, "step": step, "status": status, "backup": backup,
            "ts": time.time() if ts is None else ts,
            "detail": json.dumps(detail or {}, default=str, sort_keys=True)})

    def journal_entries(self, failover_id: int) -> list[dict[str, Any]]:
        rows: list[Row] = list(self._read(
            "SELECT * FROM journal WHERE failover_id = ? ORDER BY id", (failover_id,)))
        rows += self._view.journal.get(failover_id, [])
        return [_decode(r, ("detail",)) for r in rows]

    def finish_failover(self, failover_id: int, result: str, backup: str | None,
                        finished: float, duration: float, steps: list[dict[str, Any]],
                        candidates: list[dict[str, Any]], reason: str | None = None) -> None:
        """Close a failover row; the journal gets a final ``finish`` entry in the same
        transaction so recovery never sees a closed row with an open journal."""
        patch = {"finished": finished, "backup": backup, "result": result,
                 "duration": duration, "steps": json.dumps(steps, default=str),
                 "candidates": json.dumps(candidates, default=str)}
        update = Stmt("UPDATE failovers SET finished = ?, backup = ?, result = ?, duration = ?,"
                      " steps = ?, candidates = ?, reason = COALESCE(?, reason) WHERE id = ?",
                      (*patch.values(), reason, failover_id))
        entry = {"failover_id": failover_id, "step": "finish", "status": result,
                 "backup": backup, "ts": finished, "detail": "{}"}
        cur = self._direct("failover", update, insert("journal", entry))
        if cur is not None:
            self._ids["journal"] = max(self._ids.get("journal", 0), int(cur.lastrowid or 0))
            return
        full = {"id": self._next_id("journal"), **entry}
        self._defer("failover", [update, insert("journal", full)])
        self._view.update("failovers", failover_id,
                          patch if reason is None else {**patch, "reason": reason})
        self._view.add_journal(full)

    def record_failover(self, master: str, result: str, trigger: str, reason: str,
                        started: float, backup: str | None = None, duration: float = 0.0,
                        steps: list[dict[str, Any]] | None = None,
                        candidates: list[dict[str, Any]] | None = None,
                        kind: str = "failover") -> int:
        """A failover that did not execute (skipped_cooldown, dry_run, paused...): one row."""
        return self._insert("failover", "failovers", {
            "started": started, "finished": started + duration, "master": master,
            "backup": backup, "result": result, "trigger": trigger, "reason": reason,
            "duration": duration, "steps": json.dumps(steps or [], default=str),
            "candidates": json.dumps(candidates or [], default=str), "kind": kind})

    def get_failover(self, failover_id: int) -> dict[str, Any] | None:
        try:
            rows = self._read("SELECT * FROM failovers WHERE id = ?", (failover_id,))
        except StoreError:
            if not self._view.is_new("failovers", failover_id):
                raise
            rows = []
        row = self._view.row("failovers", failover_id, dict(rows[0]) if rows else None)
        return _decode(row, ("steps", "candidates")) if row else None

    def list_failovers(self, limit: int = 50, before: int | None = None, offset: int = 0,
                       master: str | None = None, brief: bool = False) -> list[dict[str, Any]]:
        """Newest first; ``before`` is an id cursor (use the last id of the previous page).
        ``brief`` leaves out steps and candidates (at 1,000 masters a record's candidate list
        is ~150 kB; a history page rarely needs it)."""
        return [_decode(r, ("steps", "candidates")) for r in
                self._page("failovers", BRIEF if brief else None, limit, before, offset, master)]

    def count_failovers(self, master: str | None = None) -> int:
        return self._count("failovers", master)

    def unfinished_failovers(self) -> list[dict[str, Any]]:
        """Rows a crash left open, oldest first: recover_journal's work list (read at start,
        before anything can wait in memory)."""
        rows = self._read("SELECT * FROM failovers WHERE finished IS NULL ORDER BY id")
        return [_decode(r, ("steps", "candidates")) for r in rows]

    def last_failover_times(self, results: Sequence[str]) -> dict[str, float]:
        """Start time of the newest failover per master among ``results`` (cooldown restore,
        read at start)."""
        marks = ",".join("?" * len(results))
        rows = self._read(
            f"SELECT master, MAX(started) AS started FROM failovers WHERE result IN ({marks})"
            " GROUP BY master",
            tuple(results),
        )
        return {r["master"]: float(r["started"]) for r in rows}

    # --- assignments: duty of master -> held by backup --------------------------------------
    def move_duties(self, duties: Sequence[str], holder: str, since: float,
                    failover_id: int | None = None) -> None:
        """Atomically hand ``duties`` to ``holder``; a master's own duty coming back to it
        drops the assignment row (it is its own again)."""
        stmts = [Stmt("DELETE FROM assignments WHERE master = ?", (duty,)) if duty == holder
                 else Stmt("INSERT INTO assignments (master, backup, since, failover_id)"
                           " VALUES (?, ?, ?, ?) ON CONFLICT(master) DO UPDATE SET"
                           " backup = excluded.backup, since = excluded.since,"
                           " failover_id = excluded.failover_id",
                           (duty, holder, since, failover_id))
                 for duty in duties]
        if stmts and self._direct("assignment", *stmts) is None:
            self._defer("assignment", stmts)
            self._view.move(duties, holder, since, failover_id)

    def assignments(self) -> dict[str, dict[str, Any]]:
        """{taken-over master: {"backup", "since", "failover_id"}}."""
        return self._view.assignments(
            {r["master"]: {"backup": r["backup"], "since": r["since"],
                           "failover_id": r["failover_id"]}
             for r in self._read("SELECT * FROM assignments")})

    # --- cleanup: undo calls that could not reach their master, retried later ----------------
    def add_cleanup(self, master: str, action: str, arg: str | None, failover_id: int | None,
                    error: str = "") -> None:
        row = {"ts": time.time(), "master": master, "action": action, "arg": arg,
               "failover_id": failover_id, "last_error": error}
        if self._direct("cleanup", insert("cleanup", row, UPSERT_CLEANUP)) is not None:
            return
        same = next((r for r in self.cleanups() if (r["master"], r["action"], r["arg"] or "")
                     == (master, action, arg or "")), None)
        full = {"id": same["id"] if same else self._next_id("cleanup"), **row}
        self._defer("cleanup", [insert("cleanup", full, UPSERT_CLEANUP)])
        self._view.add_cleanup({**same, "failover_id": failover_id, "last_error": error}
                               if same else self._as_row("cleanup", full))

    def cleanups(self) -> list[dict[str, Any]]:
        return self._view.cleanup_rows(
            dict(r) for r in self._read_or([], "SELECT * FROM cleanup ORDER BY id"))

    def cleanup_done(self, cleanup_id: int) -> None:
        stmt = Stmt("DELETE FROM cleanup WHERE id = ?", (cleanup_id,))
        if self._direct("cleanup", stmt) is None:
            self._defer("cleanup", [stmt])
            self._view.cleanup_done(cleanup_id)

    # --- maintenance and pause ----------------------------------------------------------------
    def set_maintenance(self, master: str, on: bool, since: float | None = None) -> None:
        since = (time.time() if since is None else since) if on else None
        stmt = (Stmt("INSERT OR IGNORE INTO maintenance (master, since) VALUES (?, ?)",
                     (master, since)) if on
                else Stmt("DELETE FROM maintenance WHERE master = ?", (master,)))
        if self._direct("maintenance", stmt) is None:
            self._defer("maintenance", [stmt])
            self._view.set_maintenance(master, since)

    def maintenance(self) -> dict[str, float]:
        return self._view.maintenance_of(
            {r["master"]: r["since"] for r in self._read("SELECT * FROM maintenance")})

    def set_flag(self, name: str, value: Any) -> None:
        stmt = Stmt(UPSERT_FLAG, (name, json.dumps(value)))
        if self._direct("flag", stmt) is None:
            self._defer_flag(stmt)

    def _defer_flag(self, stmt: Stmt) -> None:
        self._defer("flag", [stmt])
        self._view.flags[stmt.params[0]] = stmt.params[1]

    def flag(self, name: str, default: Any = None) -> Any:
        if name in self._view.flags:
            return json.loads(self._view.flags[name])
        rows = self._read("SELECT value FROM flags WHERE name = ?", (name,))
        return json.loads(rows[0][0]) if rows else default

    def set_paused(self, paused: bool) -> None:
        self.set_flag("paused", bool(paused))

    def paused(self) -> bool:
        return bool(self.flag("paused", False))

    # --- fencing epoch ------------------------------------------------------------------------
    def next_epoch(self) -> int:
        """Raise the persisted fencing epoch by one and return it, in one statement: called
        once per start of the exporter, so a restarted exporter outranks a stale one that still
        runs, and the number never goes down (docs/protocol.md, "Fencing epochs"). While the
        file fails, the raised epoch waits in memory like any write."""
        if not len(self._backlog):
            try:
                with self._lock:
                    rows = self._db.execute(
                        "INSERT INTO flags (name, value) VALUES ('epoch', '1') ON CONFLICT(name)"
                        " DO UPDATE SET value = CAST(value AS INTEGER) + 1 RETURNING value"
                    ).fetchall()
                return int(rows[0][0])
            except sqlite3.Error as exc:
                with self._lock:
                    rollback(self._db)
                self._failed("flag", exc)
        else:
            self.health.count("flag")
        epoch = self.epoch() + 1
        self._defer_flag(Stmt(UPSERT_FLAG, ("epoch", json.dumps(epoch))))
        return epoch

    def epoch(self) -> int:
        """The last epoch handed out by ``next_epoch``; 0 before the first start."""
        return int(self.flag("epoch", 0))

    # --- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, master: str, ts: float, checksum: str, snapshot: bytes) -> None:
        """Keep ``snapshot`` (the raw JSON bytes as the master sent them) as the latest for
        ``master``; kept in memory if the file refuses it. Safe to call from a worker thread
        (see ``asave_checkpoint``)."""
        try:
            with self._ckpt_lock:
                self._ckpt.execute(UPSERT_CHECKPOINT, (master, ts, checksum, len(snapshot),
                                                       sqlite3.Binary(snapshot)))
        except sqlite3.Error as exc:
            self._failed("checkpoint", exc)
            self._ckpts.put(master, (ts, checksum, snapshot))
            with self._ckpt_lock:
                self._kept.pop(master, None)
                self._stamps.pop(master, None)
            return
        self._ckpts.discard(master)
        with self._ckpt_lock:
            self._kept[master] = checksum
            self._stamps.pop(master, None)

    async def asave_checkpoint(self, master: str, ts: float, checksum: str,
                               snapshot: bytes) -> None:
        """``save_checkpoint`` off the event loop when the snapshot is big."""
        if len(snapshot) < 256 * 1024 or self._ckpt is self._db:
            self.save_checkpoint(master, ts, checksum, snapshot)
        else:
            await asyncio.to_thread(self.save_checkpoint, master, ts, checksum, snapshot)
            if self.waiting:
                self._arm_timer()  # the worker thread has no loop to arm it on

    def touch_checkpoint(self, master: str, ts: float, checksum: str) -> bool:
        """Stamp the kept checkpoint of ``master`` as taken at ``ts`` when it is still the one
        ``checksum`` names (the master answered 304: nothing changed); False when it is not,
        or when the file refuses the update (counted like any refused write)."""
        if self._ckpts.restamp(master, ts, checksum):
            return True
        with self._ckpt_lock:
            kept = self._kept.get(master)
            if kept is not None:  # known: stamped in memory, written by ``flush_stamps``
                if kept != checksum:
                    return False
                self._stamps[master] = ts
                return True
        try:
            with self._ckpt_lock:
                cur = self._ckpt.execute(RESTAMP_CHECKPOINT, (ts, master, checksum))
                if cur.rowcount > 0:
                    self._kept[master] = checksum
        except sqlite3.Error as exc:
            self._failed("checkpoint", exc)
            return False
        return cur.rowcount > 0

    def flush_stamps(self) -> None:
        """Write the times that 304s vouched for since the last flush, in one transaction.
        Until then (or if the file refuses them) they live in memory: a crash loses them, and
        the checkpoints then look older than they are, never newer."""
        with self._ckpt_lock:
            rows = [(ts, m, self._kept[m]) for m, ts in self._stamps.items() if m in self._kept]
            if not rows:
                return
            try:
                execute(self._ckpt, [Stmt(RESTAMP_CHECKPOINT, row) for row in rows])
            except sqlite3.Error as exc:
                failure: sqlite3.Error | None = exc
            else:
                failure = None
                for _, master, _ in rows:
                    self._stamps.pop(master, None)
        if failure is not None:
            self._failed("checkpoint", failure)

    async def aflush_stamps(self) -> None:
        """``flush_stamps`` off the event loop (a round's stamps are one row per master)."""
        if self._ckpt is self._db:
            self.flush_stamps()
        else:
            await asyncio.to_thread(self.flush_stamps)
            if self.waiting:
                self._arm_timer()  # the worker thread has no loop to arm it on

    def checkpoint(self, master: str) -> Checkpoint | None:
        """(ts, checksum, raw snapshot bytes) of the latest checkpoint, or None."""
        pending = self._ckpts.get(master)
        if pending is not None:
            return pending
        try:
            with self._ckpt_lock:
                row = self._ckpt.execute(
                    "SELECT ts, checksum, snapshot FROM checkpoints WHERE master = ?", (master,)
                ).fetchone()
        except sqlite3.Error as exc:
            self._failed("read", exc)
            return None
        if not row:
            return None
        stamped = self._stamps.get(master)
        ts = stamped if stamped is not None and self._kept.get(master) == row[1] else row[0]
        return (float(ts), str(row[1]), bytes(row[2]))

    async def acheckpoint(self, master: str) -> Checkpoint | None:
        if self._ckpt is self._db or self._ckpts.get(master) is not None:
            return self.checkpoint(master)
        return await asyncio.to_thread(self.checkpoint, master)

    def checkpoint_times(self) -> dict[str, float]:
        """{master: ts of its latest checkpoint} without reading the snapshots."""
        try:
            with self._ckpt_lock:
                rows = self._ckpt.execute("SELECT master, ts FROM checkpoints").fetchall()
        except sqlite3.Error as exc:
            self._failed("read", exc)
            rows = []
        times = {r[0]: float(r[1]) for r in rows}
        times.update((m, ts) for m, ts in self._stamps.items() if m in times)
        return {**times, **self._ckpts.times()}
