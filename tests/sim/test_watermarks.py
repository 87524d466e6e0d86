"""The simulated master's watermarks (docs/protocol.md, "Watermarks"): every accepted message
gets the next sequence number, a snapshot's watermark says exactly which messages it covers, an
import keeps the source's watermark and reports it in /health, and a message pending in an
import is not taken twice."""

from __future__ import annotations

import aiohttp
import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.conformance.schemas import validator_root
from exporter.sim import SimulatedMaster, create_app
from exporter.sim.state import MAX_SEQ, snapshot_checksum, watermark_of
from tests.support import serve_app


def test_sequence_numbers_grow_by_one_and_a_duplicate_keeps_its_number():
    m = SimulatedMaster("m", drain_rate=0)
    assert (m.seq, m.health()["watermark"], m.snapshot()["watermark"]) == (0, 0, 0)
    assert [m.accept({"id": f"x{i}"}) for i in range(3)] == [True, True, True]
    assert [m.seq_of(f"x{i}") for i in range(3)] == [1, 2, 3]
    assert m.accept({"id": "x1"}) is False and m.seq_of("x1") == 2 and m.seq == 3
    assert m.accept({"id": 7}) is True and m.seq_of("7") == m.seq_of(7) == 4
    assert m.seq_of("never") is None and m.seq_of(None) is None
    m.seq = MAX_SEQ
    with pytest.raises(ValueError, match="exhausted"):
        m.accept({"id": "overflow"})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["accept", "step", "snapshot"]),
                          st.integers(0, 40)), max_size=40),
       st.sampled_from([0.0, 30.0]))
def test_a_snapshot_covers_exactly_the_messages_up_to_its_watermark(ops, drain_rate):
    """Covered: pending in the snapshot, or processed (drained) before it. With no draining
    the pending ids are exactly those numbered up to the watermark."""
    m = SimulatedMaster("m", drain_rate=drain_rate)
    processed: set[str] = set()
    numbers: dict[str, int] = {}
    n = 0
    for op, count in ops:
        if op == "accept":
            for _ in range(count):
                mid = f"id{n % 50}"  # repeats: duplicates keep their first number
                n += 1
                if m.accept({"id": mid}):
                    numbers[mid] = m.seq
                assert m.seq_of(mid) == numbers[mid]
        elif op == "step":
            before = [msg["id"] for msg in m.pending]
            done = m.step(count / 10)
            processed.update(before[:done])
        else:
            snap = m.snapshot()
            mark = snap["watermark"]
            pending = {msg["id"] for msg in snap["pending_messages"]}
            assert mark == len(numbers) == max(numbers.values(), default=0)
            assert {mid for mid, seq in numbers.items() if seq <= mark} == pending | processed
            assert all(numbers[mid] <= mark for mid in pending)
            if drain_rate == 0:
                assert pending == set(numbers)
    assert sorted(numbers.values()) == list(range(1, len(numbers) + 1))


def test_an_import_keeps_the_watermark_and_reports_it():
    a, b = SimulatedMaster("a", drain_rate=0), SimulatedMaster("b")
    for i in range(5):
        a.accept({"id": f"a{i}"})
    snap = a.snapshot()
    assert snap["watermark"] == 5
    b.import_snapshot(snap)
    assert b.snapshot()["imported"]["a"]["watermark"] == 5
    assert b.health()["imported_watermarks"] == {"a": 5}
    assert b.health()["watermark"] == 0  # its own counter is not the import's
    a.accept({"id": "a5"})
    b.import_snapshot(a.snapshot())  # a newer import replaces the older one
    assert b.imported_watermarks() == {"a": 6}
    assert b.drop_import("a") and b.imported_watermarks() == {}


def test_a_bad_watermark_is_kept_as_received_but_not_reported():
    b = SimulatedMaster("b")
    for bad in ("5", -1, MAX_SEQ + 1, True, 5.0, None):
        snap = {"master": "x", "sessions": {}, "pending_messages": [], "watermark": bad}
        snap["checksum"] = snapshot_checksum(snap)
        assert watermark_of(snap) is None
        b.import_snapshot(snap)
        assert b.imported["x"]["watermark"] == bad and b.imported_watermarks() == {}
    snap = {"master": "y", "sessions": {}, "pending_messages": []}  # a master without them
    b.import_snapshot({**snap, "checksum": snapshot_checksum(snap)})
    assert b.imported_watermarks() == {}


def test_a_message_pending_in_an_import_is_not_taken_again():
    a, c = SimulatedMaster("a", drain_rate=0), SimulatedMaster("c", drain_rate=0)
    for i in range(3):
        a.accept({"id": f"m{i}"})
    c.import_snapshot(a.snapshot())
    a.accept({"id": "m3"})  # after the snapshot: the backup lacks it
    assert c.accept({"id": "m1"}) is False and c.seq_of("m1") is None
    assert c.accept({"id": "m3"}) is True and c.seq_of("m3") == 1
    assert c.accepted == ["m3"]
    c.drop_import("a")
    assert c.accept({"id": "m1"}) is True  # nothing imported holds it any more


async def test_the_watermark_over_http_matches_the_published_schemas():
    a = SimulatedMaster("master-a", drain_rate=0)
    c = SimulatedMaster("master-c", role="standby")
    async with (
        serve_app(create_app(a)) as ua,
        serve_app(create_app(c)) as uc,
        aiohttp.ClientSession() as http,
    ):
        answers = []
        for mid in ("w1", "w2", "w1"):
            async with http.post(f"{ua}/messages", json={"id": mid}) as r:
                answers.append(await r.json())
        assert [(x["seq"], x["duplicate"]) for x in answers] == [(1, False), (2, False),
                                                                  (1, True)]
        async with http.get(f"{ua}/state") as r:
            snap = await r.json()
        assert snap["watermark"] == 2
        jsonschema.validate(snap, validator_root("Snapshot"))
        async with http.post(f"{uc}/state", json=snap) as r:
            assert r.status == 200
        async with http.post(f"{uc}/activate", json={"taken_over": "master-a"}) as r:
            assert r.status == 200
        async with http.get(f"{uc}/health") as r:
            health = await r.json()
        jsonschema.validate(health, validator_root("Health"))
        assert health["imported_watermarks"] == {"master-a": 2} and health["watermark"] == 0
        async with http.get(f"{uc}/state") as r:
            state = await r.json()
        assert state["imported"]["master-a"]["watermark"] == 2
        jsonschema.validate(state, validator_root("Snapshot"))
        async with http.post(f"{uc}/messages", json={"id": "w2"}) as r:  # a replay
            assert (r.status, await r.json()) == (
                200, {"accepted": True, "duplicate": True, "seq": None})
