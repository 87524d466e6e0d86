"""Which live replicas observe which master: rendezvous (highest random weight) hashing.

Every member scores every master with a hash of the pair and a master is observed by the ``n``
members scoring highest. Each replica computes the same answer from the membership alone, with
no coordination, and a membership change moves only the slots it must: a member that leaves
frees exactly its slots (each refilled by the next-highest scorer), a member that joins takes
only slots it now wins. Pure: no I/O, so the cluster code and the tests share one answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def score(member: str, master: str) -> int:
    """The pair's weight: the first 8 bytes of SHA-256 over ``member NUL master``, big-endian.

    SHA-256 rather than ``hash()`` so that every replica, whatever its PYTHONHASHSEED or
    version, ranks members alike; the NUL keeps ``("a", "bc")`` and ``("ab", "c")`` apart."""
    digest = hashlib.sha256(member.encode() + b"\x00" + master.encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _ranked(master: str, members: Iterable[str]) -> list[str]:
    """Members highest score first; equal scores by name so that the order is total."""
    return sorted(set(members), key=lambda member: (-score(member, master), member))


def observers_of(master: str, members: Iterable[str], n: int) -> tuple[str, ...]:
    """The ``n`` members (fewer if there are fewer) that observe ``master``, highest first."""
    if n < 1:
        raise ValueError(f"n: {n} observers is fewer than 1")
    return tuple(_ranked(master, members)[:n])


class Shards:
    """The assignment of every master for one membership, fixed at construction.

    ``per_master`` is the effective number of observers per master: the configured count
    capped by the number of members (0 with no members, when no master is observed)."""

    __slots__ = ("_by_master", "_by_member", "masters", "members", "per_master")

    def __init__(self, members: Iterable[str], masters: Iterable[str], observers: int) -> None:
        if observers < 1:
            raise ValueError(f"observers: {observers} is fewer than 1")
        self.members: tuple[str, ...] = tuple(sorted(set(members)))
        self.masters: tuple[str, ...] = tuple(dict.fromkeys(masters))
        self.per_master: int = min(observers, len(self.members))
        self._by_master: dict[str, tuple[str, ...]] = {
            master: self._assign(master) for master in self.masters
        }
        by_member: dict[str, list[str]] = {member: [] for member in self.members}
        for master, chosen in self._by_master.items():
            for member in chosen:
                by_member[member].append(master)
        self._by_member = {member: tuple(owned) for member, owned in by_member.items()}

    def _assign(self, master: str) -> tuple[str, ...]:
        if not self.per_master:
            return ()
        return observers_of(master, self.members, self.per_master)

    def observers(self, master: str) -> tuple[str, ...]:
        """The members observing ``master``, highest score first (computed if not listed)."""
        known = self._by_master.get(master)
        return known if known is not None else self._assign(master)

    def shard(self, member: str) -> tuple[str, ...]:
        """The masters ``member`` observes, in the masters' given order; () for a non-member."""
        return self._by_member.get(member, ())

    def as_dict(self) -> dict[str, list[str]]:
        """Member -> the masters it observes, every member present (JSON-ready)."""
        return {member: list(owned) for member, owned in self._by_member.items()}

    def __repr__(self) -> str:
        return (f"Shards(members={self.members!r}, masters={len(self.masters)}, "
                f"per_master={self.per_master})")
