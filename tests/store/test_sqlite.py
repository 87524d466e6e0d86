"""The SQLite store: migrations, durability of the journal, pagination, checkpoints."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from exporter.store.sqlite import OPEN_RESULT, SCHEMA_VERSION, Store, StoreError


def test_migrates_empty_file_and_reopen_is_idempotent(tmp_path):
    path = tmp_path / "sub" / "state.db"
    s = Store(path)
    assert s.schema_version == SCHEMA_VERSION
    s.audit("test", "hello", "m1", {"x": 1})
    s.close()
    s2 = Store(path)  # second open: no migration, data intact
    assert s2.schema_version == SCHEMA_VERSION
    assert [a["action"] for a in s2.list_audit()] == ["hello"]
    assert s2.list_audit()[0]["detail"] == {"x": 1}
    assert s2._read("PRAGMA journal_mode")[0][0] == "wal"
    s2.close()


def test_refuses_newer_schema(tmp_path):
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 5}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        Store(path)


def test_not_a_database(tmp_path):
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        Store(path)


def test_pagination_newest_first(tmp_path):
    s = Store(tmp_path / "s.db")
    ids = [s.record_failover(f"m{i % 3}", "dry_run", "auto", f"r{i}", started=1000.0 + i)
           for i in range(25)]
    page1 = s.list_failovers(limit=10)
    assert [r["id"] for r in page1] == ids[::-1][:10]
    page2 = s.list_failovers(limit=10, before=page1[-1]["id"])
    assert [r["id"] for r in page2] == ids[::-1][10:20]
    page3 = s.list_failovers(limit=10, before=page2[-1]["id"])
    assert [r["id"] for r in page3] == ids[::-1][20:]
    assert [r["id"] for r in s.list_failovers(limit=5, offset=5)] == ids[::-1][5:10]
    only_m1 = s.list_failovers(limit=100, master="m1")
    assert all(r["master"] == "m1" for r in only_m1) and len(only_m1) == s.count_failovers("m1")
    assert s.count_failovers() == 25
    brief = s.list_failovers(limit=1, brief=True)[0]
    assert brief["id"] == ids[-1] and "candidates" not in brief and "steps" not in brief
    for i in range(7):
        s.audit("api", f"a{i}", None)
    assert [a["action"] for a in s.list_audit(limit=3)] == ["a6", "a5", "a4"]
    assert [a["action"] for a in s.list_audit(limit=3, offset=3)] == ["a3", "a2", "a1"]
    assert s.count_audit() == 7


def test_failover_lifecycle_and_journal(tmp_path):
    s = Store(tmp_path / "s.db")
    fid = s.begin_failover("a", "auto", "failed", started=10.0)
    s.journal(fid, "select", "begin")
    s.journal(fid, "import", "begin", backup="c", detail={"checksum": "x"})
    assert [r["id"] for r in s.unfinished_failovers()] == [fid]
    assert s.get_failover(fid)["result"] == OPEN_RESULT
    s.finish_failover(fid, "success", "c", finished=11.0, duration=1.0,
                      steps=[{"step": "select"}], candidates=[{"name": "c"}])
    assert s.unfinished_failovers() == []
    row = s.get_failover(fid)
    assert row["result"] == "success" and row["steps"] == [{"step": "select"}]
    entries = s.journal_entries(fid)
    assert [(e["step"], e["status"]) for e in entries] == [
        ("select", "begin"), ("import", "begin"), ("finish", "success")]
    assert entries[1]["detail"] == {"checksum": "x"} and entries[1]["backup"] == "c"
    assert s.last_failover_times(["success"]) == {"a": 10.0}


def test_assignments_flags_maintenance(tmp_path):
    s = Store(tmp_path / "s.db")
    s.move_duties(["a", "b"], "c", since=5.0, failover_id=1)
    s.move_duties(["a"], "d", since=6.0, failover_id=2)
    assert s.assignments() == {"a": {"backup": "d", "since": 6.0, "failover_id": 2},
                               "b": {"backup": "c", "since": 5.0, "failover_id": 1}}
    s.move_duties(["a", "b"], "a", since=7.0)  # a's own duty back to a: no row; b goes to a
    assert s.assignments() == {"b": {"backup": "a", "since": 7.0, "failover_id": None}}
    assert not s.paused()
    s.set_paused(True)
    assert s.paused()
    s.set_maintenance("b", True, since=3.0)
    s.set_maintenance("b", True, since=4.0)  # idempotent, keeps the first since
    assert s.maintenance() == {"b": 3.0}
    s.set_maintenance("b", False)
    assert s.maintenance() == {}


async def test_checkpoint_roundtrip_big(tmp_path):
    s = Store(tmp_path / "s.db")
    blob = b'{"sessions": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    await s.asave_checkpoint("a", 100.0, "abc", blob)
    await s.asave_checkpoint("b", 101.0, "def", b"{}")
    ts, checksum, data = await s.acheckpoint("a")
    assert (ts, checksum, data) == (100.0, "abc", blob)
    assert s.checkpoint_times() == {"a": 100.0, "b": 101.0}
    await s.asave_checkpoint("a", 102.0, "ghi", b"{}")  # latest only
    assert s.checkpoint("a") == (102.0, "ghi", b"{}")
    assert s.checkpoint("zzz") is None


def test_journal_survives_sigkill(tmp_path):
    """A journal entry committed before SIGKILL is there after the restart."""
    path = tmp_path / "s.db"
    Store(path).close()
    code = textwrap.dedent(f"""
        import os, signal
        from exporter.store.sqlite import Store
        s = Store({str(path)!r})
        fid = s.begin_failover("a", "auto", "x", started=1.0)
        s.journal(fid, "import", "begin", backup="c")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], timeout=30, env=os.environ.copy())
    assert proc.returncode == -9
    s = Store(path)
    [open_row] = s.unfinished_failovers()
    assert [(e["step"], e["status"]) for e in s.journal_entries(open_row["id"])] == [
        ("import", "begin")]
