"""What the state store holds in memory while it fails: the effect of every write waiting in the
backlog, laid over what the file says, so that reads see the facts the failover path has moved
on to (a record by the id it was given, queued undo calls, flags).

Rows of the paged tables (failovers, audit) are kept whole when they were inserted while the
store failed (``new``), else as a patch of columns over the row in the file. The other facts
keep their pending operations in order and apply them to what the file says at each read.
Everything is cleared at once when the backlog is replayed (the replay is one transaction).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

PAGED = ("failovers", "audit")
CHECKPOINT_BYTES = 64 * 1024 * 1024
Checkpoint = tuple[float, str, bytes]


class PendingView:
    """The in-memory effect of the backlog's writes (used on the event loop only)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[int, dict[str, Any]]] = {}
        self.new: dict[str, set[int]] = {}
        self.journal: dict[int, list[dict[str, Any]]] = {}
        self.moves: list[tuple[tuple[str, ...], str, float, int | None]] = []
        self.cleanups: dict[int, dict[str, Any]] = {}
        self.cleanups_done: set[int] = set()
        self.maintenance: list[tuple[str, float | None]] = []
        self.flags: dict[str, str] = {}
        self.clear()

    def clear(self) -> None:
        self.rows = {t: {} for t in PAGED}
        self.new = {t: set() for t in PAGED}
        self.journal = {}
        self.moves = []
        self.cleanups = {}
        self.cleanups_done = set()
        self.maintenance = []
        self.flags = {}

    # --- rows of the paged tables ------------------------------------------------------------
    def insert(self, table: str, row: dict[str, Any]) -> None:
        self.rows[table][row["id"]] = row
        self.new[table].add(row["id"])

    def update(self, table: str, rid: int, patch: dict[str, Any]) -> None:
        self.rows[table].setdefault(rid, {}).update(patch)

    def forget(self, table: str, rid: int) -> None:
        self.rows[table].pop(rid, None)
        self.new[table].discard(rid)

    def is_new(self, table: str, rid: int) -> bool:
        return rid in self.new[table]

    def touched(self, table: str, rid: int) -> bool:
        return rid in self.rows[table]

    def row(self, table: str, rid: int, disk: dict[str, Any] | None) -> dict[str, Any] | None:
        """The row as it will be once replayed (``disk``: the file's row)."""
        patch = self.rows[table].get(rid)
        if patch is None:
            return disk
        if rid in self.new[table]:
            return dict(patch)
        return {**disk, **patch} if disk is not None else None

    def matching(self, table: str, before: int | None, master: str | None) -> list[int]:
        """Ids of the new rows a page filter selects."""
        rows = self.rows[table]
        return [rid for rid in self.new[table] if (before is None or rid < before)
                and (master is None or rows[rid].get("master") == master)]

    def page(self, table: str, disk: Iterable[dict[str, Any]], before: int | None,
             master: str | None, limit: int, offset: int,
             columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """A page, newest first, of ``disk`` (the file's first ``offset + limit + new`` rows
        under the same filter) patched and merged with the new rows, each with ``columns``
        only (None: all)."""
        rows = self.rows[table]
        merged: dict[int, dict[str, Any]] = {}
        for r in disk:
            patch = rows.get(r["id"])
            merged[r["id"]] = {**r, **{k: v for k, v in patch.items() if k in r}} if patch else r
        for rid in self.matching(table, before, master):
            row = rows[rid]
            merged[rid] = {c: row[c] for c in columns} if columns else dict(row)
        ordered = sorted(merged.values(), key=lambda r: -int(r["id"]))
        return ordered[offset:offset + limit]

    # --- journal, assignments, cleanup, maintenance ----------------------------------------
    def add_journal(self, entry: dict[str, Any]) -> None:
        self.journal.setdefault(int(entry["failover_id"]), []).append(entry)

    def move(self, duties: Iterable[str], holder: str, since: float,
             failover_id: int | None) -> None:
        self.moves.append((tuple(duties), holder, since, failover_id))

    def assignments(self, disk: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        out = dict(disk)
        for duties, holder, since, fid in self.moves:
            for duty in duties:
                if duty == holder:
                    out.pop(duty, None)
                else:
                    out[duty] = {"backup": holder, "since": since, "failover_id": fid}
        return out

    def cleanup_rows(self, disk: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Queued undo calls by id: the file's, less those done since, plus those added."""
        out = {r["id"]: r for r in disk if r["id"] not in self.cleanups_done}
        out.update(self.cleanups)
        return [out[k] for k in sorted(out)]

    def add_cleanup(self, row: dict[str, Any]) -> None:
        self.cleanups_done.discard(row["id"])
        self.cleanups[row["id"]] = row

    def cleanup_done(self, cleanup_id: int) -> None:
        self.cleanups.pop(cleanup_id, None)
        self.cleanups_done.add(cleanup_id)

    def set_maintenance(self, master: str, since: float | None) -> None:
        self.maintenance.append((master, since))

    def maintenance_of(self, disk: dict[str, float]) -> dict[str, float]:
        out = dict(disk)
        for master, since in self.maintenance:
            if since is None:
                out.pop(master, None)
            else:
                out.setdefault(master, since)
        return out


class PendingCheckpoints:
    """The newest checkpoint of each master the store refused, until it is written; at most
    ``max_bytes`` of snapshots (a checkpoint past that is not kept: the next round pulls a new
    one). Thread-safe: checkpoints are written from a worker thread."""

    def __init__(self, max_bytes: int = CHECKPOINT_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: dict[str, Checkpoint] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, master: str, ckpt: Checkpoint) -> bool:
        with self._lock:
            self._items.pop(master, None)
            used = sum(len(c[2]) for c in self._items.values())
            if used + len(ckpt[2]) > self.max_bytes:
                return False
            self._items[master] = ckpt
            return True

    def get(self, master: str) -> Checkpoint | None:
        with self._lock:
            return self._items.get(master)

    def restamp(self, master: str, ts: float, checksum: str) -> bool:
        """Move the time of the kept checkpoint of ``master`` if it is the one ``checksum``
        names; False when none such is kept."""
        with self._lock:
            kept = self._items.get(master)
            if kept is None or kept[1] != checksum:
                return False
            self._items[master] = (ts, checksum, kept[2])
            return True

    def discard(self, master: str) -> None:
        """A newer checkpoint of ``master`` is in the file."""
        with self._lock:
            self._items.pop(master, None)

    def items(self) -> dict[str, Checkpoint]:
        with self._lock:
            return dict(self._items)

    def written(self, done: dict[str, Checkpoint]) -> None:
        """Forget ``done`` (replayed), unless a newer one arrived meanwhile."""
        with self._lock:
            for master, ckpt in done.items():
                if self._items.get(master) is ckpt:
                    del self._items[master]

    def times(self) -> dict[str, float]:
        with self._lock:
            return {m: c[0] for m, c in self._items.items()}
