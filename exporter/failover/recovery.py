"""Crash recovery of moves: close every move a crash left open, exactly once.

The decision is taken from the masters' own state, not from the journal alone:

* routing was reached (journal) → complete: commit the routing the crash interrupted;
* the backup's own GET /state holds the verified import (checksum from the journal), or no
  state was to be moved, and the source is no longer an active server (its /health does not
  answer, or answers ``active: false``) → roll forward: fence the source, activate the backup
  (idempotent), commit → success;
* anything else → roll back the backup (fence or release, drop the import) and un-fence the
  source → rolled_back.

Every action is idempotent and journalled first, so a crash during recovery is recovered the
same way; the row is closed in one transaction with its final entry, so it is never recovered
twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exporter.config import FailoverConfig
from exporter.failover.engine import MoveEngine
from exporter.failover.ledger import Ledger
from exporter.failover.moves import Interrupted, Move, StepFailed
from exporter.failover.protocol import MasterCallError, MasterClient
from exporter.failover.records import FailoverRecord
from exporter.failover.stats import STATE_SOURCES, StateSource
from exporter.failover.undo import Undoer
from exporter.fleet import Fleet, MasterRuntime
from exporter.store.sqlite import Store

log = logging.getLogger(__name__)

UNDOABLE = ("import", "verify", "activate", "routing", "rollback")


@dataclass
class Attempt:
    """What the journal says of one candidate of an interrupted move."""

    accept: set[str] | None = None  # checksums a faithful import shows; None: no import
    had: list[str] | None = None  # the duties it held before the move
    routing: bool = False  # the routing commit began
    rolled: bool = False  # its rollback completed

    @property
    def imported(self) -> bool:
        return self.accept is not None


def read_attempts(entries: list[dict[str, Any]]) -> dict[str, Attempt]:
    """Every candidate the journal names, in the order they were tried."""
    attempts: dict[str, Attempt] = {}
    for e in entries:
        backup = e["backup"]
        if not backup or e["step"] not in UNDOABLE:
            continue
        info = attempts.setdefault(backup, Attempt())
        if e["step"] == "import":
            info.accept = set(e["detail"].get("accept") or [])
        if "had" in e["detail"]:
            info.had = list(e["detail"]["had"])
        info.routing |= e["step"] == "routing"
        info.rolled |= e["step"] == "rollback" and e["status"] == "done"
    return attempts


def state_source(entries: list[dict[str, Any]]) -> StateSource | None:
    """Where the move's state came from, as its fetch step journalled it (None: not fetched)."""
    for e in entries:
        found = e["detail"].get("source") if e["step"] == "fetch" else None
        for known in STATE_SOURCES:
            if found == known:
                return known
    return None


class CrashRecovery:
    """Recovers the moves the store says are open, with the engine's own steps."""

    def __init__(self, engine: MoveEngine, undo: Undoer, ledger: Ledger, client: MasterClient,
                 store: Store, fleet: Fleet, settings: Callable[[], FailoverConfig]) -> None:
        self.engine = engine
        self.undo = undo
        self.ledger = ledger
        self.client = client
        self.store = store
        self.fleet = fleet
        self.settings = settings

    async def recover_all(self) -> list[FailoverRecord]:
        """Close every open move; one whose recovery crashes is closed as failed."""
        out = []
        for row in self.store.unfinished_failovers():
            if self.engine.is_running(str(row["master"])):
                continue  # still running here (a cluster leader that lost and regained the lead)
            try:
                out.append(await self._recover(row))
            except Exception:
                log.exception("recovery of failover #%s failed; closing it as failed",
                              row["id"])
                self.ledger.close_unrecoverable(row, "recovery crashed")
        return out

    async def _recover(self, row: dict[str, Any]) -> FailoverRecord:
        fid, master = int(row["id"]), str(row["master"])
        entries = self.store.journal_entries(fid)
        plan: dict[str, Any] = next((e["detail"] for e in entries if e["step"] == "plan"), {})
        kind = row.get("kind") or "failover"
        move = Move(fid, kind, master, plan.get("source") or master,
                    list(plan.get("duties") or [master]), row["trigger"], row["reason"],
                    "exporter", float(row["started"]),
                    time.monotonic() + self.settings().deadline)
        journal = [f"{e['step']}:{e['status']}" + (f"@{e['backup']}" if e["backup"] else "")
                   for e in entries]
        move.steps = [{"step": "recover", "status": "ok", "backup": None, "duration": 0.0,
                       "detail": {"journal": journal}}]
        self.store.journal(fid, "recover", "begin")
        log.warning("recovering interrupted %s #%d of %s", kind, fid, master,
                    extra={"event": "failover_recover", "failover_id": fid, "master": master})
        attempts = read_attempts(entries)
        source = state_source(entries)
        if source is not None:  # the result is counted under the state the move carried
            self.ledger.stats.state_moved(master, source)
        move.fenced = kind == "failover" and any(e["step"] == "fence" for e in entries)
        src = self.fleet.get(move.source)
        names = list(attempts)
        for name in names[:-1]:  # an earlier candidate whose rollback was cut short
            rt, info = self.fleet.get(name), attempts[name]
            if rt is not None and not info.rolled:
                await self.undo.rollback(move, rt, info.imported, info.had or [])
        last = names[-1] if names and not attempts[names[-1]].rolled else None
        cand = self.fleet.get(last) if last else None
        if cand is not None:
            info = attempts[cand.name]
            outcome = await self._complete(move, cand, src, info) if src is not None else None
            if outcome is not None:
                return outcome
            await self.undo.rollback(move, cand, info.imported, info.had or [])
        if src is not None:
            await self.undo.unfence(move, src)
        return self.ledger.finish(move, "rolled_back", "rolled back by journal recovery")

    async def _complete(self, move: Move, cand: MasterRuntime, src: MasterRuntime,
                        info: Attempt) -> FailoverRecord | None:
        """Complete or roll forward the move if the masters' state allows it; None means:
        roll it back."""
        if info.routing:
            self.engine.commit_routing(move, cand.name)
            move.backup = cand.name
            await self._settle_source(move, src)
            return self.ledger.finish(move, "success", "completed by journal recovery")
        imported = await self._imported_checksum(cand, move.source)
        state_ok = info.accept is None or imported in info.accept
        if not state_ok or await self._active_server(move, src):
            return None
        try:
            if move.kind == "failover":
                await self.undo.undo(src, "fence", None, [], move)
            await self.engine.activate(move, cand, info.had)
        except (StepFailed, Interrupted) as exc:
            move.steps.append({"step": "recover", "status": "error", "backup": None,
                               "duration": 0.0, "detail": {"error": str(exc)}})
            return None
        self.store.journal(move.id, "routing", "begin", cand.name)
        self.engine.commit_routing(move, cand.name)
        move.backup = cand.name
        if move.kind != "failover":
            await self.undo.release(move, src)
        return self.ledger.finish(move, "success", "rolled forward by journal recovery")

    async def _settle_source(self, move: Move, src: MasterRuntime) -> None:
        """After a recovered move commits: a failed master is fenced (or queued), a graceful
        source is released."""
        if move.kind == "failover":
            await self.undo.undo(src, "fence", None, [], move)
        else:
            await self.undo.release(move, src)

    async def _active_server(self, move: Move, rt: MasterRuntime) -> bool:
        """Whether the source still actively serves (a failover must not roll forward past a
        live, unfenced master). A graceful source is expected alive: it is released after."""
        if move.kind != "failover":
            return False
        try:
            h = await self.client.health(rt.name, rt.config.url, timeout=self.undo.timeout(move))
        except MasterCallError:
            return False
        return h.get("status") in ("ok", "degraded") and h.get("active") is not False

    async def _imported_checksum(self, rt: MasterRuntime, source: str) -> str | None:
        """The checksum of ``source``'s snapshot as imported, from the backup's own /state."""
        try:
            s = await self.client.state_json(rt.name, rt.config.url,
                                             timeout=self.settings().step_timeout)
        except MasterCallError:
            return None
        entry = (s.get("imported") or {}).get(source)
        return entry.get("checksum") if isinstance(entry, dict) else None
