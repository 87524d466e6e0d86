"""Failover records: closing a move into its stored record, and recording moves that did not
run (skipped by a cooldown, dry run). Every record also counts in the statistics and is logged;
a move that ran is audited and notified.

Result semantics (one result per move, so ``sum(rate(ha_failovers_total))`` is the move rate):

* ``success``          a candidate took over (earlier candidates may have been rolled back);
* ``failed``           no candidate succeeded (none eligible, all failed and were rolled back,
                       or a pre-hook vetoed); nothing is left half-active;
* ``rolled_back``      the move was interrupted from outside (deadline, shutdown, or a crash
                       found by crash recovery) and undone;
* ``skipped_cooldown`` a failure inside the per-master or fleet-wide cooldown; not executed;
* ``dry_run``          ``failover.dry_run``: the plan is recorded, nothing is changed.

Candidates rolled back within a move are counted apart, in ``FailoverStats.candidate_rollbacks``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

from exporter.failover.moves import Move
from exporter.failover.notify import Notifier
from exporter.failover.records import (
    CandidateEntry,
    FailoverRecord,
    PlannedStep,
    StepEntry,
    as_rows,
)
from exporter.failover.stats import FailoverStats
from exporter.store.sqlite import Store, StoreError

log = logging.getLogger(__name__)


class Ledger:
    """Writes failover records to the store, statistics and log."""

    def __init__(self, store: Store, stats: FailoverStats, notifier: Notifier) -> None:
        self.store = store
        self.stats = stats
        self.notifier = notifier

    def load(self, failover_id: int, fallback: FailoverRecord | None = None) -> FailoverRecord:
        """The stored record; ``fallback`` (the record as built in memory) if the store cannot
        be read now, so a move never fails on its own bookkeeping."""
        try:
            row = self.store.get_failover(failover_id)
        except StoreError:
            row = None
        if row is None:
            assert fallback is not None, f"failover #{failover_id} is not in the store"
            return fallback
        return cast(FailoverRecord, row)

    def finish(self, move: Move, result: str, why: str) -> FailoverRecord:
        """Close the move's row (and its journal) with ``result``; audit, count, notify."""
        duration = time.monotonic() - move.t0
        candidates = move.ranking.candidates if move.ranking else []
        finished, reason = time.time(), f"{move.reason}; {why}"
        self.store.finish_failover(move.id, result, move.backup, finished, duration,
                                   as_rows(move.steps), as_rows(candidates), reason)
        self.stats.record(move.master, result, duration)
        self.store.audit(move.actor, move.kind, move.master, {
            "failover_id": move.id, "result": result, "backup": move.backup, "why": why})
        log.log(logging.WARNING if result == "success" else logging.ERROR,
                "%s #%d of %s: %s in %.1f ms (%s)", move.kind, move.id, move.master, result,
                duration * 1000, why,
                extra={"event": "failover_result", "failover_id": move.id,
                       "master": move.master, "backup": move.backup, "result": result,
                       "duration_seconds": round(duration, 6)})
        record = self.load(move.id, {
            "id": move.id, "started": move.started, "finished": finished, "master": move.master,
            "backup": move.backup, "result": result, "trigger": move.trigger, "reason": reason,
            "duration": duration, "steps": list(move.steps), "candidates": list(candidates),
            "kind": move.kind})
        self.notifier.notify(record)
        return record

    def record_only(self, master: str, result: str, trigger: str, reason: str, *,
                    backup: str | None = None, steps: list[PlannedStep] | None = None,
                    candidates: list[CandidateEntry] | None = None, kind: str = "failover",
                    duration: float = 0.0) -> FailoverRecord:
        """A move that did not run: one closed row, counted without a duration."""
        started = time.time()
        fid = self.store.record_failover(master, result, trigger, reason, started, backup,
                                         duration, as_rows(steps or []),
                                         as_rows(candidates or []), kind)
        self.stats.record(master, result, None)
        log.warning("failover of %s: %s (%s)", master, result, reason,
                    extra={"event": "failover_result", "master": master, "result": result,
                           "failover_id": fid, "backup": backup})
        return self.load(fid, {
            "id": fid, "started": started, "finished": started + duration, "master": master,
            "backup": backup, "result": result, "trigger": trigger, "reason": reason,
            "duration": duration, "steps": cast(list[StepEntry], list(steps or [])),
            "candidates": list(candidates or []), "kind": kind})

    def close_unrecoverable(self, row: dict[str, Any], why: str) -> None:
        """Close a row crash recovery could not handle as failed, so it is never retried."""
        self.store.finish_failover(row["id"], "failed", None, time.time(), 0.0, row["steps"],
                                   row["candidates"], f"{row['reason']}; {why}")
        self.stats.record(row["master"], "failed", None)
