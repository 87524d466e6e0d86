"""Reconcile to reality: the duty table checked against what the masters themselves serve.

The stored assignments are the exporter's belief; the masters' ``/health`` (``active``,
``duties``) is the truth. They drift apart when a master restarts from its own config, a holder
restarts without its duties, someone acts on a master behind the exporter's back, or a state
file outlives the fleet it described (the Quick start run twice in one directory). On start and
on every reconcile round each duty is made served exactly once (``policy.fix_duty``):

* served by one master that is not its believed holder: that master is adopted as holder;
* served by nobody: its holder is activated for it if it answers and is healthy, else its
  duties are failed over (by the manager, without waiting for a cooldown);
* served by several: the holder keeps it, the others stop serving it (``policy.must_fence``),
  and epochs make the calls of a controller that has been replaced fail.

A master's report counts only when it is *fresh*: from a probe sent after the exporter's last
activate or deactivate call to that master (``ControlMarks``). Until then the master is taken
to be as that call left it, which is what the duty table says. Nothing is judged before every
master has answered (or failed) a probe. Adopting corrects the exporter's own belief and is
always done; activating needs automatic failover on; stopping a second holder needs failover
enabled (a pause does not stop it: a split brain does harm every second it lasts); a dry run
calls no master.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiohttp

from exporter.failover.duties import DutyTable
from exporter.failover.engine import MoveEngine
from exporter.failover.policy import DutyFix, fix_duty, must_fence
from exporter.failover.protocol import MasterClient
from exporter.failover.undo import Undoer
from exporter.fleet import SERVING, Fleet, MasterRuntime, State, reported_holders
from exporter.store.sqlite import Store

log = logging.getLogger(__name__)

#: Holder states in which an unserved duty is failed over rather than waited for.
GONE = (State.FAILED, State.MAINTENANCE)
STARTUP_POLL = 0.1  # seconds between looks for the end of the first probe round


def probes(rt: MasterRuntime) -> int:
    """Probes of ``rt`` answered or failed so far (by this replica, or by the cluster
    member whose view it took)."""
    return sum(rt.result_counts) + rt.remote_views


class ControlMarks:
    """Per master, how many probes it had when the exporter's last activate or deactivate call
    to it ended. A probe in flight then may have been sent before the call landed; the one
    after it was not (a master is never probed twice at once), so a report is fresh from the
    second probe on. A master never called is fresh from its first probe."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._marks: dict[str, int] = {}

    def touch(self, name: str) -> None:
        rt = self.fleet.get(name)
        if rt is not None:
            self._marks[name] = probes(rt)

    def fresh(self, rt: MasterRuntime) -> bool:
        mark = self._marks.get(rt.name)
        return probes(rt) >= (1 if mark is None else mark + 2)


class WatchedClient(MasterClient):
    """The protocol client, telling ``on_control`` the master of every activate or deactivate
    call once it ends (landed, refused or timed out alike: it may have landed)."""

    def __init__(self, session: aiohttp.ClientSession, timeout: float, epoch: int | None,
                 on_control: Callable[[str], None]) -> None:
        super().__init__(session, timeout, epoch)
        self.on_control = on_control

    async def activate(self, who: str, base: str, taken_over: str | None,
                       timeout: float | None = None) -> dict[str, Any]:
        try:
            return await super().activate(who, base, taken_over, timeout)
        finally:
            self.on_control(who)

    async def deactivate(self, who: str, base: str, taken_over: str | None = None,
                         timeout: float | None = None) -> dict[str, Any]:
        try:
            return await super().deactivate(who, base, taken_over, timeout)
        finally:
            self.on_control(who)


class RealityCheck:
    """Makes every duty served exactly once; see the module docstring."""

    def __init__(self, fleet: Fleet, duties: DutyTable, store: Store, engine: MoveEngine,
                 undo: Undoer, marks: ControlMarks) -> None:
        self.fleet = fleet
        self.duties = duties
        self.store = store
        self.engine = engine
        self.undo = undo
        self.marks = marks
        self._noted: dict[str, str] = {}  # duty -> the last failure logged for it

    def all_duties(self) -> list[str]:
        """One duty per master configured ``role: active``, named after it."""
        return [rt.name for rt in self.fleet if rt.config.role == "active"]

    def complete(self) -> bool:
        """Whether every master has answered or failed a probe: before that nothing is judged."""
        return all(probes(rt) > 0 for rt in self.fleet)

    async def wait_complete(self, timeout: float) -> None:
        """Return once every master has been probed (the first round is in), or after
        ``timeout`` seconds."""
        until = time.monotonic() + timeout
        while time.monotonic() < until and not self.complete():
            await asyncio.sleep(STARTUP_POLL)

    def serving(self) -> dict[str, tuple[str, ...]] | None:
        """{duty: masters serving it} by fresh reports, and by the duty table for a master whose
        last report predates a call (unless the health machine has failed it); None while a
        master has never been probed."""
        if not self.complete():
            return None
        fleet = list(self.fleet)
        fresh = [rt for rt in fleet if self.marks.fresh(rt)]
        fresh_names = {rt.name for rt in fresh}
        names = {duty: list(found)
                 for duty, found in reported_holders(fresh, self.all_duties()).items()}
        for rt in fleet:
            if rt.name in fresh_names or rt.health.state is State.FAILED:
                continue
            for duty in self.duties.duties_of(rt.name):
                if duty in names:
                    names[duty].append(rt.name)
        return {duty: tuple(sorted(found)) for duty, found in names.items()}

    def unserved(self, master: str,
                 serving: Mapping[str, tuple[str, ...]] | None = None) -> bool:
        """Whether a duty ``master`` holds is known to be served by nobody (``serving``: the
        view of this round, when the caller has it)."""
        serving = self.serving() if serving is None else serving
        return serving is not None and any(
            not serving.get(duty, ("?",)) for duty in self.duties.duties_of(master))

    async def reconcile(self, automatic: bool, enabled: bool) -> set[str]:
        """One pass over every duty: adopt, activate, stop second holders. Returns the holders
        whose unserved duties need a failover (the manager runs it, without a cooldown)."""
        serving = self.serving()
        if serving is None:
            return set()
        busy, moving = self.engine.involved(), self.engine.moving_duties()
        fixes: list[tuple[str, DutyFix]] = []
        for duty, found in serving.items():
            holder = self.duties.holder_of(duty)
            hrt = self.fleet.get(holder) if holder else None
            if hrt is None or duty in moving or holder in busy or busy.intersection(found):
                continue
            ready = hrt.up and self.marks.fresh(hrt) and hrt.health.state in SERVING
            fixes.append((duty, fix_duty(duty, hrt.name, found, ready,
                                         hrt.health.state in GONE)))
        for duty, fix in fixes:  # adopt first: a master's duties decide how it is stopped
            if fix.adopt is not None:
                self._adopt(duty, fix.adopt, serving[duty])
        gone: set[str] = set()
        for duty, fix in fixes:
            if fix.stop and enabled:
                await self._stop(duty, fix.stop)
            elif fix.activate is not None and automatic:
                await self._activate(duty, fix.activate)
            elif fix.failover is not None:
                gone.add(fix.failover)
        return gone

    def _adopt(self, duty: str, master: str, found: Iterable[str]) -> None:
        believed = self.duties.holder_of(duty)
        self.duties.move([duty], master, time.time(), 0)
        self.store.audit("exporter", "duty_adopted", duty, {
            "holder": master, "believed": believed, "serving": list(found)})
        log.warning("duty %s is served by %s, not by %s as recorded: %s is its holder now",
                    duty, master, believed, master,
                    extra={"event": "duty_adopted", "duty": duty, "master": master,
                           "believed": believed})

    async def _activate(self, duty: str, holder: str) -> None:
        """The holder answers and is healthy but does not serve its duty (restarted, or
        deactivated behind the exporter's back): activate it for every duty it holds."""
        rt = self.fleet.get(holder)
        assert rt is not None
        errors: list[str] = []
        await self.undo.undo(rt, "unfence", None, errors)
        if errors:
            self._note(duty, f"activating {holder} failed: {errors[0]}")
            return
        self._noted.pop(duty, None)
        self.store.audit("exporter", "duty_reactivated", duty, {"holder": holder})
        log.warning("duty %s was served by nobody: %s, its holder, activated for it", duty,
                    holder, extra={"event": "duty_reactivated", "duty": duty,
                                   "master": holder})

    async def _stop(self, duty: str, others: tuple[str, ...]) -> None:
        """Every master but the holder stops serving ``duty``: one that holds nothing is fenced
        altogether, one that holds other duties releases this one."""
        holder = self.duties.holder_of(duty)
        for name in others:
            rt = self.fleet.get(name)
            if rt is None or not must_fence(True, self.marks.fresh(rt), holder, True,
                                            self.engine.is_running(name)):
                continue
            if not self.duties.duties_of(name):
                await self.undo.fence_returning(rt, holder)
                continue
            errors: list[str] = []
            await self.undo.undo(rt, "release", duty, errors)
            if errors:
                self._note(duty, f"releasing it on {name} failed: {errors[0]}")
                continue
            self._noted.pop(duty, None)
            self.store.audit("exporter", "duty_released", name, {"duty": duty, "holder": holder})
            log.warning("master %s served duty %s as well as its holder %s: released", name,
                        duty, holder, extra={"event": "duty_released", "master": name,
                                             "duty": duty, "holder": holder})

    def _note(self, duty: str, text: str) -> None:
        """Log a failure once, and again only when it changes."""
        if self._noted.get(duty) != text:
            self._noted[duty] = text
            log.warning("duty %s: %s", duty, text,
                        extra={"event": "duty_reconcile_failed", "duty": duty})
