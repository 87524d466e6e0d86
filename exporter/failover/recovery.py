"""Crash recovery of failovers: close every move a crash left open, exactly once.

A mixin of FailoverManager (it uses the engine's steps, rollback and routing commit); apart so
that the engine reads on its own. The rule is in ``recover_journal``'s docstring.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from exporter.failover.moves import Aborted, Move, StepFailed
from exporter.failover.protocol import MasterCallError
from exporter.fleet import MasterRuntime

log = logging.getLogger(__name__)


class JournalRecovery:
    """Recovery half of FailoverManager; every attribute it uses is the manager's."""

    # --- crash recovery ----------------------------------------------------------------------
    async def recover_journal(self) -> list[dict[str, Any]]:
        """Close every move a crash left open, exactly once, deciding from the masters' own
        state, not from the journal alone:

        * routing was reached (journal) → complete: commit the routing the crash interrupted;
        * the backup's own GET /state holds the verified import (checksum from the journal),
          or no state was to be moved, and the source is no longer an active server (its
          /health does not answer, or answers ``active: false``) → roll forward: fence the
          source, activate the backup (idempotent), commit → success;
        * anything else → roll back the backup (fence or release, drop the import) and
          un-fence the source → rolled_back.

        Every action is idempotent and journalled first, so a crash during recovery is
        recovered the same way; the row is closed in one transaction with its final entry, so
        it is never recovered twice.
        """
        out = []
        for row in self.store.unfinished_failovers():
            try:
                out.append(await self._recover(row))
            except Exception:
                log.exception("recovery of failover #%s failed; closing it as failed",
                              row["id"])
                self.store.finish_failover(row["id"], "failed", None, time.time(), 0.0,
                                           row["steps"], row["candidates"],
                                           f"{row['reason']}; recovery crashed")
                self.stats.record(row["master"], "failed", None)
        return out

    async def _recover(self, row: dict[str, Any]) -> dict[str, Any]:
        fid, master = int(row["id"]), str(row["master"])
        entries = self.store.journal_entries(fid)
        plan = next((e["detail"] for e in entries if e["step"] == "plan"), {})
        kind = row.get("kind") or "failover"
        move = Move(fid, kind, master, plan.get("source") or master,
                     list(plan.get("duties") or [master]), row["trigger"], row["reason"],
                     "exporter", float(row["started"]),
                     time.monotonic() + self.config.failover.deadline)
        move.steps = [{"step": "recover", "status": "ok", "backup": None, "duration": 0.0,
                       "detail": {"journal": [f"{e['step']}:{e['status']}"
                                              + (f"@{e['backup']}" if e["backup"] else "")
                                              for e in entries]}}]
        self.store.journal(fid, "recover", "begin")
        log.warning("recovering interrupted %s #%d of %s", kind, fid, master,
                    extra={"event": "failover_recover", "failover_id": fid, "master": master})
        attempted: dict[str, dict[str, Any]] = {}  # backup -> what the journal says
        for e in entries:
            b = e["backup"]
            if not b or e["step"] not in ("import", "verify", "activate", "routing",
                                          "rollback"):
                continue
            info = attempted.setdefault(b, {"accept": None, "had": None, "routing": False,
                                            "rolled": False})
            if e["step"] == "import":
                info["accept"] = set(e["detail"].get("accept") or [])
            if "had" in e["detail"]:
                info["had"] = list(e["detail"]["had"])
            info["routing"] |= e["step"] == "routing"
            info["rolled"] |= e["step"] == "rollback" and e["status"] == "done"
        move.fenced = kind == "failover" and any(e["step"] == "fence" for e in entries)
        src = self.fleet.get(move.source)
        names = list(attempted)
        for b in names[:-1]:  # an earlier candidate whose rollback was cut short
            rt, info = self.fleet.get(b), attempted[b]
            if rt is not None and not info["rolled"]:
                await self._rollback(move, rt, info["accept"] is not None, info["had"] or [])
        last = names[-1] if names and not attempted[names[-1]]["rolled"] else None
        cand = self.fleet.get(last) if last else None
        if cand is not None:
            info = attempted[cand.name]
            outcome = await self._complete(move, cand, src, info) if src is not None else None
            if outcome is not None:
                return outcome
            await self._rollback(move, cand, info["accept"] is not None, info["had"] or [])
        if src is not None:
            await self._unfence(move, src)
        return self._finish(move, "rolled_back", "rolled back by journal recovery")

    async def _complete(self, move: Move, cand: MasterRuntime, src: MasterRuntime,
                        info: dict[str, Any]) -> dict[str, Any] | None:
        """Complete or roll forward an interrupted move if the masters' state allows it;
        None means: roll it back."""
        if info["routing"]:
            self._commit_routing(move, cand.name)
            move.backup = cand.name
            await self._settle_source(move, src)
            return self._finish(move, "success", "completed by journal recovery")
        imported = await self._imported_checksum(cand, move.source)
        state_ok = info["accept"] is None or imported in info["accept"]
        if not state_ok or await self._active_server(src, move.kind):
            return None
        try:
            if move.kind == "failover":
                await self._fence_now(move, src)
            for duty in move.duties:
                await self._step(move, "activate", cand.name,
                                 lambda tt, d=duty: self.client.activate(
                                     cand.name, cand.config.url,
                                     None if d == cand.name else d, timeout=tt),
                                 detail={"duty": duty, "had": info["had"]})
        except (StepFailed, Aborted) as exc:
            move.steps.append({"step": "recover", "status": "error", "backup": None,
                               "duration": 0.0, "detail": {"error": str(exc)}})
            return None
        self.store.journal(move.id, "routing", "begin", cand.name)
        self._commit_routing(move, cand.name)
        move.backup = cand.name
        if move.kind != "failover":
            await self._release(move, src)
        return self._finish(move, "success", "rolled forward by journal recovery")

    async def _settle_source(self, move: Move, src: MasterRuntime) -> None:
        """After a recovered move commits: a failed master is fenced (or queued), a graceful
        source is released."""
        if move.kind == "failover":
            await self._fence_now(move, src)
        else:
            await self._release(move, src)

    async def _fence_now(self, move: Move, src: MasterRuntime) -> None:
        await self._undo(src, "fence", None, move, [])

    async def _active_server(self, rt: MasterRuntime, kind: str) -> bool:
        """Whether the source still actively serves (a failover must not roll forward past a
        live, unfenced master). A graceful source is expected alive: it is released after."""
        if kind != "failover":
            return False
        try:
            h = await self.client.health(rt.name, rt.config.url, timeout=self._undo_timeout())
        except MasterCallError:
            return False
        return h.get("status") in ("ok", "degraded") and h.get("active") is not False

    async def _imported_checksum(self, rt: MasterRuntime, source: str) -> str | None:
        """The checksum of ``source``'s snapshot as imported, from the backup's own /state."""
        try:
            s = await self.client.state_json(rt.name, rt.config.url,
                                             timeout=self.config.failover.step_timeout)
        except MasterCallError:
            return None
        entry = (s.get("imported") or {}).get(source)
        return entry.get("checksum") if isinstance(entry, dict) else None
