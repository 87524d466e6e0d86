"""No loss across a failover: what each master acknowledged, and the re-send to the master that
took over of what the snapshot it imported lacks (docs/protocol.md "Watermarks", client.md)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp

from exporter.client.errors import error_text
from exporter.client.wire import MAX_ID, MAX_SEQ, name, number, url

log = logging.getLogger(__name__)

FAILOVER_PAGE = 50
MAX_FAILOVER_PAGES = 20
REPLAY_CONCURRENCY = 8
REPLAY_KINDS = frozenset({"failover", "switchover"})  # moves that fence or release the source
# Master answers worth retrying elsewhere; any other 4xx means the message itself is refused.
RETRYABLE_STATUS = frozenset({408, 425, 429})

GetJson = Callable[[str], Awaitable[dict[str, Any]]]
PostMessage = Callable[[str, bytes], Awaitable[tuple[int, bytes]]]


class ReplayBuffer:
    """The messages one master acknowledged, oldest first, with the sequence number it gave
    each (None: unnumbered, so never known to be covered). Capped in messages and bytes: when
    full, the oldest is dropped and counted, because nothing tells the client that the master's
    checkpoint has passed it; after a failover :meth:`above` is what the new holder lacks."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self._held: OrderedDict[str, tuple[int | None, bytes]] = OrderedDict()
        self.bytes, self.dropped = 0, 0  # held now; dropped by the caps, ever
        self._unsettled = 0  # dropped since the last failover of this master was dealt with
        self._dropped_top: int | None = None  # highest seq among those; MAX_SEQ if unnumbered

    def __len__(self) -> int:
        return len(self._held)

    def add(self, message_id: str, seq: int | None, body: bytes) -> None:
        """Keep one acknowledgement; a repeated id keeps the later position and the higher
        number (or None when either is unnumbered: replaying it is the safe side)."""
        old = self._held.pop(message_id, None)
        if old is not None:
            self.bytes -= len(old[1])
            seq = None if seq is None or old[0] is None else max(seq, old[0])
        self._held[message_id] = (seq, body)
        self.bytes += len(body)
        while self._held and (len(self._held) > self.max_messages or self.bytes > self.max_bytes):
            _, (dropped_seq, dropped_body) = self._held.popitem(last=False)
            self.bytes -= len(dropped_body)
            self.dropped, self._unsettled = self.dropped + 1, self._unsettled + 1
            self._dropped_top = max(dropped_seq or MAX_SEQ, self._dropped_top or 0)

    def above(self, watermark: int | None) -> list[tuple[str, bytes]]:
        """What a snapshot with ``watermark`` does not cover, oldest first (None: everything)."""
        return [(m, b) for m, (seq, b) in self._held.items()
                if watermark is None or seq is None or seq > watermark]

    def settle(self, watermark: int | None, done: set[str]) -> int:
        """Forget what a snapshot with ``watermark`` covers and the ids in ``done`` (re-sent or
        refused) once a failover is dealt with; how many dropped messages that watermark may
        not cover (an upper bound: 0 means none was lost)."""
        at_risk = 0
        if self._unsettled and (watermark is None or (self._dropped_top or 0) > watermark):
            at_risk = self._unsettled
        self._unsettled, self._dropped_top = 0, None
        for mid, (seq, body) in list(self._held.items()):
            if mid in done or (watermark is not None and seq is not None and seq <= watermark):
                del self._held[mid]
                self.bytes -= len(body)
        return at_risk


def failover_record(item: Any) -> dict[str, Any] | None:
    """The fields of a failover record the replay needs, validated; None when unusable."""
    if not isinstance(item, dict):
        return None
    rid, master = number(item.get("id"), 1, MAX_ID), name(item.get("master"))
    finished, kind, result = item.get("finished"), item.get("kind"), item.get("result")
    if rid is None or master is None or not isinstance(finished, int | float | None):
        return None
    return {"id": rid, "master": master, "backup": name(item.get("backup")), "finished": finished,
            "result": str(result), "kind": str(kind)}


class FailoverReplay:
    """Buffers per master, and the watch of the exporter's failover records that re-sends what
    a finished failover or switchover left out. ``base`` gives the exporter URL to read from
    (the one that answered last), ``get_json`` and ``post_message`` do the HTTP."""

    def __init__(self, max_messages: int, max_bytes: int, base: Callable[[], str],
                 get_json: GetJson, post_message: PostMessage) -> None:
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self._base, self._get_json, self._post = base, get_json, post_message
        self.buffers: dict[str, ReplayBuffer] = {}
        self._urls: dict[str, str] = {}  # master -> base URL, from routing decisions
        self._cursor: int | None = None  # failover records up to this id are dealt with
        self._handled: set[int] = set()  # dealt with, above the cursor
        self._lock = asyncio.Lock()
        self.replayed: Counter[str] = Counter()  # by failed master: re-sent and acknowledged
        self.refused: Counter[str] = Counter()  # by failed master: the holder said 4xx
        self.at_risk: Counter[str] = Counter()  # dropped from a buffer, maybe not covered

    def hold(self, master: str, master_url: str, message_id: str, answer: Any,
             data: bytes) -> None:
        """Keep an acknowledged message with the sequence number the master gave it."""
        if name(master) is None:
            return
        if (checked := url(master_url)) is not None:
            self._urls[master] = checked
        seq = number(answer.get("seq"), 1, MAX_SEQ) if isinstance(answer, dict) else None
        if master not in self.buffers:
            self.buffers[master] = ReplayBuffer(self.max_messages, self.max_bytes)
        self.buffers[master].add(message_id, seq, data)

    def stats(self) -> dict[str, dict[str, int]]:
        bufs = self.buffers.items()
        return {"held": {m: len(b) for m, b in bufs}, "held_bytes": {m: b.bytes for m, b in bufs},
                "dropped": {m: b.dropped for m, b in bufs if b.dropped},
                "replayed": dict(self.replayed), "refused": dict(self.refused),
                "at_risk": dict(self.at_risk)}

    async def sync(self) -> int:
        """Read the exporter's new failover records and, for each finished successful failover
        or switchover of a master this client holds messages of, re-send to the new holder what
        the holder's imported watermark does not cover. Returns how many were re-sent. A move
        that could not be dealt with (the holder unreachable) is tried again next time; records
        that cannot be read raise (aiohttp.ClientError, TimeoutError, ValueError)."""
        async with self._lock:
            records = await self._new_failovers()
            sent, blocked = 0, False
            for rec in records:
                done = rec["finished"] is not None and (
                    rec["result"] != "success" or rec["kind"] not in REPLAY_KINDS
                    or rec["backup"] in (None, rec["master"])
                    or not self.buffers.get(rec["master"])
                )
                if rec["finished"] is not None and not done:
                    try:
                        count, done = await self._replay(rec["master"], rec["backup"])
                        sent += count
                    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                        log.warning("cannot replay %s's messages to %s yet: %r",
                                    rec["master"], rec["backup"], exc)
                blocked = blocked or not done
                if done and blocked:
                    self._handled.add(rec["id"])
                elif done:
                    self._cursor = rec["id"]
            self._handled = {i for i in self._handled if i > (self._cursor or 0)}
            return sent

    async def _new_failovers(self) -> list[dict[str, Any]]:
        """Failover records above the cursor, oldest first; the first call only sets the
        cursor (below the oldest unfinished record), since nothing was held before."""
        found: dict[int, dict[str, Any]] = {}
        before: int | None = None
        for _ in range(MAX_FAILOVER_PAGES):
            query = f"?limit={FAILOVER_PAGE}" + (f"&before={before}" if before else "")
            page = await self._get_json(f"{self._base()}/api/v1/failovers{query}")
            items = page.get("items")
            if not isinstance(items, list):
                raise ValueError("failover page without items")
            recs = {r["id"]: r for r in map(failover_record, items) if r is not None}
            if before is None and recs and max(recs) < (self._cursor or 0):
                self._cursor, self._handled = 0, set()  # the exporter's history restarted
            found.update((i, r) for i, r in recs.items() if i > (self._cursor or 0))
            before = number(page.get("next_before"), 1, MAX_ID)
            if self._cursor is None or before is None or not recs or min(recs) <= self._cursor:
                break
        if self._cursor is None:
            unfinished = [i for i, r in found.items() if r["finished"] is None]
            self._cursor = min(unfinished) - 1 if unfinished else max(found, default=0)
            return []
        return [found[i] for i in sorted(found) if i not in self._handled]

    async def _replay(self, source: str, backup: str) -> tuple[int, bool]:
        """Re-send what ``source`` acknowledged above the watermark ``backup`` imported;
        (how many the backup acknowledged, whether nothing is left to re-send)."""
        holder = self._urls.get(backup)
        if holder is None:
            entry = await self._get_json(f"{self._base()}/api/v1/masters/{quote(backup, '')}")
            if (holder := url(entry.get("url"))) is None:
                raise ValueError(f"no usable URL for master {backup!r}")
        marks = (await self._get_json(f"{holder}/health")).get("imported_watermarks")
        watermark = number(marks.get(source), 0, MAX_SEQ) if isinstance(marks, dict) else None
        buffer, before = self.buffers[source], self.replayed[source]
        todo = buffer.above(watermark)
        done: set[str] = set()
        sem = asyncio.Semaphore(REPLAY_CONCURRENCY)

        async def one(message_id: str, data: bytes) -> None:
            async with sem:
                try:
                    status, body = await self._post(holder, data)
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    log.debug("replay of %s to %s failed: %r", message_id, backup, exc)
                    return
            if 200 <= status < 300:
                try:
                    answer: Any = json.loads(body)
                except ValueError:
                    answer = None  # acknowledged all the same, without a number
                self.hold(backup, holder, message_id, answer, data)
                self.replayed[source] += 1
                done.add(message_id)
            elif 400 <= status < 500 and status not in RETRYABLE_STATUS:
                log.warning("%s refused replayed %s: %s", backup, message_id, error_text(body))
                self.refused[source] += 1
                done.add(message_id)

        await asyncio.gather(*(one(mid, data) for mid, data in todo))
        at_risk = buffer.settle(watermark, done)
        if at_risk:
            self.at_risk[source] += at_risk
            log.error("up to %d messages acknowledged by %s were dropped from the replay "
                      "buffer and may not be in what %s took over", at_risk, source, backup)
        log.info("failover of %s to %s: watermark %s, re-sent %d of %d", source, backup,
                 watermark, len(done), len(todo))
        return self.replayed[source] - before, len(done) == len(todo)
