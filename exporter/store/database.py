"""The state file: its connections and schema, and what keeps writes going while it fails.

A failing file never stops a failover. When SQLite refuses a write (disk full, read-only, I/O
error, locked), the write goes ahead in memory: its statements wait in a ``Backlog``, its effect
is laid over reads by a ``PendingView`` (a row inserted meanwhile gets its id in memory, past
every id given out, and is written with that id), and they are replayed in order, once, in one
transaction, when the file works again: retried every ``RETRY_EVERY`` seconds and on new writes.
``errors`` counts failures by operation and ``failing`` says why until a replay succeeds. What
waits is lost if the process dies first; while the file works, every write is committed when
its call returns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from exporter.store.backlog import (
    LIMIT,
    Backlog,
    Pending,
    Stmt,
    execute,
    insert,
    is_store_failure,
    replay,
)
from exporter.store.health import StoreHealth
from exporter.store.pending import PAGED, PendingCheckpoints, PendingView
from exporter.store.schema import COLUMNS, MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger(__name__)

RETRY_EVERY = 2.0  # seconds between replays while writes wait
WRITE_RETRY_GAP = 0.5  # a new write retries the replay at most this often
BUSY_MS = 10_000
RETRY_BUSY_MS = 100  # a locked file must not stall the event loop on every retry
DEFAULTS: dict[str, Any] = {"steps": "[]", "candidates": "[]", "detail": "{}", "reason": "",
                            "kind": "failover", "attempts": 0, "last_error": ""}
UPSERT_CHECKPOINT = (
    "INSERT INTO checkpoints (master, ts, checksum, size, snapshot) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT(master) DO UPDATE SET ts = excluded.ts, checksum = excluded.checksum,"
    " size = excluded.size, snapshot = excluded.snapshot")


class StoreError(Exception):
    """The state file cannot be used (newer schema, corrupt, unwritable), or a read of it
    failed."""


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_MS / 1000, isolation_level=None,
                           check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={BUSY_MS}")
    return conn


def _why_unusable(path: Path, exc: BaseException) -> str:
    """A reason an operator can act on, for a state path SQLite cannot open or write."""
    if path.is_dir():
        return "is a directory"
    try:
        fs = os.statvfs(path.parent)
    except OSError as err:
        return err.strerror or str(err)
    if fs.f_flag & os.ST_RDONLY:
        return "read-only file system"
    if fs.f_bavail == 0:
        return f"no space left on device ({exc})"
    if not os.access(path.parent, os.W_OK):
        return f"directory {path.parent} is not writable"
    if path.exists() and not os.access(path, os.W_OK):
        return "file is not writable"
    return str(exc)


def _make_parent(path: Path) -> None:
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise StoreError(f"{path}: {parent} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{path}: cannot create {parent}: {exc.strerror or exc}") from None


def _code(exc: sqlite3.Error) -> int:
    """SQLite's primary result code of ``exc`` (0 when unknown)."""
    return int(getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def _full(exc: sqlite3.Error) -> bool:
    return _code(exc) == sqlite3.SQLITE_FULL


def _busy(exc: sqlite3.Error) -> bool:
    return _code(exc) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class Database:
    """The state file's connections, and what keeps writes going while it fails.

    The main connection is shared by the event loop (sync calls, each a few hundred µs) and is
    guarded by a lock so that the worker-thread checkpoint writer can never interleave with it.
    A write goes through ``_direct`` (now, or None when it must wait) and, when it must wait,
    ``_defer`` (the backlog) plus its effect in ``_view``.
    """

    def __init__(self, path: str | Path, backlog_limit: int = LIMIT) -> None:
        self.path = str(path)
        self.health = StoreHealth(self.path)
        self._lock = threading.RLock()
        self._backlog = Backlog(backlog_limit)
        self._view = PendingView()
        self._ckpts = PendingCheckpoints()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._last_retry = float("-inf")
        self._closed = False
        memory = self.path == ":memory:"
        if not memory:
            _make_parent(Path(self.path))
        try:
            self._db = _connect(self.path, "FULL")
            self._migrate()
            # checkpoints: own connection so a big write in a thread never holds self._lock
            self._ckpt = self._db if memory else _connect(self.path, "NORMAL")
            self._ckpt_lock = self._lock if self._ckpt is self._db else threading.Lock()
            self._ids: dict[str, int] = {
                r[0]: int(r[1]) for r in self._db.execute("SELECT * FROM sqlite_sequence")}
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {_why_unusable(Path(self.path), exc)}") from exc
        try:
            self._probe()
        except sqlite3.Error as exc:
            if not _full(exc):
                self.close()
                raise StoreError(f"{self.path}: {_why_unusable(Path(self.path), exc)}") from exc
            self.health.failed("open", exc)  # full: run on, keeping writes in memory

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

    def _probe(self) -> None:
        """A write that changes nothing: whether the file takes writes."""
        with self._lock:
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        """Write what waits in memory if the file works now (else it is lost, and logged)."""
        if self._closed:
            return
        if self._timer is not None:
            self._timer.cancel()
        if self.waiting and not self.retry():
            log.error("state store %s closed with %d writes not written (%s)", self.path,
                      self.waiting, self.failing, extra={"event": "store_lost",
                                                         "waiting": self.waiting})
        self._closed = True
        with self._lock, self._ckpt_lock:  # waits for a checkpoint write in a worker thread
            if self._ckpt is not self._db:
                self._ckpt.close()
            self._db.close()

    # --- health -----------------------------------------------------------------------------
    @property
    def errors(self) -> Mapping[str, int]:
        """Failed writes and reads by operation: journal, failover, assignment, audit, cleanup,
        maintenance, flag, checkpoint, read, replay (a retry that failed again), open."""
        return self.health.errors

    @property
    def failing(self) -> str | None:
        """Why the store fails, until a replay succeeds; None while it works."""
        return self.health.failing

    @property
    def waiting(self) -> int:
        """Writes kept in memory until the file takes them."""
        return len(self._backlog) + len(self._ckpts)

    def retry(self) -> bool:
        """Write what waits, in order, in one transaction; True when nothing waits any more and
        the file takes writes."""
        self._last_retry = time.monotonic()
        entries, ckpts = self._backlog.entries(), self._ckpts.items()
        extra = [Stmt(UPSERT_CHECKPOINT, (m, c[0], c[1], len(c[2]), sqlite3.Binary(c[2])))
                 for m, c in ckpts.items()]
        bad: list[tuple[Pending, sqlite3.Error]] = []
        try:
            with self._lock:
                self._db.execute(f"PRAGMA busy_timeout={RETRY_BUSY_MS}")
                try:
                    if entries or extra:
                        bad = replay(self._db, entries, extra)
                    else:
                        self._probe()
                finally:
                    self._db.execute(f"PRAGMA busy_timeout={BUSY_MS}")
        except sqlite3.Error as exc:
            if not is_store_failure(exc):
                raise
            if _busy(exc) and self.health.failing is not None:
                self.health.count("replay")  # a checkpoint write in the way: not a new reason
            else:
                self.health.failed("replay", exc)
            self.health.still_failing(self.waiting)
            return False
        for entry, err in bad:
            self.health.count(entry.op)
            log.error("state store: a waiting %s write was refused as invalid and dropped: %s",
                      entry.op, err, extra={"event": "store_invalid_write", "op": entry.op})
        self._backlog.discard(entries)
        self._view.clear()
        self._ckpts.written(ckpts)
        self.health.recovered(len(entries) + len(ckpts))
        return True

    def _arm_timer(self) -> None:
        """Retry every RETRY_EVERY seconds on the running loop (none: on the next write)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._closed or (self._timer is not None and self._timer_loop is loop
                            and not self._timer.cancelled()):
            return
        self._timer, self._timer_loop = loop.call_later(RETRY_EVERY, self._on_timer), loop

    def _on_timer(self) -> None:
        self._timer = None
        if (self.waiting or self.failing) and not self.retry():
            self._arm_timer()

    def _failed(self, op: str, exc: sqlite3.Error) -> None:
        if not is_store_failure(exc):
            raise exc
        self.health.failed(op, exc)
        self._arm_timer()

    # --- writing and reading ------------------------------------------------------------------
    def _direct(self, op: str, *stmts: Stmt) -> sqlite3.Cursor | None:
        """Run ``stmts`` now (atomically); None when they must wait: SQLite refused them, or
        earlier writes still wait (order is kept)."""
        if len(self._backlog) and (time.monotonic() - self._last_retry < WRITE_RETRY_GAP
                                   or not self.retry()):
            self.health.count(op)
            return None
        try:
            with self._lock:
                cur = execute(self._db, stmts)
        except sqlite3.Error as exc:
            self._failed(op, exc)
            return None
        if (self.health.failing is not None
                and time.monotonic() - self._last_retry >= WRITE_RETRY_GAP):
            self.retry()
        return cur

    def _defer(self, op: str, stmts: Sequence[Stmt], droppable: bool = False,
               on_drop: Callable[[], None] | None = None) -> None:
        if self._backlog.add(Pending(op, tuple(stmts), droppable, on_drop)) is not None:
            self.health.dropped(self._backlog.dropped, self._backlog.limit)
        self._arm_timer()

    def _insert(self, op: str, table: str, row: dict[str, Any], suffix: str = "",
                droppable: bool = False) -> int:
        """Insert ``row``; its id (given in memory if the row has to wait)."""
        cur = self._direct(op, insert(table, row, suffix))
        if cur is not None:
            rid = int(cur.lastrowid or 0)
            self._ids[table] = max(self._ids.get(table, 0), rid)
            return rid
        full = {"id": self._next_id(table), **row}
        on_drop = partial(self._view.forget, table, full["id"]) if droppable else None
        self._defer(op, [insert(table, full, suffix)], droppable, on_drop)
        if table == "journal":
            self._view.add_journal(self._as_row(table, full))
        elif table in PAGED:
            self._view.insert(table, self._as_row(table, full))
        return int(full["id"])

    def _next_id(self, table: str) -> int:
        """The id of a row inserted while the store fails: past every id the file or this
        process has given out (AUTOINCREMENT never reuses one); written as is on replay."""
        rows = self._read_or([], "SELECT seq FROM sqlite_sequence WHERE name = ?", (table,))
        seq = max(self._ids.get(table, 0), int(rows[0][0]) if rows else 0)
        self._ids[table] = seq + 1
        return seq + 1

    @staticmethod
    def _as_row(table: str, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` with every column of ``table``, in order, as SQLite would return it."""
        return {c: row.get(c, DEFAULTS.get(c)) for c in COLUMNS[table]}

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Rows; a read SQLite cannot do is counted (``read``) and raised as StoreError."""
        try:
            with self._lock:
                return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            self._failed("read", exc)
            raise StoreError(f"{self.path}: {exc}") from exc

    def _read_or(self, default: list[sqlite3.Row], sql: str,
                 params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """``_read``, or ``default`` when the file cannot be read (the failover path goes on
        with what memory holds)."""
        try:
            return self._read(sql, params)
        except StoreError:
            return default

