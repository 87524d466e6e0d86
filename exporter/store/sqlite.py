"""Durable state in SQLite: audit log, failover history and journal, assignments, flags,
checkpoints.

Why SQLite: one file next to the exporter, transactional, readable with stock tools. WAL with
``synchronous=FULL`` on the main connection makes every committed journal entry survive a
SIGKILL (and a power cut); checkpoints go through a second connection with
``synchronous=NORMAL`` because they are re-pulled every interval anyway, and they can be
written from a worker thread so that a 10 MB snapshot does not stall the event loop.

The schema is versioned with ``PRAGMA user_version`` and a list of migrations applied in order,
each in its own transaction; opening an up-to-date file is a no-op.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MIGRATIONS: tuple[str, ...] = (
    # 1: audit log, failovers and their write-ahead journal, duty assignments, maintenance,
    # flags, queued undo calls (cleanup), and the latest checkpoint of each master
    """
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        master TEXT,
        detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX audit_master ON audit(master, id);
    CREATE TABLE failovers (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        started REAL NOT NULL,
        finished REAL,
        master TEXT NOT NULL,
        backup TEXT,
        result TEXT NOT NULL,
        trigger TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        duration REAL,
        steps TEXT NOT NULL DEFAULT '[]',
        candidates TEXT NOT NULL DEFAULT '[]',
        kind TEXT NOT NULL DEFAULT 'failover'
    );
    CREATE INDEX failovers_master ON failovers(master, id);
    CREATE INDEX failovers_open ON failovers(finished) WHERE finished IS NULL;
    CREATE TABLE journal (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        failover_id INTEGER NOT NULL REFERENCES failovers(id),
        step TEXT NOT NULL,
        status TEXT NOT NULL,
        backup TEXT,
        ts REAL NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX journal_failover ON journal(failover_id, id);
    CREATE TABLE assignments (
        master TEXT PRIMARY KEY,
        backup TEXT NOT NULL,
        since REAL NOT NULL,
        failover_id INTEGER
    );
    CREATE TABLE maintenance (
        master TEXT PRIMARY KEY,
        since REAL NOT NULL
    );
    CREATE TABLE flags (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE cleanup (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        master TEXT NOT NULL,
        action TEXT NOT NULL,
        arg TEXT,
        failover_id INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT ''
    );
    CREATE UNIQUE INDEX cleanup_key ON cleanup(master, action, IFNULL(arg, ''));
    CREATE TABLE checkpoints (
        master TEXT PRIMARY KEY,
        ts REAL NOT NULL,
        checksum TEXT NOT NULL,
        size INTEGER NOT NULL,
        snapshot BLOB NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
OPEN_RESULT = "in_progress"


class StoreError(Exception):
    """The state file cannot be used (newer schema, corrupt, unwritable)."""


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def _decode(row: sqlite3.Row, json_fields: Iterable[str]) -> dict[str, Any]:
    out = dict(row)
    for f in json_fields:
        if f in out and isinstance(out[f], str):
            out[f] = json.loads(out[f])
    return out


class Store:
    """All persistent state of the exporter; every method is one short transaction.

    The main connection is shared by the event loop (sync calls, each a few hundred µs) and is
    guarded by a lock so that the worker-thread checkpoint writer can never interleave with it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = _connect(self.path, "FULL")
            self._lock = threading.RLock()
            self._migrate()
            # checkpoints: own connection so a big write in a thread never holds self._lock
            self._ckpt = self._db if self.path == ":memory:" else _connect(self.path, "NORMAL")
            self._ckpt_lock = self._lock if self._ckpt is self._db else threading.Lock()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    # --- schema ---------------------------------------------------------------------------
    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = self.schema_version
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {current} is newer than this build "
                f"({SCHEMA_VERSION}); refusing to touch it"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            script = MIGRATIONS[version - 1]
            with self._lock:
                # executescript commits first; wrap in an explicit transaction so that a crash
                # mid-migration leaves the previous version intact
                self._db.executescript(
                    f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version={version};\nCOMMIT;"
                )
            log.info("state store %s migrated to schema version %d", self.path, version,
                     extra={"event": "store_migration", "version": version})

    def close(self) -> None:
        with self._lock, self._ckpt_lock:  # waits for a checkpoint write in a worker thread
            if self._ckpt is not self._db:
                self._ckpt.close()
            self._db.close()

    def _write(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, params)

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # --- audit ----------------------------------------------------------------------------
    def audit(self, actor: str, action: str, master: str | None = None,
              detail: dict[str, Any] | None = None, ts: float | None = None) -> int:
        """Append one audit entry; returns its id."""
        cur = self._write(
            "INSERT INTO audit (ts, actor, action, master, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time() if ts is None else ts, actor, action, master,
             json.dumps(detail or {}, default=str, sort_keys=True)),
        )
        return int(cur.lastrowid or 0)

    def list_audit(self, limit: int = 50, before: int | None = None, offset: int = 0,
                   master: str | None = None) -> list[dict[str, Any]]:
        """Newest first. Page with ``before`` (an id cursor, stable while entries are added) or
        ``offset``."""
        where, params = self._page_filter(before, master)
        rows = self._read(
            f"SELECT * FROM audit {where} ORDER BY id DESC LIMIT ? OFFSET ?",
            (*params, max(0, limit), max(0, offset)),
        )
        return [_decode(r, ("detail",)) for r in rows]

    def count_audit(self, master: str | None = None) -> int:
        where, params = self._page_filter(None, master)
        return int(self._read(f"SELECT COUNT(*) FROM audit {where}", params)[0][0])

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
        cur = self._write(
            "INSERT INTO failovers (started, master, result, trigger, reason, kind)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (started, master, OPEN_RESULT, trigger, reason, kind),
        )
        return int(cur.lastrowid or 0)

    def journal(self, failover_id: int, step: str, status: str, backup: str | None = None,
                detail: dict[str, Any] | None = None, ts: float | None = None) -> None:
        """Write-ahead entry: committed (fsync'd) before the step it announces runs."""
        self._write(
            "INSERT INTO journal (failover_id, step, status, backup, ts, detail)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (failover_id, step, status, backup, time.time() if ts is None else ts,
             json.dumps(detail or {}, default=str, sort_keys=True)),
        )

    def journal_entries(self, failover_id: int) -> list[dict[str, Any]]:
        rows = self._read("SELECT * FROM journal WHERE failover_id = ? ORDER BY id",
                          (failover_id,))
        return [_decode(r, ("detail",)) for r in rows]

    def finish_failover(self, failover_id: int, result: str, backup: str | None,
                        finished: float, duration: float, steps: list[dict[str, Any]],
                        candidates: list[dict[str, Any]], reason: str | None = None) -> None:
        """Close a failover row; the journal gets a final ``finish`` entry in the same
        transaction so recovery never sees a closed row with an open journal."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "UPDATE failovers SET finished = ?, backup = ?, result = ?, duration = ?,"
                    " steps = ?, candidates = ?, reason = COALESCE(?, reason) WHERE id = ?",
                    (finished, backup, result, duration, json.dumps(steps, default=str),
                     json.dumps(candidates, default=str), reason, failover_id),
                )
                self._db.execute(
                    "INSERT INTO journal (failover_id, step, status, backup, ts, detail)"
                    " VALUES (?, 'finish', ?, ?, ?, '{}')",
                    (failover_id, result, backup, finished),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def record_failover(self, master: str, result: str, trigger: str, reason: str,
                        started: float, backup: str | None = None, duration: float = 0.0,
                        steps: list[dict[str, Any]] | None = None,
                        candidates: list[dict[str, Any]] | None = None,
                        kind: str = "failover") -> int:
        """A failover that did not execute (skipped_cooldown, dry_run, paused...): one row."""
        cur = self._write(
            "INSERT INTO failovers (started, finished, master, backup, result, trigger, reason,"
            " duration, steps, candidates, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (started, started + duration, master, backup, result, trigger, reason, duration,
             json.dumps(steps or [], default=str), json.dumps(candidates or [], default=str),
             kind),
        )
        return int(cur.lastrowid or 0)

    def get_failover(self, failover_id: int) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM failovers WHERE id = ?", (failover_id,))
        return _decode(rows[0], ("steps", "candidates")) if rows else None

    def list_failovers(self, limit: int = 50, before: int | None = None, offset: int = 0,
                       master: str | None = None, brief: bool = False) -> list[dict[str, Any]]:
        """Newest first; ``before`` is an id cursor (use the last id of the previous page).
        ``brief`` leaves out steps and candidates (at 1,000 masters a record's candidate list
        is ~150 kB; a history page rarely needs it)."""
        where, params = self._page_filter(before, master)
        cols = ("id, started, finished, master, backup, result, trigger, reason, duration, kind"
                if brief else "*")
        rows = self._read(
            f"SELECT {cols} FROM failovers {where} ORDER BY id DESC LIMIT ? OFFSET ?",
            (*params, max(0, limit), max(0, offset)),
        )
        return [_decode(r, ("steps", "candidates")) for r in rows]

    def count_failovers(self, master: str | None = None) -> int:
        where, params = self._page_filter(None, master)
        return int(self._read(f"SELECT COUNT(*) FROM failovers {where}", params)[0][0])

    def unfinished_failovers(self) -> list[dict[str, Any]]:
        """Rows a crash left open, oldest first: recover_journal's work list."""
        rows = self._read("SELECT * FROM failovers WHERE finished IS NULL ORDER BY id")
        return [_decode(r, ("steps", "candidates")) for r in rows]

    def last_failover_times(self, results: Sequence[str]) -> dict[str, float]:
        """Start time of the newest failover per master among ``results`` (cooldown restore)."""
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
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for duty in duties:
                    if duty == holder:
                        self._db.execute("DELETE FROM assignments WHERE master = ?", (duty,))
                    else:
                        self._db.execute(
                            "INSERT INTO assignments (master, backup, since, failover_id)"
                            " VALUES (?, ?, ?, ?) ON CONFLICT(master) DO UPDATE SET"
                            " backup = excluded.backup, since = excluded.since,"
                            " failover_id = excluded.failover_id",
                            (duty, holder, since, failover_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def assignments(self) -> dict[str, dict[str, Any]]:
        """{taken-over master: {"backup", "since", "failover_id"}}."""
        return {r["master"]: {"backup": r["backup"], "since": r["since"],
                              "failover_id": r["failover_id"]}
                for r in self._read("SELECT * FROM assignments")}

    # --- cleanup: undo calls that could not reach their master, retried later ----------------
    def add_cleanup(self, master: str, action: str, arg: str | None, failover_id: int | None,
                    error: str = "") -> None:
        self._write(
            "INSERT INTO cleanup (ts, master, action, arg, failover_id, last_error)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
            " failover_id = excluded.failover_id, last_error = excluded.last_error",
            (time.time(), master, action, arg, failover_id, error))

    def cleanups(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._read("SELECT * FROM cleanup ORDER BY id")]

    def cleanup_done(self, cleanup_id: int) -> None:
        self._write("DELETE FROM cleanup WHERE id = ?", (cleanup_id,))

    # --- maintenance and pause ----------------------------------------------------------------
    def set_maintenance(self, master: str, on: bool, since: float | None = None) -> None:
        if on:
            self._write("INSERT OR IGNORE INTO maintenance (master, since) VALUES (?, ?)",
                        (master, time.time() if since is None else since))
        else:
            self._write("DELETE FROM maintenance WHERE master = ?", (master,))

    def maintenance(self) -> dict[str, float]:
        return {r["master"]: r["since"] for r in self._read("SELECT * FROM maintenance")}

    def set_flag(self, name: str, value: Any) -> None:
        self._write("INSERT INTO flags (name, value) VALUES (?, ?) ON CONFLICT(name)"
                    " DO UPDATE SET value = excluded.value", (name, json.dumps(value)))

    def flag(self, name: str, default: Any = None) -> Any:
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
        runs, and the number never goes down (docs/protocol.md, "Fencing epochs")."""
        with self._lock:
            rows = self._db.execute(
                "INSERT INTO flags (name, value) VALUES ('epoch', '1') ON CONFLICT(name)"
                " DO UPDATE SET value = CAST(value AS INTEGER) + 1 RETURNING value"
            ).fetchall()
        return int(rows[0][0])

    def epoch(self) -> int:
        """The last epoch handed out by ``next_epoch``; 0 before the first start."""
        return int(self.flag("epoch", 0))

    # --- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, master: str, ts: float, checksum: str, snapshot: bytes) -> None:
        """Keep ``snapshot`` (the raw JSON bytes as the master sent them) as the latest for
        ``master``. Safe to call from a worker thread (see ``asave_checkpoint``)."""
        with self._ckpt_lock:
            self._ckpt.execute(
                "INSERT INTO checkpoints (master, ts, checksum, size, snapshot)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT(master) DO UPDATE SET ts = excluded.ts,"
                " checksum = excluded.checksum, size = excluded.size,"
                " snapshot = excluded.snapshot",
                (master, ts, checksum, len(snapshot), sqlite3.Binary(snapshot)),
            )

    async def asave_checkpoint(self, master: str, ts: float, checksum: str,
                               snapshot: bytes) -> None:
        """``save_checkpoint`` off the event loop when the snapshot is big."""
        if len(snapshot) < 256 * 1024 or self._ckpt is self._db:
            self.save_checkpoint(master, ts, checksum, snapshot)
        else:
            await asyncio.to_thread(self.save_checkpoint, master, ts, checksum, snapshot)

    def checkpoint(self, master: str) -> tuple[float, str, bytes] | None:
        """(ts, checksum, raw snapshot bytes) of the latest checkpoint, or None."""
        with self._ckpt_lock:
            row = self._ckpt.execute(
                "SELECT ts, checksum, snapshot FROM checkpoints WHERE master = ?", (master,)
            ).fetchone()
        return (float(row[0]), str(row[1]), bytes(row[2])) if row else None

    async def acheckpoint(self, master: str) -> tuple[float, str, bytes] | None:
        if self._ckpt is self._db:
            return self.checkpoint(master)
        return await asyncio.to_thread(self.checkpoint, master)

    def checkpoint_times(self) -> dict[str, float]:
        """{master: ts of its latest checkpoint} without reading the snapshots."""
        with self._ckpt_lock:
            rows = self._ckpt.execute("SELECT master, ts FROM checkpoints").fetchall()
        return {r[0]: float(r[1]) for r in rows}
