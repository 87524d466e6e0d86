"""Backup selection rules, each on its own, plus a property: the order is a total, stable
ranking of exactly the eligible masters."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.config import MasterConfig, ProbeConfig
from exporter.failover.selection import rank
from exporter.fleet import Fleet, State
from tests.failover.driving import drive


def fleet_of(*specs: dict) -> Fleet:
    masters = [MasterConfig(url=f"http://127.0.0.1:{9000 + i}", **spec)
               for i, spec in enumerate(specs)]
    return Fleet(masters, ProbeConfig(), 5)


def configured(f: Fleet):
    return lambda name: f.get(name).config.role


def names(ranking) -> list[str]:
    return [r.name for r in ranking.order]


def test_standby_first_then_region_priority_load():
    f = fleet_of(
        {"name": "dead", "region": "uae", "role": "active", "priority": 1},
        {"name": "act", "region": "uae", "role": "active", "priority": 0},
        {"name": "sb-usa", "region": "usa", "role": "standby", "priority": 5},
        {"name": "sb-uae", "region": "uae", "role": "standby", "priority": 5},
        {"name": "sb-hi", "region": "uae", "role": "standby", "priority": 9},
        {"name": "sb-uae-busy", "region": "uae", "role": "standby", "priority": 5},
    )
    f.get("sb-uae").queue_length = 10
    f.get("sb-uae-busy").queue_length = 50
    r = rank(f.get("dead"), f, configured(f))
    # the same-region standby with a worse priority (sb-hi) before the one abroad (sb-usa)
    assert names(r) == ["sb-uae", "sb-uae-busy", "sb-hi", "sb-usa", "act"]
    why = {c["name"]: c["reason"] for c in r.candidates}
    assert why["sb-uae"] == "best candidate"
    assert "queue 50" in why["sb-uae-busy"]
    assert why["sb-usa"] == "region usa, sb-uae is in the failed master's region uae"
    assert "priority 9" in why["sb-hi"]
    assert "ranked after standby" in why["act"]
    assert "dead" not in why  # the failed master is not a candidate of itself


def test_a_usa_master_fails_over_to_the_usa_standby_not_the_better_priority_abroad():
    """The demo's fleet: master-b (usa) goes to master-d (usa, priority 4), not to master-c
    (uae, priority 3), as the demo and the README promise."""
    f = fleet_of(
        {"name": "master-a", "region": "uae", "role": "active", "priority": 1},
        {"name": "master-b", "region": "usa", "role": "active", "priority": 2},
        {"name": "master-c", "region": "uae", "role": "standby", "priority": 3},
        {"name": "master-d", "region": "usa", "role": "standby", "priority": 4},
    )
    assert names(rank(f.get("master-b"), f, configured(f))) == [
        "master-d", "master-c", "master-a"]
    assert names(rank(f.get("master-a"), f, configured(f))) == [
        "master-c", "master-d", "master-b"]


def test_failover_regions_order_the_regions():
    f = fleet_of(
        {"name": "dead", "region": "uae", "role": "active"},
        {"name": "home", "region": "uae", "role": "standby", "priority": 1},
        {"name": "eu", "region": "eu", "role": "standby", "priority": 9},
        {"name": "us", "region": "us", "role": "standby", "priority": 5},
    )
    r = rank(f.get("dead"), f, configured(f), allowed_regions=["eu", "uae"])
    assert names(r) == ["eu", "home"]  # as listed; "us" is not allowed at all
    why = {c["name"]: c["reason"] for c in r.candidates}
    assert why["home"] == "region uae comes after eu of eu in failover_regions"
    assert "region us not allowed" in why["us"]


def test_passed_over_reasons():
    f = fleet_of(
        {"name": "dead", "role": "active"},
        {"name": "never", "role": "standby", "failover": "never"},
        {"name": "maint", "role": "standby"},
        {"name": "degr", "role": "standby"},
        {"name": "failed", "role": "standby"},
        {"name": "busy", "role": "standby"},
        {"name": "far", "role": "standby", "region": "mars"},
        {"name": "ok", "role": "standby"},
    )
    drive(f.get("degr"), State.DEGRADED)
    drive(f.get("failed"), State.FAILED)
    f.get("maint").health.set_maintenance(True, 0.0)
    r = rank(f.get("dead"), f, configured(f), busy={"busy": "taking over x"},
             allowed_regions={"default"})
    assert names(r) == ["ok"]
    why = {c["name"]: c["reason"] for c in r.candidates}
    assert why["never"] == "excluded by config (failover: never)"
    assert why["maint"] == "in maintenance"
    assert why["degr"] == "not healthy (degraded)"
    assert why["failed"] == "not healthy (failed)"
    assert why["busy"] == "mid-takeover (taking over x)"
    assert "region mars not allowed" in why["far"]
    assert [c["eligible"] for c in r.candidates].count(True) == 1
    r.note("ok", "took over")
    assert next(c for c in r.candidates if c["name"] == "ok")["outcome"] == "took over"


_master = st.fixed_dictionaries({
    "role": st.sampled_from(["active", "standby"]),
    "priority": st.integers(0, 3),
    "region": st.sampled_from(["uae", "usa"]),
    "failover": st.sampled_from(["allow", "allow", "never"]),
    "state": st.sampled_from([State.HEALTHY, State.HEALTHY, State.DEGRADED, State.FAILED]),
    "queue": st.none() | st.integers(0, 5),
})


@settings(max_examples=200, deadline=None)
@given(st.lists(_master, min_size=1, max_size=12))
def test_ranking_is_total_and_sorted(specs):
    f = fleet_of(*({"name": f"m{i}", "role": s["role"], "priority": s["priority"],
                    "region": s["region"], "failover": s["failover"]}
                   for i, s in enumerate(specs)))
    for i, s in enumerate(specs):
        rt = f.get(f"m{i}")
        drive(rt, s["state"])
        rt.queue_length = s["queue"]
    failed = f.get("m0")
    r = rank(failed, f, configured(f))
    expected_eligible = {rt.name for rt in f if rt.name != "m0"
                         and rt.config.failover == "allow" and rt.health.state is State.HEALTHY}
    assert set(names(r)) == expected_eligible
    keys = [(rt.config.role != "standby", rt.config.region != failed.config.region,
             rt.config.priority, rt.queue_length or 0) for rt in r.order]
    assert keys == sorted(keys)
    assert len(r.candidates) == len(specs) - 1
    assert [c["rank"] for c in r.candidates if c["eligible"]] == list(range(1, len(r.order) + 1))
