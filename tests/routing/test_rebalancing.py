"""Rebalancer rules (timing, bounds, hysteresis) and the distribution quality definition."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.config import RebalanceConfig
from exporter.routing.rebalancing import (
    QUEUE_FLOOR,
    LoadSample,
    Rebalancer,
    distribution_quality,
    imbalance_ratios,
)

CFG = RebalanceConfig(imbalance_ratio=2.0, **{"for": 30.0}, step=0.25, min_weight_factor=0.1)


def samples(*queues: float, weights: tuple[float, ...] | None = None) -> list[LoadSample]:
    weights = weights or (1.0,) * len(queues)
    return [LoadSample(f"m{i}", q, w) for i, (q, w) in enumerate(zip(queues, weights, strict=True))]


def test_ratio_compares_each_master_with_the_mean_of_the_others() -> None:
    ratios = imbalance_ratios(samples(300, 100, 50))
    assert ratios["m0"] == pytest.approx(300 / 75)
    assert ratios["m1"] == pytest.approx(100 / 175)
    # two masters: max/mean could never pass 2, this can
    assert imbalance_ratios(samples(100, 20))["m0"] == pytest.approx(5.0)
    # an idle fleet with a few stray messages is not imbalanced (floor)
    assert imbalance_ratios(samples(5, 0, 0))["m0"] == pytest.approx(5 / QUEUE_FLOOR)
    # per unit of base weight: twice the weight may hold twice the queue
    assert imbalance_ratios(samples(200, 100, weights=(2.0, 1.0)))["m0"] == pytest.approx(1.0)
    assert imbalance_ratios(samples(100)) == {}


def test_quality_definition() -> None:
    assert distribution_quality(samples(50, 50, 50)) == 100.0
    assert distribution_quality(samples(0, 0)) == 100.0
    assert distribution_quality(samples(7)) == 100.0
    assert distribution_quality([]) == 100.0
    assert distribution_quality(samples(3, 0)) > 90  # noise on an idle fleet reads as fine
    assert distribution_quality(samples(10_000, 0, 0, 0)) < 1
    assert distribution_quality(samples(100, 0)) < distribution_quality(samples(100, 50))
    assert distribution_quality(samples(200, 100, weights=(2.0, 1.0))) == 100.0


@given(st.lists(st.floats(0, 1e6), min_size=0, max_size=20))
def test_quality_is_bounded(queues: list[float]) -> None:
    assert 0.0 <= distribution_quality(samples(*queues)) <= 100.0


def test_shift_only_after_for_then_one_step_per_evaluation_down_to_the_floor() -> None:
    rb = Rebalancer(CFG)
    hot = samples(500, 20, 20)
    assert rb.evaluate(0.0, hot) == []
    assert rb.evaluate(29.9, hot) == []
    events = rb.evaluate(30.0, hot)
    assert [(e.master, e.old_factor, e.new_factor, e.reason) for e in events] == [
        ("m0", 1.0, 0.75, "imbalance")
    ]
    assert events[0].ratio == pytest.approx(25.0)
    factors = [rb.evaluate(30.0 + 5 * i, hot) for i in range(1, 10)]
    assert [e[0].new_factor for e in factors if e] == [0.5, 0.25, 0.1]
    assert rb.factor("m0") == 0.1
    assert rb.factor("m1") == 1.0
    assert rb.factors() == {"m0": 0.1}


def test_a_break_in_the_imbalance_restarts_the_clock() -> None:
    rb = Rebalancer(CFG)
    assert rb.evaluate(0.0, samples(500, 20, 20)) == []
    assert rb.evaluate(20.0, samples(30, 20, 20)) == []  # back in band
    assert rb.evaluate(35.0, samples(500, 20, 20)) == []
    assert rb.evaluate(64.0, samples(500, 20, 20)) == []
    assert rb.evaluate(65.0, samples(500, 20, 20))


def test_restore_needs_calm_below_the_hysteresis_band_for_the_for_duration() -> None:
    rb = Rebalancer(CFG)
    rb.evaluate(0.0, samples(500, 20, 20))
    rb.evaluate(30.0, samples(500, 20, 20))
    rb.evaluate(35.0, samples(500, 20, 20))
    assert rb.factor("m0") == 0.5
    band = samples(35, 20, 20)  # ratio 1.75: between 0.8 * 2.0 and 2.0 -> hold
    assert all(rb.evaluate(40.0 + i, band) == [] for i in range(100))
    calm = samples(20, 20, 20)
    assert rb.evaluate(200.0, calm) == []
    assert rb.evaluate(229.0, calm) == []
    first = rb.evaluate(230.0, calm)
    assert [(e.old_factor, e.new_factor, e.reason) for e in first] == [(0.5, 0.75, "restored")]
    assert [(e.old_factor, e.new_factor) for e in rb.evaluate(235.0, calm)] == [(0.75, 1.0)]
    assert rb.evaluate(240.0, calm) == []
    assert rb.factors() == {}


def test_unobserved_masters_keep_their_factor_but_lose_their_clocks() -> None:
    rb = Rebalancer(CFG)
    rb.evaluate(0.0, samples(500, 20, 20))
    rb.evaluate(30.0, samples(500, 20, 20))
    assert rb.factor("m0") == 0.75
    rb.evaluate(35.0, samples(20, 20)[1:])  # m0 out of rotation: one sample, nothing to compare
    assert rb.factor("m0") == 0.75
    assert rb.evaluate(40.0, samples(500, 20, 20)) == []  # clock restarted
    rb.forget(["m1", "m2"])
    assert rb.factor("m0") == 1.0


def test_configure_clamps_factors_to_a_new_floor() -> None:
    rb = Rebalancer(CFG)
    for t in range(0, 100, 5):
        rb.evaluate(float(t), samples(500, 20, 20))
    assert rb.factor("m0") == 0.1
    rb.configure(RebalanceConfig(min_weight_factor=0.5))
    assert rb.factor("m0") == 0.5
