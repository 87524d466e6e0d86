"""Requirements that change the master (``--destructive``): imports, activation, fencing,
idempotency and fencing epochs, then the master's activity put back as it was found.

Every control call carries one epoch: ``--epoch``, else the one the master reports in /health,
else 1. Equal epochs are obeyed without raising anything, so a check run with the master's own
epoch leaves its fencing state as it was; the stale-epoch check uses that epoch minus one.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

from exporter.conformance.checks import Observed, read_health, verify_snapshot
from exporter.conformance.core import STATE_CAP, Answer, Client, Failed, Report, require
from exporter.conformance.schemas import STALE_EPOCH
from exporter.failover.protocol import snapshot_checksum

log = logging.getLogger(__name__)

Activity = tuple[bool, list[str]]

REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("import.accepts", "POST /state imports a snapshot and answers an accepted checksum"),
    ("import.idempotent", "POST /state of the same snapshot again answers the same checksum"),
    ("import.listed", "GET /state lists the import under imported, with that checksum"),
    ("import.rejects-tampered",
     "POST /state of a snapshot whose checksum does not match answers 400, keeps the import"),
    ("errors.bad-body", "POST /activate with a body that is not JSON answers 400, changes nothing"),
    ("epoch.invalid", "a control call whose X-HA-Epoch is not an integer answers 400"),
    ("activate.taken-over", "POST /activate {taken_over} serves that duty as well"),
    ("activate.idempotent", "POST /activate of the same duty again changes nothing"),
    ("deactivate.release", "POST /deactivate {taken_over} releases only that duty, twice alike"),
    ("epoch.stale", "a control call with a lower X-HA-Epoch answers 409 stale epoch, changes "
                    "nothing"),
    ("epoch.absent", "a control call without X-HA-Epoch is accepted (or refused with 428)"),
    ("epoch.reported", "GET /health epoch, when reported, is the highest epoch obeyed"),
    ("deactivate.fence", "POST /deactivate without a body fences (inactive, no duties), twice "
                         "alike"),
    ("activate.own", "POST /activate {} serves the master's own duty"),
    ("import.drop", "DELETE /state/{source} drops the import; again: removed false or 404"),
    ("restore.activity", "the master serves what it served before the check"),
)
WHAT = dict(REQUIREMENTS)


def test_snapshot(source: str) -> tuple[dict[str, Any], bytes]:
    """A small snapshot of a made-up master, and its bytes as sent: indented, keys unsorted and
    non-ASCII text raw, so that a master hashing the bytes instead of the canonical JSON fails."""
    snap: dict[str, Any] = {
        "master": source,
        "region": "conformance",
        "sessions": {"conformance-s1": {"phone": "+10000000000", "opened_at": 1735689600,
                                        "messages": 1, "name": "Zoë"}},
        "pending_messages": [{"id": "conformance-m1", "text": "hi \"there\"\n"}],
        "config": {"language": "en", "rate": 0.5},
        "imported": {},
    }
    snap = {"checksum": snapshot_checksum(snap), **snap}
    return snap, json.dumps(snap, indent=1, ensure_ascii=False).encode()


class DestructiveChecks:
    """One destructive run against one master; ``run`` always ends by restoring it."""

    def __init__(self, report: Report, client: Client, seen: Observed,
                 epoch: int | None = None) -> None:
        self.report = report
        self.client = client
        self.seen = seen
        reported = (seen.health or {}).get("epoch")
        self.epoch: int = epoch or (reported if isinstance(reported, int) and reported else 1)
        self.source = f"conformance-{secrets.token_hex(4)}"
        self.snapshot, self.raw = test_snapshot(self.source)
        self.accepted = verify_snapshot(self.raw, "test snapshot").import_checksums
        self.stored: str | None = None
        self.activated: Activity | None = None

    # --- calls ---------------------------------------------------------------------------
    async def control(self, method: str, path: str, body: Any = None, *,
                      raw: bytes | None = None) -> Answer:
        """A control call with this run's epoch; a 409 to it fails saying what to do."""
        answer = await self.client.call(method, path, body=body, raw=raw, epoch=self.epoch)
        if answer.status == 409:
            raise Failed(f"{answer.call} refused epoch {self.epoch} as stale: the master has "
                         "obeyed a higher one; run again with --epoch set to the controller's "
                         "current epoch")
        return answer

    async def activity(self, answer: Answer) -> Activity:
        data = answer.expect(200).valid("Activity")
        return data["active"], sorted(data["duties"])

    async def health_activity(self) -> Activity | None:
        """/health's (active, sorted duties), None when it does not report them."""
        h = await read_health(self.client)
        if h.get("active") is None or h.get("duties") is None:
            return None
        return bool(h["active"]), sorted(h["duties"])

    async def same_on_health(self, expected: Activity, after: str) -> None:
        seen = await self.health_activity()
        require(seen is None or seen == expected,
                f"after {after}, GET /health says active={seen[0] if seen else None} "
                f"duties={seen[1] if seen else None}, the answer said {expected}")

    async def imported_checksum(self) -> str | None:
        answer = (await self.client.call("GET", "/state", cap=STATE_CAP)).expect(200)
        verify_snapshot(answer.body, "GET /state")
        entry = (answer.valid("Snapshot").get("imported") or {}).get(self.source)
        return entry.get("checksum") if isinstance(entry, dict) else None

    # --- requirements ----------------------------------------------------------------------
    async def import_accepts(self) -> bool:
        data = (await self.control("POST", "/state", raw=self.raw)).expect(200).valid(
            "ImportAnswer")
        require(data["checksum"] in self.accepted,
                f"answered checksum {data['checksum'][:12]}…, expected "
                f"{self.snapshot['checksum'][:12]}… (or its stored form's)")
        self.stored = data["checksum"]
        return True

    async def import_idempotent(self) -> bool:
        data = (await self.control("POST", "/state", raw=self.raw)).expect(200).valid(
            "ImportAnswer")
        require(data["checksum"] == self.stored,
                f"second import answered {data['checksum'][:12]}…, first {self.stored or ''}")
        return True

    async def import_listed(self) -> bool:
        listed = await self.imported_checksum()
        require(listed in self.accepted, f"imported[{self.source!r}] has checksum {listed!r}")
        return True

    async def import_rejects_tampered(self) -> bool:
        bad = {**self.snapshot, "sessions": {}}
        (await self.control("POST", "/state", bad)).expect(400).valid("Error")
        listed = await self.imported_checksum()
        require(listed in self.accepted, f"after the refused import, imported[{self.source!r}] "
                                         f"has checksum {listed!r}")
        return True

    async def bad_body(self) -> bool:
        before = await self.health_activity()
        (await self.control("POST", "/activate", raw=b"{not json")).expect(400).valid("Error")
        after = await self.health_activity()
        require(after == before, f"GET /health changed from {before} to {after}")
        return True

    async def epoch_invalid(self) -> bool:
        answer = await self.client.call("POST", "/deactivate", body={"taken_over": self.source},
                                        headers={"X-HA-Epoch": "soon"})
        answer.expect(400).valid("Error")
        return True

    async def activate_taken_over(self) -> bool:
        got = await self.activity(await self.control(
            "POST", "/activate", {"taken_over": self.source}))
        require(got[0] and self.source in got[1],
                f"answered active={got[0]} duties={got[1]}: taken_over ignored")
        await self.same_on_health(got, "activate")
        self.activated = got
        return True

    async def activate_idempotent(self) -> bool:
        require(self.activated is not None, "the first activate did not pass")
        got = await self.activity(await self.control(
            "POST", "/activate", {"taken_over": self.source}))
        require(got == self.activated, f"second activate answered {got}, first {self.activated}")
        await self.same_on_health(got, "the second activate")
        return True

    async def deactivate_release(self) -> bool:
        if self.activated is None:
            raise Failed("the activate before it did not pass")
        held = set(self.activated[1])
        first = None
        for _ in range(2):
            got = await self.activity(await self.control(
                "POST", "/deactivate", {"taken_over": self.source}))
            require(set(got[1]) == held - {self.source},
                    f"answered duties {got[1]}, expected {sorted(held - {self.source})}")
            require(got[0] == bool(got[1]), f"answered active={got[0]} with duties {got[1]}")
            require(first is None or got == first, f"again answered {got}, first {first}")
            first = got
        assert first is not None
        await self.same_on_health(first, "release")
        return True

    async def epoch_stale(self) -> bool:
        before = await self.health_activity()
        answer = await self.client.call("POST", "/activate", body={"taken_over": self.source},
                                        epoch=self.epoch - 1)
        answer.expect(409)
        data = answer.valid("StaleEpoch")
        require(data["error"] == STALE_EPOCH, f"error is {data['error']!r}")
        after = await self.health_activity()
        require(after == before, f"the refused activate changed GET /health from {before} to "
                                 f"{after}")
        return True

    async def epoch_absent(self) -> bool:
        answer = await self.client.call("POST", "/deactivate", body={"taken_over": self.source})
        if answer.status == 428:
            answer.valid("Error")
        else:
            await self.activity(answer)
        return True

    async def epoch_reported(self) -> bool:
        reported = (await read_health(self.client)).get("epoch")
        require(reported is None or reported == self.epoch,
                f"GET /health epoch is {reported}, the calls used {self.epoch}")
        return True

    async def fence(self) -> bool:
        first = None
        for _ in range(2):
            got = await self.activity(await self.control("POST", "/deactivate"))
            require(got == (False, []), f"answered active={got[0]} duties={got[1]}")
            first = got
        assert first is not None
        await self.same_on_health(first, "fencing")
        return True

    async def activate_own(self) -> bool:
        name = self.seen.name
        require(name is not None, "the master's name is unknown (no /health name, no /state "
                                  "master)")
        got = await self.activity(await self.control("POST", "/activate", {}))
        require(got[0] and name in got[1], f"answered active={got[0]} duties={got[1]}")
        await self.same_on_health(got, "activate")
        return True

    async def drop(self) -> bool:
        data = (await self.control("DELETE", f"/state/{self.source}")).expect(200).valid(
            "Removed")
        require(data["removed"] is True, "answered removed false for an existing import")
        require(await self.imported_checksum() is None, "GET /state still lists the import")
        again = await self.control("DELETE", f"/state/{self.source}")
        if again.status == 404:
            again.valid("Error")
        else:
            require(again.expect(200).valid("Removed")["removed"] is False,
                    "the second drop answered removed true")
        return True

    async def restore(self, original: Activity) -> bool:
        """Fence, then activate what it served before; the made-up import is dropped too."""
        await self.control("DELETE", f"/state/{self.source}")
        await self.activity(await self.control("POST", "/deactivate"))
        name = self.seen.name
        for duty in original[1]:
            await self.activity(await self.control(
                "POST", "/activate", {} if duty == name else {"taken_over": duty}))
        now = await self.health_activity()
        require(now == original, f"GET /health says {now}, before the check {original}")
        return True

    async def run(self) -> None:
        h = self.seen.health
        if h is None or h.get("active") is None or h.get("duties") is None:
            for rid, what in REQUIREMENTS:
                self.report.skip(rid, what, "what the master serves could not be read from "
                                            "/health, so it could not be restored")
            return
        original: Activity = (bool(h["active"]), sorted(h["duties"]))
        steps = (self.import_accepts, self.import_idempotent, self.import_listed,
                 self.import_rejects_tampered, self.bad_body, self.epoch_invalid,
                 self.activate_taken_over, self.activate_idempotent, self.deactivate_release,
                 self.epoch_stale, self.epoch_absent, self.epoch_reported, self.fence,
                 self.activate_own, self.drop)
        log.info("destructive checks with epoch %d, made-up master %s", self.epoch, self.source)
        try:
            for (rid, what), step in zip(REQUIREMENTS[:-1], steps, strict=True):
                await self.report.check(rid, what, step)
        finally:
            await self.report.check("restore.activity", WHAT["restore.activity"],
                                    lambda: self.restore(original))


async def run_destructive(report: Report, client: Client, seen: Observed,
                          epoch: int | None = None) -> None:
    await DestructiveChecks(report, client, seen, epoch).run()
