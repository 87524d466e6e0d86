"""Health state machine: hysteresis properties over random probe sequences."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from exporter.fleet import HealthMachine, State, Transition

thresholds = st.integers(min_value=1, max_value=6)
probe_runs = st.lists(st.booleans(), max_size=200)


def feed(m: HealthMachine, results: list[bool]) -> list[Transition]:
    out = []
    for i, ok in enumerate(results):
        t = m.observe(ok, False, "probe", float(i))
        if t:
            out.append(t)
    return out


@given(thresholds, thresholds, probe_runs)
def test_fails_after_exactly_failure_threshold_consecutive_failures(fail_t, rec_t, results):
    m = HealthMachine("m", fail_t, rec_t, max_recovery_attempts=1000)
    run = 0
    for i, ok in enumerate(results):
        before = m.state
        run = 0 if ok else run + 1
        t = m.observe(ok, False, "probe", float(i))
        if before is State.HEALTHY and t is not None and t.new is State.FAILED:
            assert run == fail_t  # never sooner, never later
        if before is State.HEALTHY and run >= fail_t:
            assert m.state is State.FAILED


@given(thresholds, thresholds, probe_runs)
def test_heals_only_after_recovery_threshold_consecutive_successes(fail_t, rec_t, results):
    m = HealthMachine("m", fail_t, rec_t, max_recovery_attempts=1000)
    feed(m, [False] * fail_t)
    assert m.state is State.FAILED
    run = 0
    for i, ok in enumerate(results):
        before = m.state
        run = run + 1 if ok else 0
        m.observe(ok, False, "probe", float(i))
        if before in (State.FAILED, State.RECOVERING) and m.state is State.HEALTHY:
            assert run == rec_t


@given(
    st.integers(min_value=2, max_value=6),
    st.integers(min_value=1, max_value=6),
    st.integers(min_value=1, max_value=100),
    st.booleans(),
)
def test_alternating_master_never_cycles(fail_t, rec_t, n, start_ok):
    """Up/down on every probe: a healthy master never fails (threshold >= 2)."""
    m = HealthMachine("m", fail_t, rec_t)
    seq = [(i % 2 == 0) == start_ok for i in range(n)]
    transitions = feed(m, seq)
    assert all(t.new is not State.FAILED for t in transitions)


@given(thresholds, st.integers(min_value=2, max_value=6), st.integers(min_value=1, max_value=100))
def test_alternating_failed_master_never_heals(fail_t, rec_t, n):
    m = HealthMachine("m", fail_t, rec_t, max_recovery_attempts=1000)
    feed(m, [False] * fail_t)
    transitions = feed(m, [i % 2 == 0 for i in range(n)])
    assert all(t.new is not State.HEALTHY for t in transitions)


def test_max_recovery_attempts_needs_manual_reset():
    m = HealthMachine("m", 1, 3, max_recovery_attempts=2)
    m.observe(False, False, "x", 0)
    for i in range(2):  # two recovery attempts that fall back
        m.observe(True, False, "x", 1 + i)
        assert m.state is State.RECOVERING
        m.observe(False, False, "x", 1.5 + i)
    assert m.needs_reset and m.state is State.FAILED
    for i in range(10):
        m.observe(True, False, "x", 10 + i)
    assert m.state is State.FAILED  # probes alone no longer heal it
    t = m.reset(30)
    assert t is not None and t.new is State.RECOVERING
    for i in range(3):
        m.observe(True, False, "x", 31 + i)
    assert m.state is State.HEALTHY and not m.needs_reset


def test_recovery_timeout_flag_counts_from_first_failure():
    m = HealthMachine("m", 1, 2)
    m.observe(False, False, "x", 100.0)
    m.observe(True, False, "x", 110.0)  # recovering
    m.observe(False, False, "x", 120.0)  # back to failed: still the same outage
    assert m.failed_since == 100.0
    assert not m.recovery_timed_out(125.0, 30.0)
    assert m.recovery_timed_out(131.0, 30.0)


def test_degraded_and_maintenance():
    m = HealthMachine("m", 2, 2)
    assert m.observe(True, True, "slow", 0).new is State.DEGRADED
    assert m.observe(True, False, "ok", 1).new is State.HEALTHY
    assert m.set_maintenance(True, 2).new is State.MAINTENANCE
    for i in range(5):
        assert m.observe(False, False, "x", 3 + i) is None  # maintenance holds
    assert m.set_maintenance(False, 9).new is State.RECOVERING

