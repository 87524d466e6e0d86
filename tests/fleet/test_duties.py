"""Duties as the masters report them: only an answering, active master serves anything."""

from __future__ import annotations

from exporter.config import MasterConfig, ProbeConfig
from exporter.fleet import Fleet, Outcome, Result, reported_holders


def fleet_of(*names: str) -> Fleet:
    return Fleet([MasterConfig(name=n, url=f"http://127.0.0.1:{9000 + i}")
                  for i, n in enumerate(names)], ProbeConfig(), 5)


def answer(fleet: Fleet, name: str, **payload: object) -> None:
    fleet.get(name).apply(Outcome(Result.SUCCESS, 0.01, payload={"status": "ok", **payload}), 1.0)


def test_holders_come_from_what_answering_active_masters_report():
    f = fleet_of("a", "b", "c", "d")
    answer(f, "a", active=True, duties=["a"])
    answer(f, "b", active=True, duties=["b", "a"])  # two holders of a: a split brain
    answer(f, "c", active=False, duties=["c"])  # inactive: serves nothing whatever it lists
    answer(f, "d", active=True, duties=["d", "unknown"])
    assert reported_holders(f, ["a", "b", "c"]) == {"a": ("a", "b"), "b": ("b",), "c": ()}


def test_a_master_that_stops_answering_serves_nothing():
    f = fleet_of("a")
    answer(f, "a", active=True, duties=["a"])
    assert reported_holders(f, ["a"]) == {"a": ("a",)}
    f.get("a").apply(Outcome(Result.CONNECT_ERROR, 0.01, detail="refused"), 2.0)
    assert reported_holders(f, ["a"]) == {"a": ()}
