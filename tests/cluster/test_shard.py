"""Rendezvous sharding: known answers computed outside Python, and the properties that make
membership changes cheap (only the slots that must move do)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.cluster.shard import Shards, observers_of, score

MEMBERS = ("exporter-1", "exporter-2", "exporter-3")

# Computed with the shell, not hashlib:
#   printf 'exporter-1\0master-a' | sha256sum | cut -c1-16      -> 668d3f6e8a632a87
#   echo 'ibase=16; 668D3F6E8A632A87' | bc                      -> 7389632307585559175
VECTORS = {
    ("exporter-1", "master-a"): 7389632307585559175,  # 668d3f6e8a632a87
    ("exporter-2", "master-a"): 17290095043473734233,  # eff2c1d5cefe7a59
    ("exporter-3", "master-a"): 12068399339478000478,  # a77b91421525235e
    ("exporter-1", "master-b"): 13102962808463674762,  # b5d7134077a1cd8a
    ("exporter-2", "master-b"): 141100682927165905,  # 01f54a52d37051d1
    ("exporter-3", "master-b"): 1610875336680850253,  # 165afa957c4cc34d
    ("exporter-1", "master-d"): 8903794341417269831,  # 7b90a1c7794f3a47
    ("exporter-2", "master-d"): 12347345058296878011,  # ab5a94e956f5d3bb
    ("exporter-3", "master-d"): 2052510323914338780,  # 1c7bfb43d2bc71dc
}


@pytest.mark.parametrize(("pair", "expected"), VECTORS.items())
def test_score_matches_sha256sum(pair, expected):
    assert score(*pair) == expected


# Derived from VECTORS, highest score first:
#   master-a: exporter-2 (1.729e19) > exporter-3 (1.207e19) > exporter-1 (0.739e19)
#   master-b: exporter-1 (1.310e19) > exporter-3 (0.161e19) > exporter-2 (0.014e19)
#   master-d: exporter-2 (1.235e19) > exporter-1 (0.890e19) > exporter-3 (0.205e19)
KNOWN = {
    ("master-a", 1): ("exporter-2",),
    ("master-a", 2): ("exporter-2", "exporter-3"),
    ("master-b", 1): ("exporter-1",),
    ("master-b", 2): ("exporter-1", "exporter-3"),
    ("master-d", 1): ("exporter-2",),
    ("master-d", 2): ("exporter-2", "exporter-1"),
}


@pytest.mark.parametrize(("case", "expected"), KNOWN.items())
def test_known_observers(case, expected):
    master, n = case
    assert observers_of(master, MEMBERS, n) == expected
    assert observers_of(master, reversed(MEMBERS), n) == expected  # membership order is moot
    assert Shards(MEMBERS, ["master-a", "master-b", "master-d"], n).observers(master) == expected


def test_known_shards():
    masters = ["master-d", "master-b", "master-a"]  # given order is kept in each shard
    one = Shards(MEMBERS, masters, 1)
    assert one.as_dict() == {
        "exporter-1": ["master-b"],
        "exporter-2": ["master-d", "master-a"],
        "exporter-3": [],
    }
    two = Shards(MEMBERS, masters, 2)
    assert two.shard("exporter-1") == ("master-d", "master-b")
    assert two.shard("exporter-2") == ("master-d", "master-a")
    assert two.shard("exporter-3") == ("master-b", "master-a")
    assert two.shard("exporter-9") == ()


def test_n_is_capped_and_must_be_positive():
    assert observers_of("master-a", MEMBERS, 10) == ("exporter-2", "exporter-3", "exporter-1")
    assert observers_of("master-a", [*MEMBERS, "exporter-1"], 3) == observers_of(
        "master-a", MEMBERS, 3)
    for n in (0, -1):
        with pytest.raises(ValueError, match="n:"):
            observers_of("master-a", MEMBERS, n)
        with pytest.raises(ValueError, match="observers:"):
            Shards(MEMBERS, ["master-a"], n)


def test_membership_is_sorted_deduplicated_and_caps_observers():
    s = Shards(["exporter-3", "exporter-1", "exporter-3"], ["m1", "m2", "m1"], 5)
    assert s.members == ("exporter-1", "exporter-3")
    assert s.masters == ("m1", "m2")
    assert s.per_master == 2
    assert all(len(s.observers(m)) == 2 for m in s.masters)


def test_no_members_means_no_observers():
    s = Shards([], ["m1", "m2"], 2)
    assert s.per_master == 0
    assert s.observers("m1") == () and s.observers("unlisted") == ()
    assert s.shard("exporter-1") == ()
    assert s.as_dict() == {}
    assert observers_of("m1", [], 2) == ()


def test_ties_break_by_member_name(monkeypatch):
    import exporter.cluster.shard as shard

    monkeypatch.setattr(shard, "score", lambda member, master: 7)
    assert shard.observers_of("m", ["c", "a", "b"], 2) == ("a", "b")


def test_spread_over_three_members():
    """3 members, 3,000 masters, 2 observers each: 6,000 slots.

    Each master's 2-of-3 set is, for a hash indistinguishable from random, uniform, so each
    member's slot count is Binomial(3000, 2/3): mean 2,000 (33.3%), sd sqrt(3000*2/3*1/3) =
    25.8 slots (0.43%). The bound checked, 25%..42% (1,500..2,520 slots), lies 19 sd from the
    mean; the tighter one, 2,000 +/- 5 sd (130 slots), still holds with margin to spare."""
    masters = [f"master-{i}" for i in range(3000)]
    s = Shards(MEMBERS, masters, 2)
    counts = {m: len(s.shard(m)) for m in MEMBERS}
    assert sum(counts.values()) == 6000
    for member, count in counts.items():
        assert 0.25 * 6000 <= count <= 0.42 * 6000, (member, count)
        assert abs(count - 2000) <= 130, (member, count)
    for master in masters:
        assert len(set(s.observers(master))) == 2


members_st = st.lists(
    st.text(alphabet="abcdefgh-0123456789", min_size=1, max_size=8), min_size=1, max_size=7,
    unique=True)
masters_st = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=40, unique=True)
n_st = st.integers(min_value=1, max_value=5)


@settings(max_examples=200, deadline=None)
@given(members_st, masters_st, n_st)
def test_each_master_has_min_n_members_distinct_observers(members, masters, n):
    s = Shards(members, masters, n)
    for master in masters:
        chosen = s.observers(master)
        assert len(chosen) == len(set(chosen)) == min(n, len(members))
        assert set(chosen) <= set(members)
        assert all(master in s.shard(member) for member in chosen)
    assert sum(len(v) for v in s.as_dict().values()) == len(masters) * min(n, len(members))


@settings(max_examples=200, deadline=None)
@given(members_st, masters_st, n_st, st.data())
def test_removing_a_member_moves_only_its_masters(members, masters, n, data):
    gone = data.draw(st.sampled_from(members))
    before = Shards(members, masters, n)
    after = Shards([m for m in members if m != gone], masters, n)
    for master in masters:
        old, new = before.observers(master), after.observers(master)
        if gone not in old:
            assert new == old  # untouched
        else:
            # The survivors keep their slots in rank order; the freed slot goes to the next
            # member in line, who was not observing it.
            kept = tuple(m for m in old if m != gone)
            assert new[: len(kept)] == kept
            assert not set(new[len(kept):]) & set(old)
    assert set(after.as_dict()) == set(members) - {gone}


@settings(max_examples=200, deadline=None)
@given(members_st, masters_st, n_st, st.text(alphabet="ijklmnop", min_size=1, max_size=8))
def test_adding_a_member_only_takes_slots(members, masters, n, newcomer):
    before = Shards(members, masters, n)
    after = Shards([*members, newcomer], masters, n)
    for master in masters:
        old, new = set(before.observers(master)), set(after.observers(master))
        # Old members only ever lose a master, to the newcomer; none gains one.
        assert new - {newcomer} <= old
        if newcomer not in new:
            assert new == old
        else:  # it took a free slot if there was one, else the lowest-ranked old observer's
            assert len(old - new) == (1 if len(old) == n else 0)
    for member in members:
        assert set(after.shard(member)) <= set(before.shard(member))
