"""The routing table: its shape, its versions, the watch, its validation, and known answers
(decisions from the table equal the router's own decisions for the same table and keys)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from exporter.config import BalancingConfig, MasterConfig
from exporter.fleet import State
from exporter.routing import NoRoute, Router, RoutingTable, TableRouter, TooManyWaiters
from exporter.routing.table import MAX_TABLE_MASTERS


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fleet() -> list[MasterConfig]:
    """Two regions, three priorities, unequal weights, one standby."""
    spec = [("a", "uae", 1, 2.0, "active"), ("b", "uae", 1, 1.0, "active"),
            ("c", "usa", 2, 1.0, "active"), ("d", "usa", 3, 3.0, "active"),
            ("e", "eu", 2, 1.0, "active"), ("f", "uae", 5, 1.0, "standby")]
    return [MasterConfig(name=n, url=f"http://127.0.0.1:{9300 + i}", region=r, priority=p,
                         weight=w, role=role)  # type: ignore[arg-type]
            for i, (n, r, p, w, role) in enumerate(spec)]


def make(clock: Clock | None = None, **balancing: object) -> Router:
    return Router(BalancingConfig(slow_start=0, **balancing), fleet(),  # type: ignore[arg-type]
                  clock=clock or Clock(), rng=random.Random(7))


def table_of(r: Router) -> RoutingTable:
    return RoutingTable.model_validate_json(r.table.current().body)


# ---- shape ----------------------------------------------------------------------------------


def test_the_table_holds_what_a_client_needs_to_route() -> None:
    r = make(strategy="geo", region_fallback=["usa"], saturation_queue=50)
    r.set_state("c", State.DEGRADED)
    r.set_state("e", State.FAILED)
    r.set_load("a", 12.5)
    data = json.loads(r.table.current().body)
    assert set(data) == {"format", "version", "strategy", "panic", "region_fallback",
                         "saturation_queue", "outlier_consecutive_failures",
                         "max_ejection_percent", "no_route", "masters"}
    assert (data["format"], data["strategy"], data["panic"]) == (1, "geo", False)
    assert data["region_fallback"] == ["usa"] and data["saturation_queue"] == 50
    assert data["no_route"] is None
    assert [m["name"] for m in data["masters"]] == list("abcdef")  # the router's order
    a, c, e, f = (data["masters"][i] for i in (0, 2, 4, 5))
    assert a == {"name": "a", "url": "http://127.0.0.1:9300", "region": "uae", "priority": 1,
                 "weight": 2.0, "effective_weight": 2.0, "state": "healthy", "role": "active",
                 "ejected": False, "queue": 12.5}
    assert (c["state"], c["effective_weight"]) == ("degraded", 0.5)  # degraded_weight 50%
    assert (e["state"], e["effective_weight"]) == ("failed", 0.0)
    assert (f["role"], f["effective_weight"], f["queue"]) == ("standby", 0.0, None)
    weights = {m["name"]: m["effective_weight"] for m in data["masters"]}
    assert weights == r.effective_weights()
    RoutingTable.model_validate(data)  # what the server writes, the client's model accepts


def test_no_route_and_panic_are_in_the_table() -> None:
    r = make()
    for name in "abcde":
        r.set_state(name, State.FAILED)
    t = table_of(r)
    assert t.panic and "no active master can take traffic" in (t.no_route or "")
    with pytest.raises(NoRoute, match="no active master"):
        TableRouter(t).route()
    r.set_state("a", State.RECOVERING)  # panic lets recovering masters in
    t = table_of(r)
    assert t.panic and t.no_route is None
    assert [m.name for m in t.masters if m.effective_weight > 0] == ["a"]
    assert TableRouter(t).route().master == "a"


# ---- versions -------------------------------------------------------------------------------


def test_version_moves_only_when_the_table_changes() -> None:
    clock = Clock()
    r = make(clock)
    v0 = r.table.current().version
    assert v0 > 1_600_000_000_000  # starts at the creation time in ms: never reused
    assert r.table.current().version == v0
    r.set_state("a", State.HEALTHY)  # the state it already has
    r.route()
    r.report("a", True, 0.01)
    assert r.table.current().version == v0
    r.set_state("b", State.FAILED)  # a health change
    v1 = r.table.current().version
    assert v1 == v0 + 1 and table_of(r).masters[1].state == "failed"
    r.set_state("b", State.HEALTHY)
    assert r.table.current().version == v1 + 1
    r.set_strategy("priority")
    r.set_role("f", "active")
    assert r.table.current().version == v1 + 2  # two changes, one rebuild: one new version
    r.set_strategy("priority")
    assert r.table.current().version == v1 + 2


def test_queue_figures_are_taken_in_at_most_every_queue_refresh() -> None:
    clock = Clock()
    r = make(clock)
    r.table.queue_refresh = 5.0
    v0 = r.table.current().version
    r.set_load("a", 10)
    clock.now += 5
    r.set_load("a", 20)
    assert r.table.current().version == v0 + 1  # once queue_refresh passed since the build
    r.set_load("a", 30)
    clock.now += 4.9
    assert r.table.current().version == v0 + 1 and table_of(r).masters[0].queue == 20
    clock.now += 0.1
    assert r.table.current().version == v0 + 2 and table_of(r).masters[0].queue == 30
    clock.now += 10
    r.set_load("a", 30)  # sampled again, unchanged
    assert r.table.current().version == v0 + 2


def test_slow_start_steps_are_new_versions() -> None:
    clock = Clock()
    r = Router(BalancingConfig(slow_start=10), fleet(), clock=clock)
    r.set_state("a", State.FAILED)
    r.set_state("a", State.HEALTHY)
    v0 = r.table.current().version
    w0 = table_of(r).masters[0].effective_weight
    clock.now += 0.5  # one step of 1/20th of the window
    assert r.table.current().version == v0 + 1
    assert table_of(r).masters[0].effective_weight > w0


# ---- the watch ------------------------------------------------------------------------------


async def test_a_watch_answers_at_once_on_a_change_and_times_out_without() -> None:
    r = Router(BalancingConfig(), fleet())
    v = r.table.current().version
    assert (await r.table.wait(v - 1, 10)).version == v  # an older version: at once
    t0 = time.monotonic()
    assert await r.table.wait(v, 0.2) is None
    assert 0.19 <= time.monotonic() - t0 < 1.0
    assert r.table.waiting == 0

    async def change() -> None:
        await asyncio.sleep(0.1)
        r.set_state("c", State.MAINTENANCE)

    t0 = time.monotonic()
    snap, _ = await asyncio.gather(r.table.wait(v, 10), change())
    assert snap is not None and snap.version == v + 1
    assert time.monotonic() - t0 < 0.5


async def test_waiting_costs_no_polling_and_the_cap_holds() -> None:
    r = Router(BalancingConfig(), fleet())
    builds = 0
    source = r.table_source

    def counted():  # type: ignore[no-untyped-def]
        nonlocal builds
        builds += 1
        return source()

    r.table._source = counted  # type: ignore[method-assign]
    r.table.max_waiters = 20
    v = r.table.current().version
    waiters = [asyncio.create_task(r.table.wait(v, 10)) for _ in range(20)]
    await asyncio.sleep(0.5)
    assert r.table.waiting == 20 and builds == 1  # twenty requests waiting, no rebuild
    with pytest.raises(TooManyWaiters):
        await r.table.wait(v, 10)
    assert (await r.table.wait(v - 5, 10)).version == v  # no slot needed to answer at once
    r.set_state("d", State.FAILED)
    answers = await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert {a.version for a in answers if a} == {v + 1}
    assert builds == 2 and r.table.waiting == 0
    cancelled = asyncio.create_task(r.table.wait(v + 1, 10))
    await asyncio.sleep(0.05)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert r.table.waiting == 0  # a request that went away gives its slot back


# ---- the client's model ---------------------------------------------------------------------


def _data() -> dict:
    return json.loads(make().table.current().body)


@pytest.mark.parametrize("spoil", [
    lambda d: d.update(extra=1),
    lambda d: d.update(format=2),
    lambda d: d.update(strategy="random"),
    lambda d: d.update(version=-1),
    lambda d: d.update(version="7"),
    lambda d: d["masters"][0].update(weight=float("nan")),
    lambda d: d["masters"][0].update(effective_weight=-1),
    lambda d: d["masters"][0].update(url="ftp://x"),
    lambda d: d["masters"][0].update(name="a\nb"),
    lambda d: d["masters"][0].update(state="on fire"),
    lambda d: d["masters"][0].update(ejected=1),
    lambda d: d["masters"][0].update(queue=-3),
    lambda d: d["masters"][1].update(name="a"),  # duplicate
    lambda d: d["masters"][4].update(state="failed"),  # failed, yet with a weight
    lambda d: d["masters"][5].update(effective_weight=1.0),  # a standby with a weight
    lambda d: d["masters"][0].pop("region"),
    lambda d: d.update(masters=d["masters"] * (MAX_TABLE_MASTERS // 6 + 1)),
])
def test_a_table_that_does_not_hold_up_is_refused(spoil) -> None:  # type: ignore[no-untyped-def]
    data = _data()
    spoil(data)
    with pytest.raises(ValidationError):
        RoutingTable.model_validate_json(json.dumps(data))


# ---- known answers --------------------------------------------------------------------------


def _pair(strategy: str, **balancing: object) -> tuple[Router, TableRouter]:
    r = make(strategy=strategy, **balancing)
    r.set_state("b", State.FAILED)
    r.set_state("c", State.DEGRADED)
    r.set_load("d", 80)
    return r, TableRouter(table_of(r), rng=random.Random(7))


def test_consistent_hash_sends_every_key_where_the_exporter_does() -> None:
    r, local = _pair("consistent_hash")
    keys = [f"+97150{i:07d}" for i in range(3000)]
    assert [local.route(k).master for k in keys] == [r.route(k).master for k in keys]
    assert "b" not in {local.route(k).master for k in keys}


def test_geo_follows_region_then_fallback_then_anyone_like_the_exporter() -> None:
    r, local = _pair("geo", region_fallback=["usa"])
    regions = ["uae", "usa", "eu", None, "uae", "eu"] * 50
    assert ([local.route(region=g).master for g in regions]
            == [r.route(region=g).master for g in regions])
    with pytest.raises(ValueError, match="unknown region 'mars'"):
        local.route(region="mars")


def test_priority_and_its_spill_over_match_the_exporter() -> None:
    r, local = _pair("priority", saturation_queue=50)
    seq = [r.route().master for _ in range(200)]
    assert [local.route().master for _ in range(200)] == seq
    assert set(seq) == {"a"}  # b failed: a alone in priority 1
    r.table.queue_refresh = 0
    r.set_load("a", 60)  # a saturated: spill to priority 2
    local = TableRouter(table_of(r), rng=random.Random(7))
    seq = [r.route().master for _ in range(200)]
    assert [local.route().master for _ in range(200)] == seq
    assert set(seq) == {"c", "e"}


def test_round_robin_keeps_the_exporters_schedule_and_proportions() -> None:
    r, local = _pair("round_robin")
    seq = [r.route().master for _ in range(1000)]
    assert [local.route().master for _ in range(1000)] == seq
    total = 2.0 + 0.5 + 3.0 + 1.0  # a, c degraded, d, e
    got = Counter(local.route().master for _ in range(int(total * 2 * 100)))
    assert got == {"a": 400, "c": 100, "d": 600, "e": 200}


@given(
    st.lists(st.tuples(st.sampled_from(["uae", "usa", "eu"]), st.integers(0, 3),
                       st.integers(1, 4), st.sampled_from(list(State)),
                       st.sampled_from(["active", "active", "standby"])),
             min_size=1, max_size=12),
    st.sampled_from(["round_robin", "priority", "geo", "consistent_hash"]),
    st.lists(st.sampled_from(["uae", "usa", "eu", None]), max_size=2),
)
@settings(max_examples=150, deadline=None)
def test_any_table_routes_like_its_router(specs, strategy, fallback) -> None:  # type: ignore[no-untyped-def]
    configs = [MasterConfig(name=f"m{i}", url=f"http://h{i}:1", region=g, priority=p, weight=w,
                            role=role)  # type: ignore[arg-type]
               for i, (g, p, w, _, role) in enumerate(specs)]
    r = Router(BalancingConfig(strategy=strategy, slow_start=0,  # type: ignore[arg-type]
                               region_fallback=[f for f in fallback if f]),
               configs, rng=random.Random(1))
    for i, (_, _, _, state, _) in enumerate(specs):
        r.set_state(f"m{i}", state)
    local = TableRouter(table_of(r), rng=random.Random(1))
    for n in range(60):
        key, region = f"k{n}", ["uae", "usa", "eu", None][n % 4]
        try:
            expected = r.route(key, region).master
        except (NoRoute, ValueError) as exc:
            with pytest.raises(type(exc)):
                local.route(key, region)
            continue
        assert local.route(key, region).master == expected
