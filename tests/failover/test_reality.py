"""Reconcile to reality, no silent state loss, no cooldown for an unserved duty: against real
simulated masters in-process (``Lab``), probed for real (``probe``: their own /health folded
into the fleet records, as the prober does), every outcome asserted on the masters' own state.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import aiohttp
import pytest

from exporter.fleet import Outcome, Result, Transition
from tests.failover.test_manager import Lab


async def probe(lab: Lab, *names: str) -> list[Transition]:
    """One probe of each of ``names`` (default: every master): GET /health, folded into its
    record; the health transitions it caused."""
    out: list[Transition] = []
    for name in names or [spec[0] for spec in lab.specs]:
        rt = lab.fleet.get(name)
        t0 = time.perf_counter()
        try:
            async with lab.session.get(f"{lab.urls[name]}/health",
                                       timeout=aiohttp.ClientTimeout(total=2)) as resp:
                body: dict[str, Any] = await resp.json(content_type=None)
            result = Result.UNHEALTHY if body.get("status") == "down" else Result.SUCCESS
            outcome = Outcome(result, time.perf_counter() - t0,
                              degraded=body.get("status") == "degraded", payload=body)
        except (aiohttp.ClientError, ValueError, TimeoutError) as exc:
            outcome = Outcome(Result.CONNECT_ERROR, time.perf_counter() - t0, detail=str(exc))
        t = rt.apply(outcome, time.time())
        if t is not None:
            out.append(t)
    return out


async def probe_and_react(lab: Lab, rounds: int = 1) -> None:
    """``rounds`` probe rounds, each transition handed to the manager as the bus would."""
    for _ in range(rounds):
        for t in await probe(lab):
            await lab.mgr.on_transition(t)


def audited(lab: Lab, action: str) -> list[dict[str, Any]]:
    return [e for e in lab.store.list_audit(limit=500) if e["action"] == action]


def deactivations(lab: Lab, name: str) -> int:
    return lab.calls.count((name, "POST", "/deactivate"))


# --- item 1: the stored assignments checked against what the masters serve -------------------

async def test_a_second_run_with_stale_assignments_serves_every_duty_once(tmp_path, caplog):
    """The Quick start run twice in one directory: the state file says c holds a's and b's
    duties, but a, b and c were just started from their configs (a and b active, c standby).
    What serves is adopted: nobody is fenced, every duty stays served exactly once."""
    async with Lab(tmp_path) as lab:
        lab.store.move_duties(["a", "b"], "c", time.time(), 1)
        lab.mgr = lab.new_manager()
        assert lab.duties.holder_of("a") == "c"
        await lab.mgr.reconcile()  # before any probe: nothing is known, nothing is done
        assert lab.duties.holder_of("a") == "c" and not audited(lab, "duty_adopted")
        await probe(lab)
        caplog.set_level(logging.WARNING)
        await lab.mgr.reconcile()
        assert lab.holders_of("a") == ["a"] and lab.holders_of("b") == ["b"]
        assert not lab.sims["c"].active
        assert deactivations(lab, "a") == deactivations(lab, "b") == 0  # nobody fenced
        assert lab.store.assignments() == {} and lab.role("c") == "standby"
        assert {e["master"] for e in audited(lab, "duty_adopted")} == {"a", "b"}
        await probe(lab)
        await lab.mgr.reconcile()  # agreed now: audited and logged once
        assert len(audited(lab, "duty_adopted")) == 2
        assert len([r for r in caplog.records if "duty_adopted" == getattr(r, "event", "")]) == 2


async def test_an_unserved_duty_is_activated_on_its_healthy_holder(tmp_path):
    async with Lab(tmp_path) as lab:
        await probe(lab)
        lab.sims["b"].deactivate()  # behind the exporter's back
        await probe(lab)
        await lab.mgr.reconcile()
        assert lab.holders_of("b") == ["b"]
        assert [e["master"] for e in audited(lab, "duty_reactivated")] == ["b"]
    async with Lab(tmp_path / "off", enabled=False) as lab:  # the exporter only watches
        await probe(lab)
        lab.sims["b"].deactivate()
        await probe(lab)
        await lab.mgr.reconcile()
        assert lab.holders_of("b") == [] and not audited(lab, "duty_reactivated")


async def test_a_duty_with_two_holders_is_fenced_down_to_the_believed_one(tmp_path):
    async with Lab(tmp_path) as lab:
        await lab.mgr.checkpoint_round()
        assert (await lab.mgr.switchover("a", "c"))["result"] == "success"
        await probe(lab, "a", "b", "c", "d")
        await probe(lab)  # fresh reports after the switchover's calls
        lab.sims["a"].activate()  # restarted from its config: active again
        lab.sims["c"].activate("b")  # and c serves b's duty as well as b
        await probe(lab)
        await lab.mgr.reconcile()
        assert lab.holders_of("a") == ["c"] and lab.holders_of("b") == ["b"]
        assert not lab.sims["a"].active  # held nothing: fenced altogether
        assert lab.sims["c"].duties == ["a"]  # holds a: released b only
        assert [e["master"] for e in audited(lab, "fence_returning")] == ["a"]
        assert [e["master"] for e in audited(lab, "duty_released")] == ["c"]
        assert lab.duties.holder_of("a") == "c" and lab.duties.holder_of("b") == "b"


# --- item 3: no fence from a probe sent before a switchover's release landed ----------------

async def test_no_spurious_fence_after_a_clean_switchover(tmp_path, caplog):
    async with Lab(tmp_path) as lab:
        await probe(lab)
        before = await lab.get("a", "/health")  # a probe sent before the release landed...
        assert before["active"] and before["duties"] == ["a"]
        rec = await lab.mgr.switchover("a", "c")
        assert rec["result"] == "success" and deactivations(lab, "a") == 1  # the release
        await probe(lab, "b", "c", "d")
        await probe(lab, "b", "c", "d")  # c reports serving a's duty
        # ...and read after the duty moved
        lab.fleet.get("a").apply(Outcome(Result.SUCCESS, 0.01, payload=before), time.time())
        caplog.set_level(logging.WARNING)
        await lab.mgr.reconcile()
        assert deactivations(lab, "a") == 1  # no second deactivate
        assert "came back active" not in caplog.text
        assert not audited(lab, "fence_returning") and not audited(lab, "duty_adopted")
        await probe(lab)  # the fresh report agrees
        await lab.mgr.reconcile()
        assert lab.holders_of("a") == ["c"] and not lab.sims["a"].active
        assert not audited(lab, "fence_returning") and "came back active" not in caplog.text
        assert not audited(lab, "duty_adopted") and lab.duties.holder_of("a") == "c"


# --- item 4: an unserved duty does not wait for the cooldown of a manual failback ----------

async def test_a_failed_master_is_failed_over_inside_the_cooldown_of_its_failback(tmp_path):
    async with Lab(tmp_path, cooldown="60s") as lab:
        await lab.mgr.checkpoint_round()
        await probe(lab)
        await lab.chaos("a", "down")
        await probe_and_react(lab, 3)  # failed: its duty goes to c
        assert lab.duties.holder_of("a") == "c" and "a" in lab.sims["c"].duties
        await lab.chaos("a", "ok")
        await probe_and_react(lab, 3)  # back, fenced by the queued fence, standby
        assert lab.holders_of("a") == ["c"] and not lab.sims["a"].active
        back = await lab.mgr.reset("a")  # manual failback: a cooldown of a starts
        assert back["failback"]["result"] == "success" and lab.holders_of("a") == ["a"]
        assert lab.mgr._cooldown_left("a") is not None
        await lab.chaos("a", "down")  # fails again at once
        t0 = time.monotonic()
        await probe_and_react(lab, 3)
        newest = lab.store.list_failovers()[0]
        assert (newest["kind"], newest["result"]) == ("failover", "success"), newest
        backup = newest["backup"]  # served again within the detection time
        assert lab.duties.holder_of("a") == backup and "a" in lab.sims[backup].duties
        assert time.monotonic() - t0 < 10
        assert not [r for r in lab.store.list_failovers(limit=50)
                    if r["result"] == "skipped_cooldown"]


async def test_a_served_duty_is_still_protected_by_the_cooldown(tmp_path):
    """Flapping protection stays for moving a duty somebody serves: a failback waits."""
    async with Lab(tmp_path, cooldown="60s", failback="auto") as lab:
        await lab.mgr.checkpoint_round()
        await probe(lab)
        await lab.chaos("a", "down")
        await probe_and_react(lab, 3)
        await lab.chaos("a", "ok")
        await probe_and_react(lab, 3)
        assert lab.holders_of("a") == ["c"]  # back, but its duty stays with c for now
        assert audited(lab, "failback_deferred")


# --- item 2: no silent state loss --------------------------------------------------------

def corrupt_checkpoint(lab: Lab, name: str, age: float = 0.0) -> None:
    """Replace ``name``'s checkpoint with one whose checksum does not match its content."""
    ts, checksum, raw = lab.store.checkpoint(name)
    snap = json.loads(raw)
    snap["sessions"]["forged"] = {"phone": "+0"}
    lab.store.save_checkpoint(name, ts - age, checksum, json.dumps(snap).encode())


async def test_a_failover_with_only_a_corrupt_checkpoint_is_refused_then_overridden(tmp_path):
    async with Lab(tmp_path) as lab:
        await lab.mgr.checkpoint_round()
        corrupt_checkpoint(lab, "a")
        await lab.kill("a")
        rec = await lab.mgr.failover("a", trigger="auto", reason="health: timeout",
                                     actor="exporter")
        assert rec["result"] == "failed" and "refused by failover.require_state" in rec["reason"]
        fetch = next(s for s in rec["steps"] if s["step"] == "fetch")
        assert fetch["detail"]["source"] == "none"
        assert "checksum mismatch" in fetch["detail"]["checkpoint_error"]
        assert not any(s["step"] == "import" for s in rec["steps"])
        assert lab.holders_of("a") == [] and not lab.sims["c"].active  # nobody activated
        assert lab.duties.holder_of("a") == "a"  # a keeps its duty
        assert lab.mgr.stats.refusals == {("a", "require_state"): 1}
        assert lab.mgr.stats.results == {("a", "failed", "none"): 1}
        [refusal] = audited(lab, "failover_refused")
        assert refusal["detail"]["rule"] == "failover.require_state"

        rec = await lab.mgr.failover("a", actor="alice", allow_state_loss=True)
        assert rec["result"] == "success", rec
        fetch = next(s for s in rec["steps"] if s["step"] == "fetch")
        assert fetch["detail"]["source"] == "none"
        assert lab.holders_of("a") == [rec["backup"]]
        assert "a" not in lab.sims[rec["backup"]].imported  # activated without state
        assert lab.mgr.stats.results[("a", "success", "none")] == 1
        [lost] = audited(lab, "state_lost")
        assert (lost["actor"], lost["master"]) == ("alice", "a")


async def test_without_require_state_a_stateless_failover_goes_on_and_is_audited(tmp_path):
    async with Lab(tmp_path, require_state=False) as lab:
        await lab.mgr.checkpoint_round()
        corrupt_checkpoint(lab, "a")
        await lab.kill("a")
        rec = await lab.mgr.failover("a", trigger="auto", reason="t", actor="exporter")
        assert rec["result"] == "success"
        assert lab.mgr.stats.results == {("a", "success", "none"): 1}
        [lost] = audited(lab, "state_lost")
        assert lost["actor"] == "exporter" and "require_state is false" in lost["detail"]["why"]


@pytest.mark.parametrize("age, result", [(30.0, "success"), (900.0, "failed")])
async def test_a_checkpoint_older_than_max_checkpoint_age_is_not_moved(tmp_path, age, result):
    async with Lab(tmp_path, max_checkpoint_age="5m") as lab:
        await lab.mgr.checkpoint_round()
        ts, checksum, raw = lab.store.checkpoint("a")
        lab.store.save_checkpoint("a", ts - age, checksum, raw)
        await lab.kill("a")
        rec = await lab.mgr.failover("a", trigger="auto", reason="t", actor="exporter")
        assert rec["result"] == result, rec
        if result == "failed":
            assert "failover.max_checkpoint_age (300s)" in rec["reason"]
            assert lab.mgr.stats.refusals == {("a", "max_checkpoint_age"): 1}
        else:
            assert lab.mgr.stats.results == {("a", "success", "checkpoint"): 1}
