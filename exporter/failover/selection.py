"""Backup selection: which master takes over a failed one's duties, and why not the others.

Pure and single-pass so that it is cheap at 10,000 masters and testable without a network.
Rules, in order: eligible at all (not the failed master, ``failover: never`` not set, not in
maintenance, healthy — degraded is passed over —, not mid-takeover, in an allowed region), then
standby before active, region, lower priority number, least load (queue length; unknown counts
as 0), name (so the choice is deterministic).

Region ranks before priority: a backup in the failed master's region keeps its producers'
latency and data residency, which is what an operator expects of "a same-region backup"; a
priority number orders masters within a region, it does not send a duty abroad while a healthy
standby is free at home. The failed master's ``failover_regions``, when set, says otherwise: its
regions are then preferred in the order listed (and no other region is eligible).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from exporter.failover.records import CandidateEntry
from exporter.fleet import MasterRuntime, State


@dataclass(slots=True)
class Ranking:
    """Ordered eligible backups plus an explanation for every master considered."""

    order: list[MasterRuntime]
    candidates: list[CandidateEntry] = field(default_factory=list)
    _by_name: dict[str, CandidateEntry] = field(default_factory=dict, repr=False)

    def note(self, name: str, outcome: str) -> None:
        """Record what happened to a candidate when it was tried (or not)."""
        if len(self._by_name) != len(self.candidates):
            self._by_name = {c["name"]: c for c in self.candidates}
        entry = self._by_name.get(name)
        if entry is not None:
            entry["outcome"] = outcome


def _passed_over(rt: MasterRuntime, failed: str, busy: Mapping[str, str],
                 allowed_regions: Sequence[str] | None) -> str | None:
    name = rt.name
    if name == failed:
        return "is the master being failed away from"
    if rt.config.failover == "never":
        return "excluded by config (failover: never)"
    state = rt.health.state
    if state is State.MAINTENANCE:
        return "in maintenance"
    if name in busy:
        return f"mid-takeover ({busy[name]})"
    if state is not State.HEALTHY:
        return f"not healthy ({state})"
    if allowed_regions and rt.config.region not in allowed_regions:
        return f"region {rt.config.region} not allowed (allowed: {', '.join(allowed_regions)})"
    return None


def region_order(region: str, allowed_regions: Sequence[str] | None) -> Callable[[str], int]:
    """The rank of a backup's region (lower is preferred): the order of ``allowed_regions``
    when given, else the failed master's ``region`` first and every other one after it."""
    if allowed_regions:
        order = {r: i for i, r in reversed(list(enumerate(allowed_regions)))}
        return lambda r: order.get(r, len(order))
    return lambda r: 0 if r == region else 1


def rank(failed: MasterRuntime, fleet: Iterable[MasterRuntime], role_of: Callable[[str], str],
         *, busy: Mapping[str, str] | None = None,
         allowed_regions: Sequence[str] | None = None, explain: bool = True) -> Ranking:
    """Rank every master as a backup for ``failed``; ``role_of`` gives each master's current
    role, ``busy`` maps names to why they are mid-takeover, ``allowed_regions`` is the failed
    master's ``failover_regions``. ``explain=False`` skips the per-master explanations (for hot
    paths)."""
    busy = busy or {}
    region = failed.config.region
    region_rank = region_order(region, allowed_regions)
    eligible: list[tuple[tuple[int, int, int, float, str], MasterRuntime]] = []
    candidates: list[CandidateEntry] = []
    by_name: dict[str, CandidateEntry] = {}
    for rt in fleet:
        reason = _passed_over(rt, failed.name, busy, allowed_regions)
        role = role_of(rt.name)
        if reason is None:
            cfg = rt.config
            load = float(rt.queue_length or 0.0)
            key = (0 if role == "standby" else 1, region_rank(cfg.region), cfg.priority, load,
                   cfg.name)
            eligible.append((key, rt))
        if explain and rt.name != failed.name:
            entry: CandidateEntry = {"name": rt.name, "role": role, "priority": rt.config.priority,
                                     "region": rt.config.region,
                                     "state": str(rt.health.state),
                                     "queue_length": rt.queue_length, "eligible": reason is None,
                                     "rank": None, "reason": reason}
            candidates.append(entry)
            by_name[rt.name] = entry
    eligible.sort(key=lambda item: item[0])
    order = [rt for _, rt in eligible]
    if explain:
        best = order[0] if order else None
        for i, rt in enumerate(order):
            entry = by_name[rt.name]
            entry["rank"] = i + 1
            entry["reason"] = ("best candidate" if rt is best
                               else _behind(rt, best, region, role_of, region_rank,
                                            bool(allowed_regions)))
        candidates.sort(key=lambda e: (e["rank"] is None, e["rank"] or 0, e["name"]))
    return Ranking(order=order, candidates=candidates, _by_name=by_name)


def _behind(rt: MasterRuntime, best: MasterRuntime | None, region: str,
            role_of: Callable[[str], str], region_rank: Callable[[str], int],
            listed: bool) -> str:
    """Why an eligible master ranks below the best one: the first rule that separates them."""
    if best is None:
        return ""
    role = role_of(rt.name)
    if role != role_of(best.name):
        return f"{role}, ranked after standby {best.name}"
    if region_rank(rt.config.region) != region_rank(best.config.region):
        if listed:
            return (f"region {rt.config.region} comes after {best.config.region} of "
                    f"{best.name} in failover_regions")
        return f"region {rt.config.region}, {best.name} is in the failed master's region {region}"
    if rt.config.priority != best.config.priority:
        return f"priority {rt.config.priority} > {best.config.priority} of {best.name}"
    if (rt.queue_length or 0) != (best.queue_length or 0):
        return f"queue {rt.queue_length or 0:g} > {best.queue_length or 0:g} of {best.name}"
    return f"tie, {best.name} sorts first by name"
