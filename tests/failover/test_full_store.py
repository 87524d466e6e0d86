"""The failover manager over a state file on a real full filesystem: moves, operator actions
and their bookkeeping go ahead in memory, and land in the file once space returns."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.failover.test_manager import Lab
from tests.store.disk import Tmpfs, fill, tmpfs_under


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    with tmpfs_under(tmp_path) as mounts:
        yield mounts


async def test_a_failover_and_operator_actions_go_ahead_while_the_store_is_full(tmpfs: Tmpfs):
    disk = tmpfs.mount(size="2m")
    async with Lab(disk) as lab:
        await lab.mgr.checkpoint_round()  # the state the failover moves
        filler = fill(disk)
        await lab.kill("a")
        await lab.mgr.on_transition(lab.fail("a"))
        store = lab.store
        assert store.failing == "database or disk is full"
        [rec] = store.list_failovers()  # from memory, with the id the journal used
        assert (rec["result"], rec["backup"]) == ("success", "c")
        assert lab.role("c") == "active" and lab.duties.assigned_away("a") == "c"
        assert lab.sims["c"].active and lab.mgr.stats.results[("a", "success", "checkpoint")] == 1
        assert lab.mgr._cooldown_left("a") is not None
        lab.mgr.pause()
        await lab.mgr.set_maintenance("b", True, drain=False)
        assert store.paused() and "b" in store.maintenance()
        assert store.errors["journal"] > 0 and store.errors["assignment"] == 1

        os.remove(filler)
        assert store.retry() and store.failing is None and store.waiting == 0
        steps = [e["step"] for e in store.journal_entries(rec["id"])]
        assert steps[0] == "plan" and steps[-1] == "finish" and "activate" in steps
        restarted = lab.new_manager()  # what a restart reads back from the file
        assert await restarted.recover_journal() == []
        assert lab.duties.assigned_away("a") == "c" and restarted.paused
        assert "b" in store.maintenance()
