"""The event bus: typed delivery, order, and isolation of a failing handler."""

from __future__ import annotations

from exporter.fleet import EventBus, RoleChanged, Sample, State, Transition


async def test_bus_delivers_to_every_subscriber_even_if_one_fails():
    bus = EventBus()
    got: list[str] = []

    def broken(t: Transition) -> None:
        raise RuntimeError("boom")

    async def slow(t: Transition) -> None:
        got.append("async:" + t.master)

    bus.subscribe(Transition, broken)
    bus.subscribe(Transition, lambda t: got.append("sync:" + t.master))
    bus.subscribe(Transition, slow)
    bus.publish(Transition("m1", State.HEALTHY, State.FAILED, "probe", 0.0))
    await bus.drain()
    assert got == ["sync:m1", "async:m1"]


def test_each_event_reaches_only_the_handlers_of_its_kind():
    bus = EventBus()
    got: list[object] = []
    bus.subscribe(Sample, got.append)
    bus.subscribe(RoleChanged, lambda e: got.append(("role", e.master, e.new)))
    bus.publish(Transition("m1", State.HEALTHY, State.FAILED, "probe", 0.0))  # nobody listens
    sample = Sample("m1", True, State.HEALTHY, 3.0)
    bus.publish(sample)
    bus.publish(RoleChanged("m2", "standby", "active"))
    assert got == [sample, ("role", "m2", "active")]
