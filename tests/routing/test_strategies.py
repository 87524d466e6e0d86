"""Strategy algorithms on their own, without the router's state handling."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.routing import strategies as balancing
from exporter.routing.strategies import (
    Geo,
    HashRing,
    LeastLoaded,
    Loads,
    Pool,
    Priority,
    SmoothWeighted,
    Topology,
    build_picker,
    key_hash,
)

int_weights = st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=8)


def _assert_exact_windows(seq: list[int], weights: list[int]) -> None:
    """Every window of sum(weights) consecutive picks holds exactly weights[i] of each i."""
    total = sum(weights)
    counts = Counter(seq[:total])
    assert [counts[i] for i in range(len(weights))] == weights
    for start in range(1, len(seq) - total + 1):
        counts[seq[start - 1]] -= 1
        counts[seq[start + total - 1]] += 1
        assert counts[seq[start - 1]] == weights[seq[start - 1]], f"window at {start}"


@given(int_weights)
@settings(max_examples=200, deadline=None)
def test_swrr_exact_proportions_over_every_window(weights: list[int]) -> None:
    sched = SmoothWeighted(weights)
    seq = [sched.pick() for _ in range(3 * sum(weights))]
    _assert_exact_windows(seq, weights)


@given(int_weights)
@settings(max_examples=200, deadline=None)
def test_swrr_is_smooth_never_a_full_pick_off_the_exact_share(weights: list[int]) -> None:
    sched = SmoothWeighted(weights)
    total = sum(weights)
    picks = [0] * len(weights)
    for t in range(1, 2 * total + 1):
        picks[sched.pick()] += 1
        for i, w in enumerate(weights):
            assert abs(picks[i] - t * w / total) < 1


def test_swrr_interleaves_like_nginx() -> None:
    sched = SmoothWeighted([5, 1, 1])
    seq = "".join("abc"[sched.pick()] for _ in range(7))
    assert sorted(seq) == sorted("aaaaabc")
    assert "aaa" not in seq  # nginx gives aabacaa; a plain stride schedule gives aaaaabc


@given(int_weights)
@settings(max_examples=50, deadline=None)
def test_swrr_rebase_continues_the_schedule_exactly(weights: list[int]) -> None:
    total = sum(weights)
    reference = SmoothWeighted(weights)
    expected = [reference.pick() for _ in range(4 * total)]
    old = balancing._REBASE_AFTER
    balancing._REBASE_AFTER = 1  # rebase at every period boundary
    try:
        sched = SmoothWeighted(weights)
        assert [sched.pick() for _ in range(4 * total)] == expected
    finally:
        balancing._REBASE_AFTER = old


def test_swrr_fractional_weights_hold_their_share() -> None:
    sched = SmoothWeighted([0.5, 0.25, 1.75])
    counts = Counter(sched.pick() for _ in range(2500))
    assert counts == {0: 500, 1: 250, 2: 1750}


@pytest.mark.parametrize("weights", [[], [1, 0], [1, -1], [float("inf")]])
def test_swrr_rejects_bad_weights(weights: list[float]) -> None:
    with pytest.raises(ValueError):
        SmoothWeighted(weights)


def test_key_hash_is_stable_across_processes() -> None:
    # Pinned: changing it would move every sticky key on upgrade.
    assert key_hash("session-42") == 0x28BD467CBC4B1AAC
    assert 0 <= key_hash("") < 2**64


def test_ring_skips_ineligible_and_follows_weights() -> None:
    names = [f"m{i}" for i in range(4)]
    ring = HashRing(names, [1.0, 1.0, 2.0, 0.0])
    all_ok = bytearray([1, 1, 1, 1])
    counts = Counter(ring.lookup(key_hash(f"k{i}"), all_ok) for i in range(20_000))
    assert 3 not in counts  # weight 0: no points at all
    assert 1.6 < counts[2] / ((counts[0] + counts[1]) / 2) < 2.4
    only_one = bytearray([0, 1, 0, 0])
    assert {ring.lookup(key_hash(f"k{i}"), only_one) for i in range(200)} == {1}
    assert ring.lookup(1, bytearray(4)) == -1


def test_ring_is_deterministic() -> None:
    names = [f"m{i}" for i in range(50)]
    a, b = HashRing(names, [1.0] * 50), HashRing(names, [1.0] * 50)
    ok = bytearray([1] * 50)
    assert all(a.lookup(key_hash(str(k)), ok) == b.lookup(key_hash(str(k)), ok) for k in range(500))


def _topo(regions: list[str], priorities: list[int]) -> Topology:
    n = len(regions)
    return Topology(tuple(f"m{i}" for i in range(n)), tuple(regions), tuple(priorities), (1.0,) * n)


def _pool(members: list[int], weights: list[float] | None = None) -> Pool:
    weights = weights or [1.0] * len(members)
    return Pool(tuple(members), tuple(weights), (True,) * len(members))


def test_priority_spills_on_saturation_and_comes_back() -> None:
    topo = _topo(["r"] * 4, [1, 1, 2, 3])
    loads = Loads([0.0] * 4, [0] * 4)
    picker = Priority(_pool([0, 1, 2, 3]), topo, loads, saturation=100, rng=random.Random(1))
    assert {picker.pick() for _ in range(20)} == {0, 1}
    loads.queue[0] = 100
    picker.load_changed(0)
    assert {picker.pick() for _ in range(20)} == {1}
    loads.queue[1] = 500
    picker.load_changed(1)
    assert {picker.pick() for _ in range(20)} == {2}
    loads.queue[2] = loads.queue[3] = 1000
    picker.load_changed(2)
    picker.load_changed(3)
    assert {picker.pick() for _ in range(20)} <= {0, 1}  # all saturated: strict priority
    loads.queue[1] = 0
    picker.load_changed(1)
    assert {picker.pick() for _ in range(20)} == {1}


def test_priority_ranks_serving_before_panic_recovering() -> None:
    topo = _topo(["r"] * 2, [1, 5])
    pool = Pool((0, 1), (0.5, 1.0), (False, True))
    picker = Priority(pool, topo, Loads([0.0] * 2, [0] * 2), saturation=10, rng=random.Random(1))
    assert {picker.pick() for _ in range(10)} == {1}


def test_least_loaded_two_choices_prefers_less_load_per_weight() -> None:
    loads = Loads([100.0, 0.0], [0, 0])
    picker = LeastLoaded(_pool([0, 1]), loads, random.Random(1))
    assert {picker.pick() for _ in range(50)} == {1}
    loads.queue[:] = [10.0, 10.0]
    weighted = LeastLoaded(_pool([0, 1], [3.0, 1.0]), loads, random.Random(1))
    assert {weighted.pick() for _ in range(50)} == {0}
    loads.in_flight[0] = 100
    assert {weighted.pick() for _ in range(50)} == {1}


def test_least_loaded_spreads_over_a_large_pool() -> None:
    n = 1000
    loads = Loads([0.0] * n, [0] * n)
    picker = LeastLoaded(_pool(list(range(n))), loads, random.Random(7))
    for _ in range(5000):
        loads.in_flight[picker.pick()] += 1
    assert max(loads.in_flight) <= 10  # two choices: the maximum stays near the mean of 5


def test_geo_region_then_fallback_then_anyone() -> None:
    topo = _topo(["uae", "uae", "usa", "eu"], [1] * 4)
    geo = Geo(_pool([0, 1, 2, 3]), topo, fallback=["eu"])
    assert {geo.pick(region="uae") for _ in range(10)} == {0, 1}
    assert {geo.pick(region="usa") for _ in range(10)} == {2}
    only_us = Geo(_pool([2, 3]), topo, fallback=["eu", "usa"])
    assert {only_us.pick(region="uae") for _ in range(10)} == {3}
    nobody_near = Geo(_pool([2]), topo, fallback=["eu"])
    assert {nobody_near.pick(region="uae") for _ in range(10)} == {2}
    assert {geo.pick(region=None) for _ in range(8)} == {0, 1, 2, 3}


def test_build_picker_rejects_unknown_and_needs_ring() -> None:
    topo = _topo(["r"], [1])
    loads = Loads([0.0], [0])
    kw = {"rng": random.Random(), "saturation": 10, "fallback": ()}
    with pytest.raises(ValueError):
        build_picker("random", _pool([0]), topo, loads, **kw)
    with pytest.raises(ValueError):
        build_picker("consistent_hash", _pool([0]), topo, loads, **kw)
