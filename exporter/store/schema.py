"""The state store's schema: a list of migrations applied in order (``PRAGMA user_version``
counts the ones applied), each in its own transaction, so opening an up-to-date file is a no-op
and a crash mid-migration leaves the previous version intact.
"""

from __future__ import annotations

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
#: Columns of the tables with ids, in table order: a row kept in memory while the store fails
#: has the same keys, in the same order, as the row SQLite returns after the replay.
COLUMNS: dict[str, tuple[str, ...]] = {
    "audit": ("id", "ts", "actor", "action", "master", "detail"),
    "failovers": ("id", "started", "finished", "master", "backup", "result", "trigger",
                  "reason", "duration", "steps", "candidates", "kind"),
    "journal": ("id", "failover_id", "step", "status", "backup", "ts", "detail"),
    "cleanup": ("id", "ts", "master", "action", "arg", "failover_id", "attempts", "last_error"),
}
