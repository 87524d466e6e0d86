"""SDOWN -> ODOWN: a master is failed cluster-wide only on a quorum of its current observers."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.cluster.quorum import (
    MAX_BYTES,
    UNOBSERVED,
    VERDICT_STATES,
    ClusterView,
    Verdict,
    aggregate,
    effective_quorum,
    published_queue,
)
from exporter.fleet.states import State


def v(observer: str, state: str = "healthy", **kw) -> Verdict:
    fields = {"up": state != "failed", "active": True, "duties": ("writer",), "reason": "probe"}
    fields.update(kw)
    return Verdict(observer, state, **fields)


def test_states_are_the_fleets_minus_maintenance():
    assert VERDICT_STATES == {"healthy", "degraded", "recovering", "failed"}
    assert "unknown" not in {s.value for s in State}  # hence UNOBSERVED
    assert UNOBSERVED == State.HEALTHY.value


@pytest.mark.parametrize(("quorum", "observers", "expected"),
                         [(2, 2, 2), (2, 1, 1), (3, 5, 3), (2, 0, 1), (0, 3, 1), (-1, 3, 1)])
def test_effective_quorum(quorum, observers, expected):
    assert effective_quorum(quorum, observers) == expected


def test_one_of_two_failed_is_not_failed():
    view = aggregate({"a": v("a", "failed"), "b": v("b", "degraded")}, ["a", "b"], 2)
    assert view == ClusterView("degraded", ("a",), ("a", "b"), 2, v("b", "degraded"))
    assert not view.failed


def test_both_of_two_failed_is_failed():
    view = aggregate({"b": v("b", "failed"), "a": v("a", "failed")}, ["a", "b"], 2)
    assert view.failed and view.state == "failed"
    assert view.failed_by == ("a", "b") and view.seen_by == ("a", "b")
    assert view.verdict == v("a", "failed")


def test_quorum_capped_by_a_single_observer():
    view = aggregate({"a": v("a", "failed")}, ["a"], 2)
    assert view.failed and view.quorum == 1 and view.failed_by == ("a",)


def test_stale_verdict_of_a_non_observer_is_ignored():
    verdicts = {"a": v("a", "failed"), "b": v("b"), "old": v("old", "failed")}
    view = aggregate(verdicts, ["a", "b"], 2)
    assert view.state == "healthy" and view.failed_by == ("a",) and view.seen_by == ("a", "b")
    # ... even when it alone would make the quorum, and with no other verdict at all.
    assert not aggregate({"old": v("old", "failed"), "a": v("a", "failed")}, ["a", "b"], 2).failed
    alone = aggregate({"old": v("old", "failed")}, ["a"], 1)
    assert alone == ClusterView(UNOBSERVED, (), (), 1, None)


def test_verdict_filed_under_another_name_is_ignored():
    view = aggregate({"a": v("a", "failed"), "b": v("a", "failed")}, ["a", "b"], 2)
    assert not view.failed and view.seen_by == ("a",)


def test_most_favourable_state_wins_ties_by_name():
    verdicts = {
        "c": v("c", "recovering"),
        "b": v("b", "degraded", active=False),
        "a": v("a", "degraded", active=True),
        "d": v("d", "failed"),
    }
    view = aggregate(verdicts, ["a", "b", "c", "d"], 2)
    assert view.state == "degraded" and view.verdict is verdicts["a"]
    assert aggregate({**verdicts, "e": v("e")}, ["a", "b", "c", "d", "e"], 2).state == "healthy"
    assert aggregate({"c": verdicts["c"]}, ["a", "c"], 2).state == "recovering"


def test_no_verdict_or_failed_short_of_quorum_is_unobserved():
    assert aggregate({}, ["a", "b"], 2) == ClusterView(UNOBSERVED, (), (), 2, None)
    short = aggregate({"a": v("a", "failed")}, ["a", "b", "c"], 2)
    assert short == ClusterView(UNOBSERVED, ("a",), ("a",), 2, None) and not short.failed
    assert aggregate({}, [], 2) == ClusterView(UNOBSERVED, (), (), 1, None)


verdicts_st = st.dictionaries(
    st.sampled_from("abcdef"), st.sampled_from(sorted(VERDICT_STATES)), max_size=6)


@given(verdicts_st, st.lists(st.sampled_from("abcdef"), max_size=6), st.integers(1, 6))
def test_failed_iff_quorum_of_current_observers(states, observers, quorum):
    verdicts = {name: v(name, state) for name, state in states.items()}
    view = aggregate(verdicts, observers, quorum)
    current = set(observers)
    saying_failed = {n for n, s in states.items() if n in current and s == "failed"}
    assert view.failed == (len(saying_failed) >= effective_quorum(quorum, len(current)))
    assert set(view.failed_by) == saying_failed
    assert set(view.seen_by) == current & set(states)
    if view.verdict is not None:
        assert view.verdict.observer in current and view.verdict.state == view.state


# JSON


def test_json_round_trip_compact_and_sorted():
    for verdict in (
        v("a"),
        v("a", "failed", active=None, duties=None, reason="connect_error: refused"),
        v("a", "degraded", active=False, duties=(), reason="é" * 200),
        v("a", State.RECOVERING, duties=tuple(f"d{i}" for i in range(100))),
    ):
        raw = verdict.to_json()
        assert Verdict.from_json("a", raw) == verdict
        doc = json.loads(raw)
        assert list(doc) == sorted(doc) and b" " not in raw.replace(b"connect_error: ", b"")
        assert "observer" not in doc
    assert Verdict.from_json("b", v("a").to_json()).observer == "b"  # filed under b: b's


def test_unknown_fields_are_ignored():
    raw = json.dumps({**json.loads(v("a").to_json()), "since": 12.5}).encode()
    assert Verdict.from_json("a", raw) == v("a")


def test_constructor_refuses_what_peers_would_refuse():
    with pytest.raises(ValueError, match="state"):
        v("a", "maintenance")
    with pytest.raises(ValueError, match="reason"):
        v("a", reason="x" * 201)
    with pytest.raises(ValueError, match="duties"):
        v("a", duties=("x" * 201,))
    with pytest.raises(ValueError, match="duties"):
        v("a", duties=("x",) * 1001)
    with pytest.raises(ValueError, match="observer"):
        v("")
    with pytest.raises(ValueError, match="verdict"):
        v("a", duties=tuple(f"duty-{i}" for i in range(1000))).to_json()


GOOD = {"active": True, "duties": ["writer"], "reason": "ok", "state": "healthy", "up": True}


def dumped(**changes) -> bytes:
    doc = {k: val for k, val in {**GOOD, **changes}.items() if val is not ...}
    return json.dumps(doc, separators=(",", ":")).encode()


@pytest.mark.parametrize(("raw", "field"), [
    (dumped(state=...), "state"),
    (dumped(up=...), "up"),
    (dumped(active=...), "active"),
    (dumped(duties=...), "duties"),
    (dumped(reason=...), "reason"),
    (dumped(state="unknown"), "state"),
    (dumped(state="maintenance"), "state"),
    (dumped(state=1), "state"),
    (dumped(state=None), "state"),
    (dumped(up=1), "up"),
    (dumped(up=None), "up"),
    (dumped(up="true"), "up"),
    (dumped(active=0), "active"),
    (dumped(active="yes"), "active"),
    (dumped(duties="writer"), "duties"),
    (dumped(duties={"writer": 1}), "duties"),
    (dumped(duties=[1]), "duties"),
    (dumped(duties=[None]), "duties"),
    (dumped(duties=["x" * 201]), "duties"),
    (dumped(duties=[""] * 1001), "duties"),
    (dumped(reason=None), "reason"),
    (dumped(reason=["ok"]), "reason"),
    (dumped(reason="x" * 201), "reason"),
    (b"[]", "verdict: not a JSON object"),
    (b"null", "verdict: not a JSON object"),
    (b'"healthy"', "verdict: not a JSON object"),
    (b"", "verdict: not JSON"),
    (b"{", "verdict: not JSON"),
    (b"{'state': 'healthy'}", "verdict: not JSON"),
    (b"[" * 2000 + b"]" * 2000, "verdict: not JSON"),
    (b'{"reason": "\xff"}', "verdict: not UTF-8"),
    (b" " * (MAX_BYTES + 1), "verdict: 4097 bytes"),
    (dumped(reason="x" * MAX_BYTES), "verdict"),
])
def test_from_json_rejects_malformed_naming_the_field(raw, field):
    with pytest.raises(ValueError, match=field):
        Verdict.from_json("a", raw)


def test_from_json_accepts_the_edges():
    edge = dumped(active=None, duties=None, reason="x" * 200)
    assert Verdict.from_json("a", edge) == v("a", active=None, duties=None, reason="x" * 200)
    assert Verdict.from_json("a", dumped(duties=["x" * 200] * 10)).duties == ("x" * 200,) * 10
    assert Verdict.from_json("a", dumped(duties=["x"] * 1000)).duties == ("x",) * 1000


@pytest.mark.parametrize(("last", "queue", "published"), [
    (None, None, None), (5, None, None), (None, float("nan"), None), (None, 7.9, 7),
    (None, -3, 0), (0, 9, 0), (0, 16, 0), (0, 17, 17),  # wobbles under the slack: no change
    (17, 50, 17), (17, 51, 51), (51, 18, 51), (51, 17, 17),  # doubled or halved (+16): new
    (1000, 1900, 1000), (1000, 2017, 2017), (1000, 492, 1000), (1000, 491, 491),
    (None, 1e20, 1 << 40),
])
def test_a_queue_is_republished_only_when_it_doubles_or_halves(
    last: int | None, queue: float | None, published: int | None,
) -> None:
    assert published_queue(last, queue) == published


@pytest.mark.parametrize("bad", ["-1", "1.5", "true", '"8"', str((1 << 40) + 1)])
def test_a_verdicts_queue_must_be_a_bounded_integer(bad: str) -> None:
    def raw(queue: str) -> bytes:
        return ('{"active": true, "duties": null, "queue": ' + queue
                + ', "reason": "", "state": "healthy", "up": true}').encode()
    with pytest.raises(ValueError, match=r"^queue:"):
        Verdict.from_json("o", raw(bad))
    assert Verdict.from_json("o", raw("64")).queue == 64
