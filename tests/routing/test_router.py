"""Router: pool membership, health awareness, panic, slow start, ejection, strategies."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.config import STRATEGIES, BalancingConfig, MasterConfig, RebalanceConfig
from exporter.fleet import SERVING, RoleChanged, State
from exporter.routing.router import Decision, NoRoute, Router


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def masters(n: int, **fields: object) -> list[MasterConfig]:
    return [
        MasterConfig(name=f"m{i}", url=f"http://127.0.0.1:{9200 + i}", **fields)  # type: ignore[arg-type]
        for i in range(n)
    ]


def router(ms: list[MasterConfig], clock: Clock | None = None, **balancing: object) -> Router:
    return Router(
        BalancingConfig(**balancing),  # type: ignore[arg-type]
        ms,
        clock=clock or Clock(),
        rng=random.Random(42),
    )


def spread(r: Router, n: int = 200, **kw: str) -> Counter[str]:
    return Counter(r.route(**kw).master for _ in range(n))


# ---- properties -----------------------------------------------------------------------------


@given(st.lists(st.integers(min_value=1, max_value=10), min_size=1, max_size=6))
@settings(max_examples=100, deadline=None)
def test_round_robin_exact_proportions_over_every_window(weights: list[int]) -> None:
    ms = [
        MasterConfig(name=f"m{i}", url=f"http://h{i}:1", weight=w) for i, w in enumerate(weights)
    ]
    r = router(ms)
    total = sum(weights)
    seq = [r.route().master for _ in range(3 * total)]
    expected = {f"m{i}": w for i, w in enumerate(weights)}
    for start in range(0, 2 * total + 1):
        assert Counter(seq[start : start + total]) == expected


@given(n=st.integers(min_value=2, max_value=16), data=st.data())
@settings(max_examples=60, deadline=None)
def test_consistent_hash_moves_only_the_leavers_keys_and_they_return(
    n: int, data: st.DataObject
) -> None:
    r = router(masters(n), strategy="consistent_hash")
    keys = [f"user-{i}" for i in range(3000)]
    before = {k: r.route(key=k).master for k in keys}
    leaver = f"m{data.draw(st.integers(min_value=0, max_value=n - 1))}"
    how = data.draw(st.sampled_from(["failed", "maintenance", "ejected", "standby"]))
    if how == "ejected":
        r.update_config(BalancingConfig(strategy="consistent_hash", max_ejection_percent=1.0,
                                        outlier_consecutive_failures=1), masters(n))
        assert r.report(leaver, ok=False, latency_seconds=0.1)
    elif how == "standby":
        r.set_role(leaver, "standby")
    else:
        r.set_state(leaver, State(how))
    during = {k: r.route(key=k).master for k in keys}
    moved = {k for k in keys if during[k] != before[k]}
    assert moved == {k for k in keys if before[k] == leaver}  # nobody else's keys move
    assert len(moved) / len(keys) <= 1 / n + 0.06
    assert leaver not in during.values()
    if how == "standby":
        r.set_role(leaver, "active")
    else:
        r.set_state(leaver, State.HEALTHY)
    assert {k: r.route(key=k).master for k in keys} == before


@given(
    states=st.lists(st.sampled_from(list(State)), min_size=6, max_size=6),
    fallback=st.permutations(["r0", "r1", "r2"]),
    request=st.sampled_from(["r0", "r1", "r2"]),
)
@settings(max_examples=200, deadline=None)
def test_geo_never_leaves_a_region_that_still_has_a_serving_master(
    states: list[State], fallback: list[str], request: str
) -> None:
    ms = [
        MasterConfig(name=f"m{i}", url=f"http://h{i}:1", region=f"r{i % 3}") for i in range(6)
    ]
    r = router(ms, strategy="geo", region_fallback=fallback)
    for m, s in zip(ms, states, strict=True):
        r.set_state(m.name, s)
    region_of = {m.name: m.region for m in ms}
    serving_regions = {region_of[m.name] for m, s in zip(ms, states, strict=True) if s in SERVING}
    try:
        got = {region_of[r.route(region=request).master] for _ in range(12)}
    except NoRoute:
        assert not serving_regions
        return
    if request in serving_regions:
        assert got == {request}
    elif not r.panic:
        first = next(reg for reg in [request, *fallback] if reg in serving_regions)
        assert got == {first}


ops = st.one_of(
    st.tuples(st.just("state"), st.integers(0, 4), st.sampled_from(list(State))),
    st.tuples(st.just("state"), st.integers(0, 4), st.sampled_from(list(State))),
    st.tuples(st.just("role"), st.integers(0, 4), st.sampled_from(["active", "standby"])),
    st.tuples(st.just("report"), st.integers(0, 4), st.booleans()),
    st.tuples(st.just("load"), st.integers(0, 4), st.integers(0, 2000)),
    st.tuples(st.just("tick"), st.floats(0, 20), st.none()),
    st.tuples(st.just("strategy"), st.sampled_from(STRATEGIES), st.none()),
)
requests = st.tuples(st.sampled_from([None, "a", "b", "c"]), st.sampled_from([None, "r0", "r1"]))


@given(st.lists(st.tuples(ops, requests), min_size=1, max_size=60))
@settings(max_examples=300, deadline=None)
def test_never_routes_to_failed_ejected_maintenance_or_standby(sequence: list[tuple]) -> None:
    clock = Clock()
    ms = [
        MasterConfig(name=f"m{i}", url=f"http://h{i}:1", region=f"r{i % 2}", priority=i % 3,
                     role="standby" if i == 4 else "active", weight=1 + i % 2)
        for i in range(5)
    ]
    r = router(ms, clock, outlier_consecutive_failures=2, saturation_queue=1000)
    state = {m.name: State.HEALTHY for m in ms}
    role = {m.name: m.role for m in ms}
    for (op, a, b), (key, region) in sequence:
        if op == "state":
            state[f"m{a}"] = b
            r.set_state(f"m{a}", b)
        elif op == "role":
            role[f"m{a}"] = b
            r.set_role(f"m{a}", b)
        elif op == "report":
            r.report(f"m{a}", b, 0.01)
        elif op == "load":
            r.set_load(f"m{a}", b)
        elif op == "tick":
            clock.now += a
        else:
            r.set_strategy(a)
        usable = [
            n for n in state
            if role[n] == "active" and not r.is_ejected(n)
            and (state[n] in SERVING or (r.panic and state[n] is State.RECOVERING))
        ]
        for _ in range(3):
            try:
                d = r.route(key=key, region=region)
            except NoRoute as exc:
                assert not usable, exc.reason
                break
            assert d.master in usable
            assert state[d.master] not in (State.FAILED, State.MAINTENANCE)
            assert d.strategy == r.strategy
        for n, w in r.effective_weights().items():
            if n not in usable:
                assert w == 0


# ---- membership and health ------------------------------------------------------------------


def test_decision_shape_and_counters() -> None:
    r = router(masters(2))
    d = r.route()
    assert d == Decision("m0", "http://127.0.0.1:9200", "round_robin")
    r.route()
    r.set_strategy("priority")
    r.route()
    assert r.decisions == {("m0", "round_robin"): 1, ("m1", "round_robin"): 1,
                           ("m0", "priority"): 1}


def test_standby_gets_nothing_until_activated() -> None:
    ms = masters(2)
    ms[1] = ms[1].model_copy(update={"role": "standby"})
    r = router(ms)
    assert set(spread(r)) == {"m0"}
    assert r.effective_weights() == {"m0": 1.0, "m1": 0.0}
    r.set_role("m1", "active")
    r.set_role("m0", "standby")
    assert set(spread(r)) == {"m1"}
    with pytest.raises(ValueError, match="unknown role"):
        r.set_role("m1", "primary")


def test_degraded_gets_reduced_weight_and_nonserving_get_none() -> None:
    r = router(masters(4), degraded_weight=0.5, panic_threshold=0.0)
    r.set_state("m1", State.DEGRADED)
    r.set_state("m2", State.RECOVERING)
    r.set_state("m3", State.MAINTENANCE)
    assert r.effective_weights() == {"m0": 1.0, "m1": 0.5, "m2": 0.0, "m3": 0.0}
    assert spread(r, 300) == {"m0": 200, "m1": 100}


def test_no_route_has_a_reason_and_unknown_names_raise() -> None:
    r = router(masters(2))
    r.set_state("m0", State.FAILED)
    r.set_state("m1", State.MAINTENANCE)
    with pytest.raises(NoRoute) as exc:
        r.route()
    assert "1 failed" in str(exc.value) and "1 maintenance" in exc.value.reason
    for call in (lambda: r.set_state("x", State.HEALTHY), lambda: r.report("x", True, 0.1),
                 lambda: r.set_load("x", 1), lambda: r.set_role("x", "active")):
        with pytest.raises(KeyError):
            call()


def test_unknown_region_is_a_value_error_in_every_strategy() -> None:
    r = router(masters(2, region="uae"), region_fallback=["usa"])
    for strategy in STRATEGIES:
        r.set_strategy(strategy)
        with pytest.raises(ValueError, match="unknown region 'mars'"):
            r.route(region="mars")
        assert r.route(region="usa").master in {"m0", "m1"}  # named by region_fallback
        assert r.route(region="").master in {"m0", "m1"}


def test_set_strategy_rejects_unknown_names() -> None:
    r = router(masters(1))
    with pytest.raises(ValueError, match="unknown strategy 'random'"):
        r.set_strategy("random")
    assert r.strategy == "round_robin"
    r.set_strategy("geo")
    assert r.strategy == "geo"
    assert r.route().strategy == "geo"


def test_consistent_hash_without_key_falls_back_to_round_robin() -> None:
    r = router(masters(3), strategy="consistent_hash")
    r.warm()
    decisions = [r.route() for _ in range(6)]
    assert Counter(d.master for d in decisions) == {"m0": 2, "m1": 2, "m2": 2}
    assert {d.strategy for d in decisions} == {"consistent_hash"}
    assert len({r.route(key="sticky").master for _ in range(20)}) == 1


def test_priority_spills_on_failure_and_saturation() -> None:
    ms = [MasterConfig(name=f"m{i}", url=f"http://h{i}:1", priority=p)
          for i, p in enumerate([1, 2, 3])]
    r = router(ms, strategy="priority", saturation_queue=100)
    assert set(spread(r, 20)) == {"m0"}
    r.set_state("m0", State.FAILED)
    assert set(spread(r, 20)) == {"m1"}
    r.set_load("m1", 100)
    assert set(spread(r, 20)) == {"m2"}
    r.set_load("m1", 5)
    r.set_state("m0", State.HEALTHY)
    assert set(spread(r, 20)) == {"m0"}


def test_least_loaded_follows_queue_and_in_flight() -> None:
    r = router(masters(2), strategy="least_loaded")
    r.set_load("m0", 50)
    r.set_load("m1", 0)
    seq = [r.route().master for _ in range(60)]
    assert seq[:50] == ["m1"] * 50  # in-flight on m1 catches up with m0's queue
    assert set(seq[50:]) == {"m0", "m1"}
    for _ in range(60):
        r.report(seq.pop(), True, 0.01)
    assert r.master_info("m1")["in_flight"] == 0


def test_panic_spreads_over_recovering_masters() -> None:
    r = router(masters(4), panic_threshold=0.5, degraded_weight=0.5)
    r.set_state("m0", State.FAILED)
    r.set_state("m1", State.RECOVERING)
    assert not r.panic  # 2 of 4 serving: not below 50%
    assert set(spread(r)) == {"m2", "m3"}
    r.set_state("m2", State.RECOVERING)
    assert r.panic  # 1 of 4
    assert r.effective_weights() == {"m0": 0.0, "m1": 0.5, "m2": 0.5, "m3": 1.0}
    assert spread(r, 200) == {"m3": 100, "m1": 50, "m2": 50}
    r.set_state("m1", State.HEALTHY)
    r.set_state("m2", State.HEALTHY)
    assert not r.panic


def test_panic_never_includes_failed_or_maintenance() -> None:
    r = router(masters(3), panic_threshold=1.0)
    r.set_state("m0", State.FAILED)
    r.set_state("m1", State.MAINTENANCE)
    assert r.panic
    assert set(spread(r)) == {"m2"}


# ---- slow start -----------------------------------------------------------------------------


def test_slow_start_ramps_linearly_after_recovery() -> None:
    clock = Clock()
    r = router(masters(2), clock, slow_start=20.0)
    r.set_state("m1", State.FAILED)
    r.set_state("m1", State.RECOVERING)
    assert r.effective_weights()["m1"] == 0.0
    r.set_state("m1", State.HEALTHY)
    assert r.effective_weights()["m1"] == pytest.approx(0.1)
    assert r.master_info("m1")["slow_start_remaining_seconds"] == pytest.approx(20.0)
    clock.now += 10
    r.route()  # a decision past a ramp step rebuilds the pool
    assert r.effective_weights()["m1"] == pytest.approx(0.55)
    clock.now += 9.5
    assert r.effective_weights()["m1"] == pytest.approx(0.1 + 0.9 * 19.5 / 20)
    clock.now += 1
    assert r.effective_weights() == {"m0": 1.0, "m1": 1.0}
    assert r.master_info("m1")["slow_start_remaining_seconds"] is None
    counts = spread(r, 100)
    assert counts == {"m0": 50, "m1": 50}


def test_slow_start_share_follows_the_ramp() -> None:
    clock = Clock()
    r = router(masters(2), clock, slow_start=30.0)
    r.set_state("m1", State.MAINTENANCE)
    r.set_state("m1", State.HEALTHY)
    assert spread(r, 110)["m1"] == 10  # weights 1 : 0.1
    clock.now += 30
    assert spread(r, 100)["m1"] == 50


def test_slow_start_on_activation_and_disabled_when_zero() -> None:
    clock = Clock()
    ms = masters(2)
    ms[1] = ms[1].model_copy(update={"role": "standby"})
    r = router(ms, clock, slow_start=10.0)
    r.set_role("m1", "active")
    assert r.effective_weights()["m1"] == pytest.approx(0.1)
    r2 = router(masters(2), clock, slow_start=0.0)
    r2.set_state("m1", State.FAILED)
    r2.set_state("m1", State.HEALTHY)
    assert r2.effective_weights()["m1"] == 1.0


# ---- passive outlier detection --------------------------------------------------------------


def test_consecutive_failures_eject_at_once() -> None:
    r = router(masters(4), outlier_consecutive_failures=3, slow_start=0.0)
    assert not r.report("m0", False, 0.2)
    assert not r.report("m0", False, 0.2)
    assert not r.report("m0", True, 0.2)  # a success resets the streak
    assert not r.report("m0", False, 0.2)
    assert not r.report("m0", False, 0.2)
    assert r.report("m0", False, 0.2)
    assert r.is_ejected("m0")
    assert "m0" not in spread(r)
    r.set_state("m0", State.HEALTHY)  # the probes still say healthy: re-admitted
    assert not r.is_ejected("m0")
    assert "m0" in spread(r)


def test_ejection_is_capped_by_max_ejection_percent() -> None:
    r = router(masters(5), outlier_consecutive_failures=1, max_ejection_percent=0.5)
    assert r.ejection_limit == 2
    assert r.report("m0", False, 0.1)
    assert r.report("m1", False, 0.1)
    assert not r.report("m2", False, 0.1)  # cap reached: m2 keeps its traffic
    assert not r.is_ejected("m2")
    assert set(spread(r)) == {"m2", "m3", "m4"}
    r.set_state("m0", State.DEGRADED)  # re-admission frees a slot
    assert r.report("m2", False, 0.1)


def test_single_master_is_never_ejected_below_full_percent() -> None:
    r = router(masters(1), outlier_consecutive_failures=1, max_ejection_percent=0.5)
    assert not r.report("m0", False, 0.1)
    assert r.route().master == "m0"


def test_ejection_is_dropped_when_probes_fail_it_and_kept_while_recovering() -> None:
    r = router(masters(3), outlier_consecutive_failures=1, panic_threshold=0.0)
    assert r.report("m0", False, 0.1)
    r.set_state("m0", State.RECOVERING)
    assert r.is_ejected("m0")
    r.set_state("m0", State.FAILED)
    assert not r.is_ejected("m0")
    assert "m0" not in spread(r)
    r.set_state("m0", State.HEALTHY)
    assert "m0" in spread(r, 400)


def test_ejection_re_admission_uses_slow_start() -> None:
    clock = Clock()
    r = router(masters(2), clock, outlier_consecutive_failures=1, slow_start=10.0)
    r.report("m1", False, 0.1)
    assert r.effective_weights()["m1"] == 0.0
    r.set_state("m1", State.HEALTHY)
    assert r.effective_weights()["m1"] == pytest.approx(0.1)


# ---- reload ---------------------------------------------------------------------------------


def test_update_config_keeps_state_of_unchanged_masters() -> None:
    clock = Clock()
    r = router(masters(3), clock, slow_start=10.0)
    r.set_state("m0", State.FAILED)
    r.set_load("m1", 42)
    r.set_strategy("geo")
    new = [*masters(2), MasterConfig(name="m9", url="http://h9:1")]
    r.update_config(BalancingConfig(slow_start=10.0), new)
    assert r.strategy == "geo"  # configured strategy unchanged: the run-time choice stays
    w = r.effective_weights()
    assert w["m0"] == 0.0 and w["m1"] == 1.0
    assert w["m9"] == pytest.approx(0.1)  # added by a reload: slow start
    assert "m2" not in w
    assert r.master_info("m1")["queue_length"] == 42
    r.update_config(BalancingConfig(strategy="priority"), new)
    assert r.strategy == "priority"  # the configured value changed: it wins
    moved = [new[0].model_copy(update={"role": "standby"}), *new[1:]]
    r.update_config(BalancingConfig(strategy="priority"), moved)
    r.on_role(RoleChanged("m0", "active", "standby"))  # what the duty table publishes then
    assert r.master_info("m0")["role"] == "standby"


def test_update_config_rejects_duplicate_names() -> None:
    r = router(masters(1))
    with pytest.raises(ValueError):
        r.update_config(BalancingConfig(), masters(1) + masters(1))


# ---- rebalancing through the router ---------------------------------------------------------


def test_rebalance_shifts_within_for_plus_one_evaluation_and_restores() -> None:
    clock = Clock()
    rb = RebalanceConfig(imbalance_ratio=2.0, **{"for": 30.0}, step=0.25, min_weight_factor=0.1)
    r = router(masters(3), clock, rebalance=rb)
    for name in ("m0", "m1", "m2"):
        r.set_load(name, 20)
    assert r.evaluate_rebalance() == []
    r.set_load("m0", 500)  # one master's queue grows
    interval, events, elapsed = 5.0, [], 0.0
    while not events and elapsed <= 30 + interval:
        events = r.evaluate_rebalance()
        clock.now += interval
        elapsed += interval
    assert elapsed <= 30 + interval
    assert [(e.master, e.old_factor, e.new_factor, e.reason) for e in events] == [
        ("m0", 1.0, 0.75, "imbalance")
    ]
    assert r.effective_weights()["m0"] == 0.75
    for _ in range(10):
        r.evaluate_rebalance()
        clock.now += interval
    assert r.effective_weights()["m0"] == pytest.approx(0.1)  # bounded by min_weight_factor
    assert r.distribution_quality() < 50
    r.set_load("m0", 20)  # drained
    restored = []
    for _ in range(40):
        restored += r.evaluate_rebalance()
        clock.now += interval
    assert {e.reason for e in restored} == {"restored"}
    assert r.effective_weights()["m0"] == 1.0
    assert r.distribution_quality() == 100.0
