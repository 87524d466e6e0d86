"""Backup selection: which master takes over a failed one's duties, and why not the others.

Pure and single-pass so that it is cheap at 10,000 masters and testable without a network.
Rules, in order: eligible at all (not the failed master, ``failover: never`` not set, not in
maintenance, healthy — degraded is passed over —, not mid-takeover, in an allowed region), then
standby before active, lower priority number, same region as the failed master, least load
(queue length; unknown counts as 0), name (so the choice is deterministic).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
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
                 allowed_regions: Collection[str] | None) -> str | None:
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


def rank(failed: MasterRuntime, fleet: Iterable[MasterRuntime], role_of: Callable[[str], str],
         *, busy: Mapping[str, str] | None = None,
         allowed_regions: Collection[str] | None = None, explain: bool = True) -> Ranking:
    """Rank every master as a backup for ``failed``; ``role_of`` gives each master's current
    role, ``busy`` maps names to why they are mid-takeover. ``explain=False`` skips the
    per-master explanations (for hot paths)."""
    busy = busy or {}
    region = failed.config.region
    eligible: list[tuple[tuple[int, int, int, float, str], MasterRuntime]] = []
    candidates: list[CandidateEntry] = []
    by_name: dict[str, CandidateEntry] = {}
    for rt in fleet:
        reason = _passed_over(rt, failed.name, busy, allowed_regions)
        role = role_of(rt.name)
        if reason is None:
            cfg = rt.config
            load = float(rt.queue_length or 0.0)
            key = (0 if role == "standby" else 1, cfg.priority,
                   0 if cfg.region == region else 1, load, cfg.name)
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
                               else _behind(rt, best, region, role_of))
        candidates.sort(key=lambda e: (e["rank"] is None, e["rank"] or 0, e["name"]))
    return Ranking(order=order, candidates=candidates, _by_name=by_name)


def _behind(rt: MasterRuntime, best: MasterRuntime | None, region: str,
            role_of: Callable[[str], str]) -> str:
    """Why an eligible master ranks below the best one: the first rule that separates them."""
    if best is None:
        return ""
    role = role_of(rt.name)
    if role != role_of(best.name):
        return f"{role}, ranked after standby {best.name}"
    if rt.config.priority != best.config.priority:
        return f"priority {rt.config.priority} > {best.config.priority} of {best.name}"
    if (rt.config.region == region) != (best.config.region == region):
        return f"region {rt.config.region}, {best.name} is in the failed master's region"
    if (rt.queue_length or 0) != (best.queue_length or 0):
        return f"queue {rt.queue_length or 0:g} > {best.queue_length or 0:g} of {best.name}"
    return f"tie, {best.name} sorts first by name"
