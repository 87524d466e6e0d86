"""Writes the state store could not take, kept in order in memory until it takes them.

Why: the store failing (disk full, read-only, I/O error, locked) must never stop a failover. A
refused write goes ahead in memory (``PendingView`` answers reads with it) and its statements
wait here; when SQLite works again they are replayed in order and in one transaction, so each is
applied exactly once. A statement that inserts a row carries the id the row was given in memory,
so the API and later entries can use that id before the row is on disk.

The queue is bounded: past ``limit`` entries the oldest droppable ones (audit) are dropped first
and counted in ``dropped``. Journal, failover, assignment and the other entries are never
dropped, so only they can make the queue outgrow its limit.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class Stmt:
    """One SQL statement and its parameters."""

    sql: str
    params: tuple[Any, ...] = ()


def insert(table: str, row: dict[str, Any], suffix: str = "") -> Stmt:
    """``INSERT INTO table`` of ``row``'s columns (an ``id`` key inserts that id)."""
    cols = ", ".join(row)
    marks = ", ".join("?" * len(row))
    return Stmt(f"INSERT INTO {table} ({cols}) VALUES ({marks}){suffix}", tuple(row.values()))


def is_store_failure(exc: BaseException) -> bool:
    """Whether SQLite could not do the work (full, read-only, I/O error, locked, corrupt file),
    as opposed to a statement that is wrong: a bug, raised and never queued."""
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back what is left: SQLite may already have (SQLITE_FULL, SQLITE_IOERR)."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def execute(conn: sqlite3.Connection, stmts: Sequence[Stmt]) -> sqlite3.Cursor:
    """Run ``stmts`` atomically; the cursor of the last one."""
    if len(stmts) == 1:
        return conn.execute(stmts[0].sql, stmts[0].params)
    conn.execute("BEGIN IMMEDIATE")
    try:
        for s in stmts:
            cur = conn.execute(s.sql, s.params)
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    return cur


@dataclass(slots=True, eq=False)
class Pending:
    """One refused write: statements applied together, under ``op`` (the error counter's label).
    ``on_drop`` forgets the write's in-memory effect if the backlog drops it."""

    op: str
    stmts: tuple[Stmt, ...]
    droppable: bool = False
    on_drop: Callable[[], None] | None = None
    dropped: bool = False


class Backlog:
    """The refused writes, oldest first."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self.dropped = 0
        self._entries: deque[Pending] = deque()
        self._droppable: deque[Pending] = deque()
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def add(self, entry: Pending) -> Pending | None:
        """Queue ``entry``; returns the entry dropped to stay within the limit, if any."""
        self._entries.append(entry)
        self._live += 1
        if entry.droppable:
            self._droppable.append(entry)
        if self._live <= self.limit or not self._droppable:
            return None
        victim = self._droppable.popleft()
        victim.dropped = True
        self._live -= 1
        self.dropped += 1
        if victim.on_drop is not None:
            victim.on_drop()
        return victim

    def entries(self) -> list[Pending]:
        return [e for e in self._entries if not e.dropped]

    def discard(self, done: Sequence[Pending]) -> None:
        """Forget ``done`` (replayed, or refused by SQLite as wrong)."""
        gone = {id(e) for e in done}
        self._entries = deque(e for e in self._entries if id(e) not in gone and not e.dropped)
        self._droppable = deque(e for e in self._droppable if id(e) not in gone)
        self._live = len(self._entries)


def replay(conn: sqlite3.Connection, entries: Sequence[Pending],
           extra: Sequence[Stmt] = ()) -> list[tuple[Pending, sqlite3.Error]]:
    """Apply ``entries`` in order, then ``extra``, in one transaction. Returns the entries SQLite
    refused as wrong (each ran in its own savepoint, so it is skipped whole); a store failure is
    raised with nothing applied."""
    bad: list[tuple[Pending, sqlite3.Error]] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for entry in entries:
            conn.execute("SAVEPOINT entry")
            try:
                for s in entry.stmts:
                    conn.execute(s.sql, s.params)
            except sqlite3.Error as exc:
                if is_store_failure(exc):
                    raise
                conn.execute("ROLLBACK TO entry")
                bad.append((entry, exc))
            conn.execute("RELEASE entry")
        for s in extra:
            conn.execute(s.sql, s.params)
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    return bad
