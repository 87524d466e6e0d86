"""A state file on a real full filesystem: writes wait in memory with usable ids, reads see
them, the replay writes them once and in order when space returns; errors and reason follow."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.store import database
from exporter.store.backlog import Backlog, Pending, Stmt
from exporter.store.sqlite import Store, StoreError
from tests.store.disk import Tmpfs, fill, tmpfs_under

FULL = "database or disk is full"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    with tmpfs_under(tmp_path) as mounts:
        yield mounts


@pytest.fixture
def disk(tmpfs: Tmpfs) -> Path:
    return tmpfs.mount(size="1m")


def on_disk(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """What the file itself holds, through a connection of its own."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def test_a_move_on_a_full_disk_waits_in_memory_and_is_replayed_once_in_order(disk: Path):
    path = disk / "state.db"
    s = Store(path)
    first = s.begin_failover("m0", "auto", "before", started=1.0)
    s.audit("t", "before")
    filler = fill(disk)

    fid = s.begin_failover("a", "auto", "health: timeout", started=10.0)
    assert fid == first + 1  # an id the API and the journal can use now
    assert s.failing == FULL and s.errors["failover"] == 1
    s.journal(fid, "plan", "begin", detail={"duties": ["a"]})
    s.journal(fid, "import", "begin", backup="c", detail={"checksum": "x"})
    s.move_duties(["a"], "c", since=11.0, failover_id=fid)
    s.add_cleanup("a", "fence", None, fid, "connection refused")
    s.add_cleanup("a", "fence", None, fid, "timeout")  # same key: one queued call
    s.finish_failover(fid, "success", "c", finished=12.0, duration=2.0,
                      steps=[{"step": "import"}], candidates=[{"name": "c"}])
    s.audit("exporter", "failover", "a", {"failover_id": fid})
    s.set_maintenance("b", True, since=13.0)
    s.set_paused(True)

    # reads see the move as if it were written
    row = s.get_failover(fid)
    assert row is not None and (row["result"], row["backup"], row["steps"]) == (
        "success", "c", [{"step": "import"}])
    assert [r["id"] for r in s.list_failovers()] == [fid, first]
    assert [r["id"] for r in s.list_failovers(limit=1, offset=1, brief=True)] == [first]
    assert "steps" not in s.list_failovers(brief=True)[0]
    assert s.count_failovers() == 2 and s.count_failovers("a") == 1
    assert [a["action"] for a in s.list_audit()] == ["failover", "before"]
    assert [(e["step"], e["status"]) for e in s.journal_entries(fid)] == [
        ("plan", "begin"), ("import", "begin"), ("finish", "success")]
    assert s.assignments() == {"a": {"backup": "c", "since": 11.0, "failover_id": fid}}
    [queued] = s.cleanups()
    assert (queued["master"], queued["action"], queued["last_error"]) == ("a", "fence", "timeout")
    assert s.maintenance() == {"b": 13.0} and s.paused()
    assert s.waiting == 10
    assert on_disk(path, "SELECT id FROM failovers") == [(first,)]

    retries = s.errors.get("replay", 0)
    assert not s.retry()  # still full: nothing written, nothing lost
    assert s.waiting == 10 and s.errors["replay"] == retries + 1
    os.remove(filler)
    assert s.retry()
    assert s.failing is None and s.waiting == 0
    assert s.retry()  # once: a second replay writes nothing more
    assert on_disk(path, "SELECT id, result, backup FROM failovers ORDER BY id") == [
        (first, "in_progress", None), (fid, "success", "c")]
    assert on_disk(path, "SELECT step FROM journal WHERE failover_id = ? ORDER BY id",
                   (fid,)) == [("plan",), ("import",), ("finish",)]
    assert on_disk(path, "SELECT master, action, last_error FROM cleanup") == [
        ("a", "fence", "timeout")]
    s.close()

    again = Store(path)
    assert again.assignments() == {"a": {"backup": "c", "since": 11.0, "failover_id": fid}}
    assert again.maintenance() == {"b": 13.0} and again.paused()
    assert [a["action"] for a in again.list_audit()] == ["failover", "before"]
    assert again.begin_failover("b", "auto", "after", started=20.0) == fid + 1
    again.close()


def test_a_queued_undo_call_done_while_full_is_gone_after_the_replay(disk: Path):
    s = Store(disk / "state.db")
    s.add_cleanup("a", "fence", None, 1, "down")
    [on_file] = s.cleanups()
    filler = fill(disk)
    s.cleanup_done(on_file["id"])
    s.add_cleanup("b", "release", "a", 2, "down")
    [waiting] = s.cleanups()
    assert waiting["master"] == "b" and waiting["id"] > on_file["id"]
    s.cleanup_done(waiting["id"])
    assert s.cleanups() == []
    os.remove(filler)
    assert s.retry() and s.cleanups() == []
    s.close()


def test_errors_count_every_refused_write_and_the_reason_is_logged_once(disk: Path, caplog):
    s = Store(disk / "state.db")
    fid = s.begin_failover("a", "auto", "x", started=1.0)
    filler = fill(disk)
    caplog.set_level(logging.INFO, logger="exporter.store")
    for i in range(20):
        s.journal(fid, f"step{i}", "begin")
        s.audit("t", f"a{i}")
    assert s.errors["journal"] == 20 and s.errors["audit"] == 20
    failing = [r for r in caplog.records if getattr(r, "event", None) == "store_failing"]
    assert len(failing) == 1 and FULL in failing[0].getMessage()
    os.remove(filler)
    assert s.retry() and s.failing is None
    assert len([r for r in caplog.records
                if getattr(r, "event", None) == "store_recovered"]) == 1
    assert not [r for r in caplog.records if r.exc_info]
    s.close()


def test_the_backlog_drops_the_oldest_audit_entries_first_and_never_the_journal(disk: Path):
    s = Store(disk / "state.db", backlog_limit=5)
    filler = fill(disk)
    fid = s.begin_failover("a", "auto", "x", started=1.0)
    ids = [s.audit("t", f"a{i}") for i in range(4)]
    for step in ("plan", "fence", "import"):
        s.journal(fid, step, "begin")
    assert s.waiting == 5  # 1 failover + 1 audit + 3 journal: a0..a2 dropped
    assert [a["id"] for a in s.list_audit()] == [ids[3]]
    for step in ("activate", "routing"):
        s.journal(fid, step, "begin")
    assert s.waiting == 6  # over the limit: journal entries are never dropped
    assert s.list_audit() == []
    os.remove(filler)
    assert s.retry()
    assert [e["step"] for e in s.journal_entries(fid)] == [
        "plan", "fence", "import", "activate", "routing"]
    assert s.count_audit() == 0
    s.close()


def test_backlog_bound_without_a_disk():
    b = Backlog(limit=2)
    keep = Pending("journal", (Stmt("SELECT 1"),))
    forgotten: list[str] = []
    audits = [Pending("audit", (Stmt("SELECT 2"),), droppable=True,
                      on_drop=lambda n=n: forgotten.append(n)) for n in ("x", "y")]
    assert b.add(audits[0]) is None and b.add(keep) is None
    assert b.add(audits[1]) is audits[0] and forgotten == ["x"]
    assert b.entries() == [keep, audits[1]] and b.dropped == 1 and len(b) == 2


def test_checkpoints_refused_while_full_are_kept_and_written_later(disk: Path):
    s = Store(disk / "state.db")
    s.save_checkpoint("a", 1.0, "old", b"{}")
    filler = fill(disk)
    s.save_checkpoint("a", 2.0, "new", b'{"x": 1}')
    assert s.errors["checkpoint"] == 1 and s.failing == FULL
    assert s.checkpoint("a") == (2.0, "new", b'{"x": 1}')  # the newest, from memory
    assert s.checkpoint_times() == {"a": 2.0}
    os.remove(filler)
    assert s.retry() and s.failing is None
    assert on_disk(disk / "state.db", "SELECT ts, checksum FROM checkpoints") == [(2.0, "new")]
    s.close()


def test_the_fencing_epoch_still_grows_while_full(disk: Path):
    path = disk / "state.db"
    s = Store(path)
    assert s.next_epoch() == 1
    filler = fill(disk)
    assert s.next_epoch() == 2 and s.epoch() == 2
    os.remove(filler)
    assert s.retry()
    s.close()
    assert Store(path).next_epoch() == 3


def test_a_restart_on_a_full_disk_runs_with_the_store_failing(disk: Path):
    """The files a killed exporter leaves (-wal, -shm) let SQLite open the file: the new
    process runs, keeping its writes in memory."""
    path = disk / "state.db"
    killed = Store(path)  # never closed, as after a SIGKILL
    filler = fill(disk)
    s = Store(path)
    assert s.failing == FULL and s.errors["open"] == 1
    fid = s.begin_failover("a", "auto", "x", started=1.0)
    os.remove(filler)
    assert s.retry()
    assert on_disk(path, "SELECT id FROM failovers") == [(fid,)]
    s.close()
    killed.close()


def test_a_full_disk_that_cannot_even_open_the_file_is_refused(disk: Path):
    path = disk / "state.db"
    Store(path).close()
    fill(disk)
    with pytest.raises(StoreError, match="no space left on device"):
        Store(path)


async def test_the_replay_is_retried_on_a_timer(disk: Path, monkeypatch):
    monkeypatch.setattr(database, "RETRY_EVERY", 0.05)
    s = Store(disk / "state.db")
    filler = fill(disk)
    fid = s.begin_failover("a", "auto", "x", started=1.0)
    assert s.failing == FULL
    await asyncio.sleep(0.2)
    assert s.failing == FULL and s.errors["replay"] >= 2  # retried, still full
    os.remove(filler)
    for _ in range(100):
        if s.failing is None:
            break
        await asyncio.sleep(0.02)
    assert s.failing is None and s.waiting == 0
    assert on_disk(disk / "state.db", "SELECT id FROM failovers") == [(fid,)]
    s.close()


def test_a_locked_file_keeps_writes_in_memory_until_the_lock_is_gone(tmp_path: Path,
                                                                      monkeypatch):
    monkeypatch.setattr(database, "BUSY_MS", 100)
    path = tmp_path / "state.db"
    s = Store(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    fid = s.begin_failover("a", "auto", "x", started=1.0)
    s.move_duties(["a"], "c", since=2.0, failover_id=fid)
    assert s.failing == "database is locked" and s.assignments()["a"]["backup"] == "c"
    assert not s.retry()
    other.execute("ROLLBACK")
    other.close()
    assert s.retry() and s.failing is None
    assert on_disk(path, "SELECT master, backup, failover_id FROM assignments") == [
        ("a", "c", fid)]
    s.close()


def test_close_writes_what_waits_when_it_can(disk: Path):
    path = disk / "state.db"
    s = Store(path)
    filler = fill(disk)
    s.audit("t", "late")
    os.remove(filler)
    s.close()
    assert on_disk(path, "SELECT action FROM audit") == [("late",)]


@pytest.mark.parametrize("case, reason", [
    ("read-only", "read-only file system"),
    ("read-only-subdir", "Read-only file system"),
    ("parent-is-a-file", "is not a directory"),
    ("a-directory", "is a directory"),
])
def test_an_unwritable_path_is_refused_with_a_reason(tmpfs: Tmpfs, tmp_path: Path, case: str,
                                                     reason: str):
    if case.startswith("read-only"):
        root = tmpfs.mount("ro", size="1m", readonly=True)
        path = root / "state.db" if case == "read-only" else root / "sub" / "state.db"
    elif case == "parent-is-a-file":
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "state.db"
    else:
        path = tmp_path / "dir"
        path.mkdir()
    with pytest.raises(StoreError) as refused:
        Store(path)
    assert str(refused.value).startswith(f"{path}: ") and reason in str(refused.value)
    assert "\n" not in str(refused.value)
