"""The parts of failover that carry logic of their own, each with known inputs and outputs:
the fence, duty, state and failback decisions, cooldowns, a dry run's plan, what recovery
reads from a journal, and how a step is bounded (step timeout, deadline, shutdown)."""

from __future__ import annotations

import asyncio
import time

import pytest

from exporter.config import FailoverConfig
from exporter.failover.moves import Interrupted, Move, MoveRequest, StepFailed
from exporter.failover.plan import planned_steps
from exporter.failover.policy import (
    Cooldowns,
    DutyFix,
    Failback,
    failback_decision,
    fix_duty,
    judge_state,
    must_fence,
)
from exporter.failover.protocol import MasterClient
from exporter.failover.recovery import Attempt, read_attempts, state_source
from exporter.failover.steps import Steps
from exporter.failover.undo import Undoer
from exporter.store.sqlite import Store


@pytest.mark.parametrize("reports_active, fresh, holder, holder_serves, moving, fence", [
    (True, True, "c", True, False, True),  # serves the duty c serves too: split brain
    (False, True, "c", True, False, False),  # came back as an inactive standby
    (None, True, "c", True, False, False),  # no answer is no evidence
    (True, True, None, True, False, False),  # nobody else holds the duty
    (True, True, "c", False, False, False),  # c does not serve it: adopted, not fenced
    (True, True, "c", True, True, False),  # a move of it is under way
    # a probe sent before the switchover's release landed, read after the duty moved: the
    # spurious "came back active while c holds its duty" fence after a clean switchover
    (True, False, "c", True, False, False),
])
def test_must_fence(reports_active, fresh, holder, holder_serves, moving, fence):
    assert must_fence(reports_active, fresh, holder, holder_serves, moving) is fence


@pytest.mark.parametrize("serving, ready, gone, expected", [
    (("c",), True, False, DutyFix()),  # served by its holder alone
    (("a",), True, False, DutyFix(adopt="a")),  # the Quick start run twice: a serves a
    ((), True, False, DutyFix(activate="c")),  # c answers, is healthy, serves nothing
    ((), False, True, DutyFix(failover="c")),  # c failed: its duties move
    ((), False, False, DutyFix()),  # c not failed yet: the health machine decides first
    (("a", "c"), True, False, DutyFix(stop=("a",))),  # split: the holder keeps it
    (("a", "d"), True, False, DutyFix(adopt="a", stop=("d",))),  # the owner before others
    (("b", "d"), True, False, DutyFix(adopt="b", stop=("d",))),  # then the first by name
])
def test_fix_duty(serving, ready, gone, expected):
    assert fix_duty("a", "c", serving, ready, gone) == expected


@pytest.mark.parametrize("found, age, require, limit, allow, source, refused", [
    ("live", None, True, 300.0, False, "live", None),
    ("checkpoint", 20.0, True, 300.0, False, "checkpoint", None),
    ("checkpoint", 20.0, True, None, False, "checkpoint", None),
    ("checkpoint", 400.0, True, 300.0, False, "none", "max_checkpoint_age"),
    ("checkpoint", 400.0, False, 300.0, False, "none", None),  # stateless, allowed by config
    ("none", None, True, 300.0, False, "none", "require_state"),
    ("none", None, False, 300.0, False, "none", None),
    ("none", None, True, 300.0, True, "none", None),  # the operator's override
])
def test_judge_state(found, age, require, limit, allow, source, refused):
    verdict = judge_state(found, age, require, limit, allow)
    assert (verdict.source, verdict.refused_by) == (source, refused)
    if refused:
        assert verdict.note.startswith(f"refused by failover.{refused}: ")


@pytest.mark.parametrize("mode, automatic, holder, serving, moving, cooling, expected", [
    ("auto", True, "c", True, False, False, Failback.NOW),
    ("auto", True, "c", True, False, True, Failback.AFTER_COOLDOWN),
    ("manual", True, "c", True, False, False, Failback.NO),
    ("auto", False, "c", True, False, False, Failback.NO),  # paused or disabled
    ("auto", True, None, True, False, False, Failback.NO),  # holds its own duty
    ("auto", True, "c", False, False, False, Failback.NO),  # not serving
    ("auto", True, "c", True, True, False, Failback.NO),  # a move of it is running
])
def test_failback_decision(mode, automatic, holder, serving, moving, cooling, expected):
    assert failback_decision(mode, automatic, holder, serving, moving, cooling) is expected


def test_cooldowns_per_master_fleet_wide_and_reset():
    c = Cooldowns({"a": 100.0})
    assert c.left("a", 130.0, 60.0, 0.0) == ("per-master", 30.0)
    assert c.left("b", 130.0, 60.0, 0.0) is None  # no fleet-wide cooldown configured
    assert c.left("b", 130.0, 60.0, 300.0) == ("fleet-wide", 270.0)
    assert c.left("b", 130.0, 60.0, 300.0, include_fleet=False) is None  # failback
    c.mark("b", 200.0)
    assert c.left("b", 230.0, 60.0, 0.0) == ("per-master", 30.0)
    assert c.left("a", 230.0, 60.0, 100.0) == ("fleet-wide", 70.0)
    c.clear("b")  # a reset clears the master's cooldown, not the fleet's
    assert c.left("b", 230.0, 60.0, 0.0) is None
    assert c.left("b", 230.0, 60.0, 100.0) == ("fleet-wide", 70.0)


def test_no_cooldown_holds_back_an_unserved_duty_but_failed_attempts_are_paced():
    c = Cooldowns({"a": 100.0, "b": 100.0}, {"b": 100.0})  # b's last move failed
    assert c.left("a", 130.0, 60.0, 300.0, unserved=True) is None
    assert c.left("b", 130.0, 60.0, 300.0, unserved=True) == ("per-master", 30.0)
    c.mark("a", 140.0)
    c.settle("a", "success")  # a failback, say: its duty is served again
    assert c.left("a", 150.0, 60.0, 0.0) == ("per-master", 50.0)  # flapping protection
    assert c.left("a", 150.0, 60.0, 0.0, unserved=True) is None  # nobody serves it: go
    c.mark("a", 160.0)
    c.settle("a", "failed")
    assert c.left("a", 170.0, 60.0, 0.0, unserved=True) == ("per-master", 50.0)


def test_planned_steps_by_kind():
    fo = MoveRequest("failover", "a", "a", ("a",), None, "auto", "r", "exporter")
    plan = planned_steps(fo, ["c", "d"], "http://hook", 12.0)
    assert [s["step"] for s in plan] == ["select", "pre_hook", "fence", "fetch", "import",
                                         "verify", "activate", "routing"]
    assert plan[0] == {"step": "select", "status": "planned", "detail": {"order": ["c", "d"]}}
    assert plan[3]["detail"] == {"from": "a", "fallback_checkpoint_ts": 12.0}
    assert plan[4] == {"step": "import", "status": "planned", "backup": "c"}
    so = MoveRequest("switchover", "a", "a", ("a", "b"), "d", "manual", "r", "api")
    plan = planned_steps(so, [], None, None)
    assert [s["step"] for s in plan] == ["select", "fetch", "import", "verify", "activate",
                                         "routing", "release"]
    assert plan[2]["backup"] is None and plan[4]["detail"] == {"duties": ["a", "b"]}
    assert plan[-1]["detail"] == {"master": "a"}


def test_read_attempts_from_a_journal():
    def e(step, backup=None, status="begin", **detail):
        return {"step": step, "backup": backup, "status": status, "detail": detail}

    entries = [e("plan", kind="failover"), e("fence"), e("fetch"),
               e("import", "c", accept=["x", "y"], had=[]), e("verify", "c"),
               e("rollback", "c"), e("rollback", "c", status="done", errors=[]),
               e("activate", "d", duty="a", had=["d"]), e("routing", "d")]
    got = read_attempts(entries)
    assert list(got) == ["c", "d"]  # in the order they were tried
    assert got["c"] == Attempt(accept={"x", "y"}, had=[], routing=False, rolled=True)
    assert got["d"] == Attempt(accept=None, had=["d"], routing=True, rolled=False)
    assert got["c"].imported and not got["d"].imported
    assert state_source(entries) is None  # not fetched yet
    assert state_source([*entries, e("fetch", status="done", source="checkpoint")]) == (
        "checkpoint")


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "s.db")
    yield s
    s.close()


def new_move(store: Store, deadline: float) -> Move:
    fid = store.begin_failover("a", "auto", "test", time.time())
    return Move(fid, "failover", "a", "a", ["a"], "auto", "test", "exporter", time.time(),
                time.monotonic() + deadline)


async def test_a_step_timeout_is_a_step_failure(store):
    steps = Steps(store, lambda: FailoverConfig(step_timeout="100ms", deadline="10s"))
    move = new_move(store, 10.0)

    async def ignores_its_timeout(_timeout: float) -> None:
        await asyncio.sleep(5)

    t0 = time.monotonic()
    with pytest.raises(StepFailed, match=r"timeout after 0\.1s"):
        await steps.run(move, "import", "c", ignores_its_timeout)
    assert time.monotonic() - t0 < 1.5
    assert move.steps[-1]["status"] == "error" and move.steps[-1]["backup"] == "c"
    assert [(j["step"], j["status"]) for j in store.journal_entries(move.id)] == [
        ("import", "begin")]  # journalled before it ran


async def test_the_deadline_interrupts_a_step(store):
    steps = Steps(store, lambda: FailoverConfig(step_timeout="5s", deadline="200ms"))
    move = new_move(store, 0.2)
    seen: list[float] = []

    async def hangs(timeout: float) -> None:
        seen.append(timeout)
        await asyncio.sleep(5)

    with pytest.raises(Interrupted, match=r"deadline of 0\.2s exceeded"):
        await steps.run(move, "import", "c", hangs)
    assert seen == [5.0]  # the call keeps its step timeout; the deadline cuts it
    assert move.late and move.scope is None
    with pytest.raises(Interrupted, match="deadline"):  # nothing starts after the deadline
        await steps.run(move, "activate", "c", hangs)
    assert seen == [5.0]


async def test_interrupt_stops_the_running_step_and_every_later_one(store):
    steps = Steps(store, lambda: FailoverConfig(step_timeout="5s", deadline="10s"))
    move = new_move(store, 10.0)
    started = asyncio.Event()

    async def hangs(_timeout: float) -> None:
        started.set()
        await asyncio.sleep(5)

    task = asyncio.create_task(steps.run(move, "import", "c", hangs))
    await started.wait()
    move.interrupt("exporter shutting down")
    with pytest.raises(Interrupted, match="exporter shutting down"):
        await asyncio.wait_for(task, 1)
    assert move.steps[-1]["detail"]["error"] == "exporter shutting down"
    with pytest.raises(Interrupted, match="exporter shutting down"):
        await steps.run(move, "activate", "c", hangs)


async def test_undo_calls_are_short_when_late(store):
    def settings() -> FailoverConfig:
        return FailoverConfig(step_timeout="5s", deadline="10s")

    # no master is called: the client, fleet and duties are never used here
    undo = Undoer(MasterClient(None, 5.0), store, None, None, Steps(store, settings), settings)
    move = new_move(store, 10.0)
    assert undo.timeout(move) == 5.0
    assert undo.timeout(None) == 1.0  # retries outside a move must not stall the loop
    move.interrupt("exporter shutting down")
    assert undo.timeout(move) == 1.0
    assert undo.timeout(new_move(store, -1.0)) == 1.0  # past its deadline
    undo.hurry = True
    assert undo.timeout(new_move(store, 10.0)) == 1.0
