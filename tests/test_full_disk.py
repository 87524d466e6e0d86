"""The state file on a full or unwritable filesystem, with real processes: a killed master is
still failed over within the usual bound while the disk is full, /readyz says why, and the
record is written with its journal once space returns; ``ha-exporter run`` refuses an
unwritable state path at start with one line and exit code 2."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.processes import StartStack, exporter_cli
from tests.store.disk import Tmpfs, fill, tmpfs_under
from tests.support import (
    TOKEN,
    TOKEN_ENV,
    closed_port,
    get_json,
    master_entry,
    metric_value,
    wait_for,
    write_config,
)

INTERVAL, TIMEOUT, THRESHOLD = 0.5, 0.3, 3  # tests.support.FAST_PROBE
BOUND = THRESHOLD * INTERVAL + TIMEOUT + INTERVAL  # as in tests/web/test_failover.py
SPECS = [
    ("master-a", "uae", "active", 1),
    ("master-b", "usa", "active", 2),
    ("master-c", "uae", "standby", 3),
    ("master-d", "usa", "standby", 4),
]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    with tmpfs_under(tmp_path) as mounts:
        yield mounts


def on_disk(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """What the state file itself holds (a read-only connection of the test's own)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def readyz(http: aiohttp.ClientSession, base: str) -> tuple[int, Any]:
    async with http.get(f"{base}/readyz") as r:
        return r.status, await r.json()


async def test_a_full_disk_does_not_stop_a_failover(tmpfs: Tmpfs, stack: StartStack,
                                                    http: aiohttp.ClientSession):
    disk = tmpfs.mount("disk", size="2m")
    state = disk / "state.db"
    fleet = await stack(
        SPECS, drain={name: 0.0 for name, *_ in SPECS}, state_path=str(state),
        failover={"enabled": True, "cooldown": "30s", "checkpoint_interval": "300ms"},
    )
    await fleet.ready(http)
    base, urls, exporter = fleet.base, fleet.urls, fleet.exporter
    assert exporter is not None
    checkpoint_age = 'ha_master_checkpoint_age_seconds{master="master-a"}'
    await wait_for(lambda: metric_value(http, base, checkpoint_age), 10, "a checkpoint of a")

    filler = fill(disk)
    fleet.masters["master-a"].kill(signal.SIGKILL)
    killed = time.monotonic()

    async def c_took_over() -> bool:
        h = await get_json(http, f"{urls['master-c']}/health")
        return bool(h["active"]) and "master-a" in h["duties"]

    await wait_for(c_took_over, BOUND + 10, "master-c to take over master-a", poll=0.02)
    took = time.monotonic() - killed
    print(f"disk full: kill to activation {took:.2f}s (detection bound {BOUND:.2f}s)")
    assert took <= BOUND + 0.5, f"kill to activation {took:.2f}s, bound {BOUND:.2f}s + 0.5s"
    assert (await get_json(http, f"{urls['master-d']}/health"))["active"] is False

    status, body = await readyz(http, base)
    assert (status, body) == (503, {"status": "not ready",
                                    "reason": "state store failing: database or disk is full"})
    record = (await get_json(http, f"{base}/api/v1/failovers"))["items"][0]
    assert (record["master"], record["backup"], record["result"]) == (
        "master-a", "master-c", "success")
    fid = record["id"]  # served from memory: the file does not hold it yet
    assert on_disk(state, "SELECT id FROM failovers WHERE id = ?", (fid,)) == []
    assert "Traceback" not in exporter.output()

    os.remove(filler)
    freed = time.monotonic()

    async def written() -> bool:
        return (await readyz(http, base))[0] == 200 and bool(
            on_disk(state, "SELECT id FROM failovers WHERE id = ?", (fid,)))

    await wait_for(written, 10, "the failover written and /readyz 200", poll=0.02)
    print(f"space freed to record written: {time.monotonic() - freed:.2f}s")
    assert on_disk(state, "SELECT result, backup FROM failovers WHERE id = ?", (fid,)) == [
        ("success", "master-c")]
    journal = [step for (step,) in on_disk(
        state, "SELECT step FROM journal WHERE failover_id = ? ORDER BY id", (fid,))]
    assert journal[0] == "plan" and journal[-1] == "finish"
    assert journal.index("import") < journal.index("activate") < journal.index("routing")
    assert on_disk(state, "SELECT backup FROM assignments WHERE master = 'master-a'") == [
        ("master-c",)]
    history = await get_json(http, f"{base}/api/v1/failovers")
    assert [r["id"] for r in history["items"]].count(fid) == 1
    full = await get_json(http, f"{base}/api/v1/failovers/{fid}")
    steps = [s["step"] for s in full["steps"]]
    assert steps.index("import") < steps.index("verify") < steps.index("activate")
    assert "Traceback" not in exporter.output()


@pytest.mark.parametrize("case, reason", [
    ("read-only", "read-only file system"),
    ("parent-is-a-file", "is not a directory"),
    ("a-directory", "is a directory"),
])
def test_run_refuses_an_unwritable_state_path_with_one_line(tmpfs: Tmpfs, tmp_path: Path,
                                                            case: str, reason: str):
    if case == "read-only":
        path = tmpfs.mount("ro", size="1m", readonly=True) / "state.db"
    elif case == "parent-is-a-file":
        (tmp_path / "file").write_text("not a directory")
        path = tmp_path / "file" / "state.db"
    else:
        path = tmp_path / "state-dir"
        path.mkdir()
    config = write_config(tmp_path, [master_entry("master-a", f"http://127.0.0.1:{closed_port()}")],
                          state_path=str(path))
    proc = subprocess.run(exporter_cli("run", "--config", str(config)), capture_output=True,
                          text=True, timeout=60, env={**os.environ, TOKEN_ENV: TOKEN})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0] and reason in lines[0], lines[0]
