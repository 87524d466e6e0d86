"""Failover against real simulated masters on 127.0.0.1: in-process servers for most cases,
real ``ha-exporter master`` processes (SIGKILLed) for the end-to-end ones. Every assertion on
the outcome is made on the masters' own state (their HTTP answers or their objects), not only
on the exporter's records."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.config import Config, parse_config
from exporter.failover.duties import DutyTable
from exporter.failover.errors import Conflict, FailoverRejected, InvalidRequest, UnknownMaster
from exporter.failover.manager import FailoverManager
from exporter.failover.protocol import MasterCallError, parse_snapshot
from exporter.fleet import Fleet, State, Transition
from exporter.sim import SimulatedMaster, create_app, snapshot_checksum
from exporter.store.sqlite import Store
from tests.failover.driving import drive
from tests.processes import Proc, Processes
from tests.support import wait_for

# name, region, role, priority
FLEET = (("a", "uae", "active", 1), ("b", "usa", "active", 2),
         ("c", "uae", "standby", 3), ("d", "usa", "standby", 3))


def _ignore(_event: object) -> None:
    """Events nobody in this test listens to."""



def make_config(urls: dict[str, str], state_path: str, specs=FLEET, **failover: Any) -> Config:
    fo = {"cooldown": "60s", "step_timeout": "2s", "deadline": "10s", "checkpoint_interval": "1h"}
    fo.update(failover)
    extra = fo.pop("_top", {})
    return parse_config({
        "state_path": state_path,
        "masters": [{"name": n, "url": urls[n], "region": r, "role": role, "priority": p}
                    for n, r, role, p in specs],
        "failover": fo,
        **extra,
    })


class Lab:
    """Simulated masters served in-process, a store, a fleet and a FailoverManager."""

    def __init__(self, tmp_path: Path, specs=FLEET, **failover: Any) -> None:
        self.tmp_path = tmp_path
        self.specs = specs
        self.failover_cfg = failover
        self.sims: dict[str, SimulatedMaster] = {}
        self.runners: dict[str, web.AppRunner] = {}
        self.urls: dict[str, str] = {}
        self.calls: list[tuple[str, str, str]] = []  # (master, method, path) in arrival order
        self.routing: list[tuple[str, str | None]] = []

    async def __aenter__(self) -> Lab:
        for name, region, role, _ in self.specs:
            await self.start_master(name, region, role)
        self.session = aiohttp.ClientSession()
        self.store = Store(self.tmp_path / "state.db")
        self.config = make_config(self.urls, str(self.tmp_path / "state.db"), self.specs,
                                  **self.failover_cfg)
        self.fleet = Fleet(self.config.masters, self.config.probe, 5)
        self.mgr = self.new_manager()
        return self

    def new_manager(self) -> FailoverManager:
        """A manager as a restart makes it: duties and pause read back from the store."""
        self.duties = DutyTable(self.config.masters, self.store, _ignore)
        self.duties.restore()
        return FailoverManager(self.config, self.fleet, self.store, self.duties, self.session,
                               on_routing_change=lambda m, b: self.routing.append((m, b)))

    def role(self, name: str) -> str:
        return self.duties.role_of(name)

    async def start_master(self, name: str, region: str, role: str, port: int = 0) -> None:
        sim = SimulatedMaster(name, region, role)
        app = create_app(sim)

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.calls.append((name, request.method, request.path))
            return await handler(request)

        app.middlewares.insert(0, record)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        self.sims[name], self.runners[name] = sim, runner
        self.urls[name] = f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def kill(self, name: str) -> None:
        """The master's server goes away: connection refused from now on."""
        await self.runners.pop(name).cleanup()

    async def __aexit__(self, *exc: object) -> None:
        await self.mgr.shutdown(2.0)
        await self.session.close()
        for runner in self.runners.values():
            await runner.cleanup()
        self.store.close()

    def fail(self, name: str) -> Transition:
        """Failed probes until the master's health machine fails it; that transition."""
        t = drive(self.fleet.get(name), State.FAILED, "timeout: test")
        assert t is not None
        return t

    def heal(self, name: str) -> Transition:
        """Good probes until it serves again; the transition back to healthy."""
        t = drive(self.fleet.get(name), State.HEALTHY, "success")
        assert t is not None
        return t

    def degrade(self, *names: str) -> None:
        for name in names:
            drive(self.fleet.get(name), State.DEGRADED, "slow")

    async def chaos(self, name: str, mode: str, **extra: Any) -> None:
        async with self.session.post(f"{self.urls[name]}/chaos",
                                     json={"mode": mode, **extra}) as resp:
            assert resp.status == 200

    async def message(self, name: str, mid: str, chat: str) -> None:
        async with self.session.post(f"{self.urls[name]}/messages",
                                     json={"id": mid, "chat": chat, "text": "hi"}) as resp:
            assert resp.status in (200, 202)

    async def get(self, name: str, path: str) -> dict:
        async with self.session.get(f"{self.urls[name]}{path}") as resp:
            return await resp.json()

    def holders_of(self, duty: str) -> list[str]:
        """Masters that, by their own state, are active for ``duty``."""
        return sorted(n for n, s in self.sims.items()
                      if n in self.runners and s.active and duty in s.duties)


async def test_best_standby_takes_over_with_checkpointed_state(tmp_path):
    async with Lab(tmp_path) as lab:
        lab.sims["a"].drain_rate = 0  # keep the pending messages pending
        for i in range(3):
            await lab.message("a", f"m{i}", f"+97150000{i}")
        assert await lab.mgr.checkpoint_round() == {"a": True, "b": True}
        assert set(lab.mgr.checkpoint_ages()) == {"a", "b"}
        before = lab.sims["a"].snapshot()
        await lab.kill("a")
        record = await lab.mgr.failover("a", trigger="auto", reason="health: timeout")
        assert record["result"] == "success", record
        assert record["backup"] == "c"  # standby, same region as a, over d (usa)
        # on the backup's own state: the dead master's sessions and pending messages
        state = await lab.get("c", "/state")
        assert state["checksum"] == snapshot_checksum(state)
        imported = state["imported"]["a"]
        assert imported["sessions"] == before["sessions"]
        assert [m["id"] for m in imported["pending_messages"]] == ["m0", "m1", "m2"]
        assert imported["checksum"] == snapshot_checksum(imported)
        health = await lab.get("c", "/health")
        assert health["active"] is True
        assert lab.holders_of("a") == ["c"]
        # the exporter's view
        assert lab.role("a") == "standby" and lab.role("c") == "active"
        assert lab.routing == [("a", "c")]
        assert lab.store.assignments()["a"]["backup"] == "c"
        steps = [s["step"] for s in record["steps"]]
        assert steps == ["select", "fence", "fetch", "import", "verify", "activate", "routing"]
        fetch = record["steps"][2]["detail"]
        assert fetch["source"] == "checkpoint" and fetch["pending_messages"] == 3
        assert record["steps"][1]["status"] == "error"  # the dead master could not be fenced
        why = {c["name"]: c for c in record["candidates"]}
        assert why["c"]["outcome"] == "took over" and why["c"]["reason"] == "best candidate"
        assert "region usa" in why["d"]["reason"]
        assert "ranked after standby" in why["b"]["reason"]
        assert lab.mgr.stats.results == {("a", "success", "checkpoint"): 1}
        assert lab.mgr.stats.duration_count == 1
        # history and audit
        assert lab.store.list_failovers()[0]["id"] == record["id"]
        assert lab.store.list_audit(master="a")[0]["action"] == "failover"


async def test_live_state_is_fetched_and_failed_master_fenced(tmp_path):
    async with Lab(tmp_path) as lab:
        await lab.message("a", "live-1", "+971")
        rec = await lab.mgr.on_transition(lab.fail("a")) or lab.store.list_failovers()[0]
        assert rec["result"] == "success"
        fetch = next(s for s in rec["steps"] if s["step"] == "fetch")
        assert fetch["detail"]["source"] == "live"
        sim_a = lab.sims["a"]
        assert not sim_a.active and sim_a.duties == []  # fenced
        assert lab.holders_of("a") == ["c"]
        # fence happened before the state was read, and the backup was activated after import
        order = [(m, meth, p) for m, meth, p in lab.calls if p != "/chaos"]
        assert order.index(("a", "POST", "/deactivate")) < order.index(("a", "GET", "/state"))
        assert order.index(("c", "POST", "/state")) < order.index(("c", "POST", "/activate"))


async def test_backup_rejects_import_rolls_back_and_next_candidate(tmp_path):
    async with Lab(tmp_path) as lab:
        await lab.mgr.checkpoint_round()
        await lab.chaos("c", "error")
        await lab.kill("a")
        rec = await lab.mgr.failover("a", trigger="auto", reason="test")
        assert rec["result"] == "success" and rec["backup"] == "d"
        outcome = {c["name"]: c.get("outcome") for c in rec["candidates"]}
        assert outcome["c"].startswith("failed at import: HTTP 500")
        assert outcome["d"] == "took over"
        assert [s["step"] for s in rec["steps"]].count("rollback") == 1
        assert lab.mgr.stats.candidate_rollbacks == {"a": 1}
        assert lab.holders_of("a") == ["d"]
        # c could not be told to undo (it errors): queued, done once it answers again
        queued = {(q["master"], q["action"]) for q in lab.store.cleanups()}
        assert queued == {("c", "fence"), ("c", "drop_import"), ("a", "fence")}
        await lab.chaos("c", "ok")
        lab.sims["c"].active = True  # pretend the failed call half-landed
        await lab.mgr.reconcile()
        # a is still dead: its fence waits for its return
        assert [(q["master"], q["action"]) for q in lab.store.cleanups()] == [("a", "fence")]
        assert not lab.sims["c"].active and "a" not in lab.sims["c"].imported


async def test_every_candidate_fails_nothing_half_active(tmp_path):
    async with Lab(tmp_path) as lab:
        await lab.mgr.checkpoint_round()
        for name in ("b", "c", "d"):
            await lab.chaos(name, "error")
        await lab.chaos("a", "down")  # answers control calls, reports down
        rec = await lab.mgr.failover("a", trigger="auto", reason="test")
        assert rec["result"] == "failed", rec
        assert "every candidate failed (3 tried)" in rec["reason"]
        for name in ("b", "c", "d"):
            await lab.chaos(name, "ok")
        await lab.mgr.reconcile()  # queued undo calls land now
        # on the masters: nobody but a (un-fenced, status quo ante) holds a's duties
        assert lab.holders_of("a") == ["a"]
        for name in ("c", "d"):
            assert not lab.sims[name].active and lab.sims[name].imported == {}
        assert lab.sims["b"].duties == ["b"] and "a" not in lab.sims["b"].imported
        assert lab.role("a") == "active" and lab.role("c") == "standby"
        assert lab.store.assignments() == {}
        assert lab.mgr.stats.results == {("a", "failed", "checkpoint"): 1}
        assert lab.mgr.stats.candidate_rollbacks == {"a": 3}


async def test_no_eligible_candidate_explains_why(tmp_path):
    async with Lab(tmp_path) as lab:
        lab.degrade("b", "c", "d")
        rec = await lab.mgr.failover("a", trigger="auto", reason="test")
        assert rec["result"] == "failed"
        assert "no eligible backup (3x not healthy (degraded))" in rec["reason"]
        assert lab.sims["a"].active  # never touched: no candidate, so no fence
        assert ("a", "POST", "/deactivate") not in lab.calls


async def test_flapping_at_most_one_failover_per_cooldown(tmp_path):
    async with Lab(tmp_path, failback="auto") as lab:
        for _ in range(5):  # a fails and heals over and over
            await lab.mgr.on_transition(lab.fail("a"))
            await lab.mgr.on_transition(lab.heal("a"))
        # b too, but its failovers fail (no healthy candidate): cooldown must hold it
        lab.degrade("a", "c", "d")
        for _ in range(5):
            await lab.mgr.on_transition(lab.fail("b"))
            await lab.mgr.on_transition(lab.heal("b"))
        await lab.mgr.reconcile()
        rows = lab.store.list_failovers(limit=100)
        executed = [(r["master"], r["result"]) for r in rows
                    if r["result"] in ("success", "failed", "rolled_back")]
        assert sorted(executed) == [("a", "success"), ("b", "failed")]
        skipped = [r for r in rows if r["result"] == "skipped_cooldown"]
        assert len(skipped) == 4 and all(r["master"] == "b" for r in skipped)
        assert "inside per-master cooldown" in skipped[0]["reason"]
        # a's failback was deferred by the cooldown: a stays standby, c holds a's duty
        assert lab.holders_of("a") == ["c"]
        assert any(e["action"] == "failback_deferred" for e in lab.store.list_audit())
        assert lab.mgr.stats.results[("b", "skipped_cooldown", "none")] == 4


async def test_fleet_cooldown_and_failback_after_cooldown(tmp_path):
    async with Lab(tmp_path, fleet_cooldown="1h", cooldown="300ms", failback="auto") as lab:
        await lab.mgr.on_transition(lab.fail("a"))
        assert lab.store.list_failovers()[0]["result"] == "success"
        await lab.mgr.on_transition(lab.fail("b"))
        assert lab.store.list_failovers()[0]["result"] == "skipped_cooldown"
        assert "fleet-wide" in lab.store.list_failovers()[0]["reason"]
        assert lab.holders_of("b") == ["b"]  # not executed
        # a heals inside its cooldown: stays standby; once the cooldown is over the periodic
        # reconcile gives its duty back (the fleet-wide cooldown gates failovers only)
        await lab.mgr.on_transition(lab.heal("a"))
        assert lab.holders_of("a") == ["c"]
        await asyncio.sleep(0.35)
        lab.heal("b")
        await lab.mgr.reconcile()
        rec = lab.store.list_failovers()[0]
        assert rec["kind"] == "failback" and rec["result"] == "success", rec
        assert lab.holders_of("a") == ["a"]
        assert not lab.sims["c"].active and "a" not in lab.sims["c"].imported
        assert lab.role("a") == "active" and lab.role("c") == "standby"
        assert lab.store.assignments() == {}


async def test_dry_run_changes_nothing(tmp_path):
    async with Lab(tmp_path, dry_run=True) as lab:
        await lab.mgr.checkpoint_round()
        lab.calls.clear()
        before = {n: (s.active, list(s.duties), dict(s.imported)) for n, s in lab.sims.items()}
        await lab.mgr.on_transition(lab.fail("a"))
        [rec] = lab.store.list_failovers()
        assert rec["result"] == "dry_run" and rec["backup"] == "c"
        assert [s["step"] for s in rec["steps"]] == [
            "select", "fence", "fetch", "import", "verify", "activate", "routing"]
        assert all(s["status"] == "planned" for s in rec["steps"])
        assert rec["candidates"][0]["name"] == "c"
        assert lab.calls == []  # not a single call to any master
        assert {n: (s.active, list(s.duties), dict(s.imported))
                for n, s in lab.sims.items()} == before
        assert lab.role("a") == "active" and lab.store.assignments() == {}
        assert lab.mgr.stats.results == {("a", "dry_run", "none"): 1}


async def test_pause_and_disabled_stop_automatic_but_not_manual(tmp_path):
    async with Lab(tmp_path) as lab:
        lab.mgr.pause()
        assert lab.store.paused()
        await lab.mgr.on_transition(lab.fail("a"))
        assert lab.store.list_failovers() == []
        assert lab.store.list_audit()[0]["action"] == "failover_suppressed"
        assert lab.new_manager().paused  # persisted
        rec = await lab.mgr.switchover("b")  # manual still works (b serving: graceful)
        assert rec["result"] == "success" and rec["kind"] == "switchover"
        lab.mgr.resume()
        assert not lab.mgr.paused
    async with Lab(tmp_path / "2", enabled=False) as lab:
        await lab.mgr.on_transition(lab.fail("a"))
        assert lab.store.list_failovers() == []
        assert (await lab.mgr.failover("a"))["result"] == "success"


async def test_graceful_switchover_make_before_break(tmp_path):
    async with Lab(tmp_path) as lab:
        await lab.message("a", "s1", "+971")
        rec = await lab.mgr.switchover("a", "d")
        assert rec["result"] == "success" and rec["backup"] == "d"
        assert [s["step"] for s in rec["steps"]] == [
            "select", "fetch", "import", "verify", "activate", "routing", "release"]
        i_act = lab.calls.index(("d", "POST", "/activate"))
        i_off = lab.calls.index(("a", "POST", "/deactivate"))
        assert i_act < i_off  # the new master is active before the old one lets go
        assert lab.holders_of("a") == ["d"]
        assert not lab.sims["a"].active
        assert "a" in lab.sims["d"].imported
        # and back: reset gives a its duty back (manual failback)
        out = await lab.mgr.reset("a")
        assert out["failback"]["result"] == "success"
        assert lab.holders_of("a") == ["a"] and not lab.sims["d"].active


async def test_rejections(tmp_path):
    async with Lab(tmp_path) as lab:
        with pytest.raises(UnknownMaster):
            await lab.mgr.switchover("nope")
        with pytest.raises(Conflict) as e:
            await lab.mgr.switchover("c")
        assert "standby" in str(e.value)
        with pytest.raises(InvalidRequest):
            await lab.mgr.switchover("a", "a")
        lab.degrade("d")
        with pytest.raises(Conflict) as e:
            await lab.mgr.switchover("a", "d")
        assert "degraded" in str(e.value)
        with pytest.raises(Conflict):
            await lab.mgr.failback("a")
        # single flight: a second failover of the same master while one runs
        await lab.chaos("c", "slow", delay_seconds=0.5)
        first = asyncio.create_task(lab.mgr.failover("a"))
        await wait_for(lambda: "a" in lab.mgr.running(), 2, "failover running")
        with pytest.raises(Conflict):
            await lab.mgr.failover("a")
        assert await lab.mgr.auto_failover("a", "dup") is None
        assert (await first)["result"] == "success"
        assert lab.store.count_failovers() == 1


async def test_pre_hook_failure_aborts_and_post_hook_and_alertmanager(tmp_path):
    got: list[tuple[str, Any]] = []
    status = {"pre": 500}

    async def handler(request: web.Request) -> web.Response:
        got.append((request.path, await request.json()))
        code = status["pre"] if request.path == "/pre" else 200
        return web.json_response({}, status=code)

    app = web.Application()
    app.router.add_post("/{p:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    hooks = {"pre_hook": {"url": f"{base}/pre",
                          "body": '{"master": "{{ master }}", "backup": "{{ backup }}"}'},
             "post_hook": {"url": f"{base}/post"},
             "_top": {"alertmanager": {"url": base}}}
    try:
        async with Lab(tmp_path, **hooks) as lab:
            rec = await lab.mgr.failover("a", trigger="auto", reason="t")
            assert rec["result"] == "failed" and "aborted by pre-hook: pre hook" in rec["reason"]
            assert lab.sims["a"].active and lab.holders_of("a") == ["a"]  # nothing touched
            assert got[0] == ("/pre", {"master": "a", "backup": "c"})
            await wait_for(lambda: any(p == "/api/v2/alerts" for p, _ in got), 5, "alert")
            alert = next(b for p, b in got if p == "/api/v2/alerts")[0]
            assert alert["labels"]["alertname"] == "HAFailoverFailed"
            status["pre"] = 200
            got.clear()
            rec = await lab.mgr.failover("a", trigger="auto", reason="t")
            assert rec["result"] == "success"
            await wait_for(lambda: {p for p, _ in got} >= {"/pre", "/post", "/api/v2/alerts"},
                           5, "post hook and alert")
            post = next(b for p, b in got if p == "/post")
            assert post["master"] == "a" and post["backup"] == "c" and post["phase"] == "post"
            alert = next(b for p, b in got if p == "/api/v2/alerts")[0]
            assert alert["labels"] == {"alertname": "HAFailoverExecuted", "master": "a",
                                       "backup": "c", "result": "success",
                                       "severity": "info"}
    finally:
        await runner.cleanup()


async def test_deadline_and_shutdown_roll_back(tmp_path):
    async with Lab(tmp_path, deadline="600ms", step_timeout="5s") as lab:
        await lab.chaos("c", "hang")
        t0 = time.monotonic()
        rec = await lab.mgr.failover("a")
        assert time.monotonic() - t0 < 3
        assert rec["result"] == "rolled_back" and "deadline" in rec["reason"]
        await lab.chaos("c", "ok")
        await lab.mgr.reconcile()
        assert lab.holders_of("a") == ["a"] and not lab.sims["c"].active
    async with Lab(tmp_path / "2", step_timeout="5s") as lab:
        await lab.chaos("c", "hang")
        task = asyncio.create_task(lab.mgr.failover("a"))
        await wait_for(lambda: ("c", "POST", "/state") in lab.calls, 3, "import started")
        t0 = time.monotonic()
        await lab.mgr.shutdown(deadline=1.0)
        assert time.monotonic() - t0 < 2.5
        rec = await task
        assert rec["result"] == "rolled_back" and "shutting down" in rec["reason"]
        with pytest.raises(FailoverRejected):
            await lab.mgr.failover("b")


async def test_max_concurrent_fleet_wide(tmp_path):
    async with Lab(tmp_path, max_concurrent=1) as lab:
        await lab.chaos("c", "slow", delay_seconds=0.2)
        await lab.chaos("d", "slow", delay_seconds=0.2)
        r1, r2 = await asyncio.gather(lab.mgr.failover("a"), lab.mgr.failover("b"))
        assert {r1["result"], r2["result"]} == {"success"}
        assert {r1["backup"], r2["backup"]} == {"c", "d"}  # a busy backup is not chosen twice
        first, second = sorted((r1, r2), key=lambda r: r["started"])
        assert second["started"] + second["duration"] >= first["finished"] - 0.01
        journal_2 = lab.store.journal_entries(second["id"])
        select_ts = next(e["ts"] for e in journal_2 if e["step"] == "select")
        assert select_ts >= first["finished"] - 0.01  # the second waited for a slot


async def test_maintenance_drains_and_excludes(tmp_path):
    async with Lab(tmp_path) as lab:
        out = await lab.mgr.set_maintenance("a", True)
        assert out["switchover"]["result"] == "success"
        assert lab.holders_of("a") == ["c"]
        assert lab.fleet.get("a").health.state is State.MAINTENANCE
        assert lab.store.maintenance().keys() == {"a"}
        rec = await lab.mgr.failover("b")
        cand = {c["name"]: c for c in rec["candidates"]}
        assert cand["a"]["reason"] == "in maintenance"
        await lab.mgr.set_maintenance("a", False)
        assert lab.store.maintenance() == {}


async def test_checkpoints_keep_last_good(tmp_path):
    async with Lab(tmp_path) as lab:
        assert await lab.mgr.checkpoint_round() == {"a": True, "b": True}
        ts_a = lab.mgr.checkpoint_ts("a")
        good = lab.store.checkpoint("a")
        await lab.chaos("a", "garbage")
        assert await lab.mgr.checkpoint_round() == {"a": False, "b": True}
        assert lab.store.checkpoint("a") == good and lab.mgr.checkpoint_ts("a") == ts_a
        assert "not JSON" in lab.mgr.checkpoints.errors["a"]
        lab.fail("b")
        assert await lab.mgr.checkpoint_round() == {"a": False}  # only serving actives


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _json, max_size=5), st.text(min_size=1))
def test_snapshot_checksums_match_the_master_protocol(extra, name):
    """The client's one-pass checksums equal the simulated master's, for its own snapshot
    and for the form it stores on import."""
    snap = {**extra, "master": name, "sessions": extra, "pending_messages": [extra]}
    snap["checksum"] = snapshot_checksum(snap)
    parsed = parse_snapshot(json.dumps(snap).encode())
    assert parsed.checksum == snap["checksum"]
    stored = SimulatedMaster("x").import_snapshot(json.loads(json.dumps(snap)))
    assert stored in parsed.import_checksums
    with pytest.raises(MasterCallError, match="checksum mismatch"):
        parse_snapshot(json.dumps({**snap, "sessions": {"tampered": 1}}).encode())


# --- restart and crash recovery ------------------------------------------------------------

async def test_restart_after_completed_failover_no_new_failover(tmp_path):
    async with Lab(tmp_path) as lab:
        await lab.mgr.checkpoint_round()
        await lab.kill("a")
        assert (await lab.mgr.failover("a", trigger="auto"))["result"] == "success"
        await lab.mgr.shutdown(1)
        # a new exporter on the same store: fresh fleet (roles from config), fresh manager
        lab.fleet = Fleet(lab.config.masters, lab.config.probe, 5)
        mgr2 = lab.new_manager()
        assert await mgr2.recover_journal() == []
        assert lab.role("a") == "standby" and lab.role("c") == "active"
        await mgr2.on_transition(lab.fail("a"))  # the dead master is detected again
        assert lab.store.count_failovers() == 1
        assert lab.store.list_failovers()[0]["result"] == "success"
        lab.mgr = mgr2


def _crash_journal(store: Store, snap_accept: list[str] | None, *, upto: str) -> int:
    """The journal a SIGKILL leaves when it hits right after ``upto`` began."""
    fid = store.begin_failover("a", "auto", "health: timeout", time.time())
    store.journal(fid, "plan", "begin", detail={"kind": "failover", "source": "a",
                                                "duties": ["a"], "to": None})
    store.journal(fid, "select", "begin")
    store.journal(fid, "fence", "begin")
    store.journal(fid, "fetch", "begin")
    store.journal(fid, "import", "begin", "c", {"checksum": "x", "accept": snap_accept,
                                                "had": []})
    if upto in ("verify", "activate"):
        store.journal(fid, "verify", "begin", "c")
    if upto == "activate":
        store.journal(fid, "activate", "begin", "c", {"duty": "a", "had": []})
    return fid


async def test_recovery_rolls_forward_import_done_before_crash(tmp_path):
    async with Lab(tmp_path) as lab:
        snap = lab.sims["a"].snapshot()
        async with lab.session.post(f"{lab.urls['c']}/state", json=snap) as resp:
            stored = (await resp.json())["checksum"]
        lab.sims["a"].active, lab.sims["a"].duties = False, []  # the fence had landed
        fid = _crash_journal(lab.store, [snap["checksum"], stored], upto="activate")
        mgr = lab.new_manager()
        [rec] = await mgr.recover_journal()
        assert rec["id"] == fid and rec["result"] == "success", rec
        assert "rolled forward" in rec["reason"]
        assert lab.holders_of("a") == ["c"]
        assert lab.role("a") == "standby"
        assert await mgr.recover_journal() == []  # exactly once
        assert lab.new_manager().duties.assignments() == {"a": "c"}
        await mgr.on_transition(lab.fail("a"))
        assert lab.store.count_failovers() == 1  # never a second failover for that failure


async def test_recovery_rolls_back_when_import_never_landed(tmp_path):
    async with Lab(tmp_path) as lab:
        lab.sims["a"].active, lab.sims["a"].duties = False, []  # fenced, alive
        fid = _crash_journal(lab.store, ["never-stored"], upto="import")
        [rec] = await lab.new_manager().recover_journal()
        assert rec["id"] == fid and rec["result"] == "rolled_back"
        assert lab.holders_of("a") == ["a"]  # un-fenced: status quo ante
        assert not lab.sims["c"].active
        assert lab.role("a") == "active"
        assert lab.store.unfinished_failovers() == []


async def test_recovery_does_not_roll_forward_past_a_live_active_master(tmp_path):
    async with Lab(tmp_path) as lab:
        snap = lab.sims["a"].snapshot()
        async with lab.session.post(f"{lab.urls['c']}/state", json=snap) as resp:
            stored = (await resp.json())["checksum"]
        fid = _crash_journal(lab.store, [stored], upto="activate")  # a never got fenced
        [rec] = await lab.new_manager().recover_journal()
        assert rec["id"] == fid and rec["result"] == "rolled_back"
        assert lab.holders_of("a") == ["a"] and "a" not in lab.sims["c"].imported


# --- real processes ------------------------------------------------------------------------

async def start_process_fleet(processes: Processes, specs=FLEET) -> dict[str, Proc]:
    """`ha-exporter master` processes by name, started together on port 0 (``url`` set)."""
    started = await asyncio.gather(*(processes.master(name, region, role)
                                      for name, region, role, _ in specs))
    return dict(zip((name for name, *_ in specs), started, strict=True))


async def test_sigkilled_master_process_state_moves_to_standby_process(tmp_path, processes):
    masters = await start_process_fleet(processes)
    urls = {name: await proc.listening() for name, proc in masters.items()}
    cfg = make_config(urls, str(tmp_path / "s.db"))
    store = Store(cfg.state_path)
    fleet = Fleet(cfg.masters, cfg.probe, 5)
    async with aiohttp.ClientSession() as session:
        for i in range(4):
            async with session.post(f"{urls['a']}/messages",
                                    json={"id": f"k{i}", "chat": "+9715"}) as r:
                assert r.status == 202
        mgr = FailoverManager(cfg, fleet, store, DutyTable(cfg.masters, store, _ignore), session)
        assert (await mgr.checkpoint_round())["a"]
        _, _, raw = store.checkpoint("a")
        checkpointed = json.loads(raw)
        masters["a"].kill(signal.SIGKILL)
        await asyncio.to_thread(masters["a"].wait, 10)
        failed = drive(fleet.get("a"), State.FAILED, "timeout")
        t0 = time.monotonic()
        await mgr.on_transition(failed)
        took = time.monotonic() - t0
        [rec] = store.list_failovers()
        assert rec["result"] == "success" and rec["backup"] == "c", rec
        assert took < 2.0
        async with session.get(f"{urls['c']}/state") as r:
            state = await r.json()
        async with session.get(f"{urls['c']}/health") as r:
            assert (await r.json())["active"] is True
        assert state["checksum"] == snapshot_checksum(state)
        assert state["imported"]["a"]["sessions"] == checkpointed["sessions"]
        assert (state["imported"]["a"]["pending_messages"]
                == checkpointed["pending_messages"])
        await mgr.shutdown(1)
    store.close()


CRASHING_MANAGER = textwrap.dedent("""
    import asyncio, json, os, signal, sys, aiohttp
    from exporter.config import parse_config
    from exporter.failover.duties import DutyTable
    from exporter.failover.manager import FailoverManager
    from exporter.fleet import Fleet, State
    from exporter.failover.protocol import MasterClient
    from exporter.store.sqlite import Store

    cfg = parse_config(json.loads(sys.argv[1]))

    async def die(*args, **kwargs):  # SIGKILL exactly between import and activate
        os.kill(os.getpid(), signal.SIGKILL)

    MasterClient.activate = die

    async def main():
        async with aiohttp.ClientSession() as session:
            fleet = Fleet(cfg.masters, cfg.probe, 5)
            store = Store(cfg.state_path)
            duties = DutyTable(cfg.masters, store, lambda _event: None)
            mgr = FailoverManager(cfg, fleet, store, duties, session)
            await mgr.checkpoint_round()
            a = fleet.get("a")
            while a.health.state is not State.FAILED:  # failed probes, as the prober feeds
                a.health.observe(False, False, "timeout", 0.0)
            await mgr.failover("a", trigger="auto", reason="health: timeout")

    asyncio.run(main())
""")


async def test_exporter_sigkilled_between_import_and_activate_recovers_once(tmp_path, processes):
    masters = await start_process_fleet(processes)
    urls = {name: await proc.listening() for name, proc in masters.items()}
    cfg = make_config(urls, str(tmp_path / "s.db"))
    raw_cfg = {"state_path": cfg.state_path,
               "masters": [m.model_dump() for m in cfg.masters],
               "failover": {"step_timeout": "2s"}}
    # the master a is dead before the exporter acts; its checkpoint is what moves
    proc = processes.start([sys.executable, "-c", CRASHING_MANAGER, json.dumps(raw_cfg)],
                           "crashing-manager")
    # let it checkpoint first: kill a once the checkpoint is stored
    store = Store(cfg.state_path)
    await wait_for(lambda: store.checkpoint("a") is not None, 15, "checkpoint of a")
    masters["a"].kill(signal.SIGKILL)
    rc = await asyncio.to_thread(proc.wait, 30)
    assert rc == -signal.SIGKILL
    [open_row] = store.unfinished_failovers()
    steps = [(e["step"], e["backup"]) for e in store.journal_entries(open_row["id"])]
    assert steps[-1] == ("activate", "c")  # died right there
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{urls['c']}/health") as r:
            assert (await r.json())["active"] is False  # imported, not yet active
        fleet = Fleet(cfg.masters, cfg.probe, 5)
        mgr = FailoverManager(cfg, fleet, store, DutyTable(cfg.masters, store, _ignore), session)
        [rec] = await mgr.recover_journal()
        assert rec["result"] == "success" and rec["backup"] == "c", rec
        async with session.get(f"{urls['c']}/health") as r:
            assert (await r.json())["active"] is True
        async with session.get(f"{urls['c']}/state") as r:
            assert "a" in (await r.json())["imported"]
        async with session.get(f"{urls['d']}/health") as r:
            assert (await r.json())["active"] is False
        # exactly once: a second restart recovers nothing, starts nothing
        fleet2 = Fleet(cfg.masters, cfg.probe, 5)
        mgr2 = FailoverManager(cfg, fleet2, store, DutyTable(cfg.masters, store, _ignore),
                               session)
        assert await mgr2.recover_journal() == []
        await mgr2.on_transition(drive(fleet2.get("a"), State.FAILED, "t"))
        assert store.count_failovers() == 1
        await mgr.shutdown(1)
        await mgr2.shutdown(1)
    store.close()
