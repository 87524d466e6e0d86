"""Producer client: ask the exporter where a message should go, deliver it there, report how
it went, and on failure try the next routing decision.

Example::

    from exporter.client import Client, DeliveryFailed

    async with Client("http://127.0.0.1:9108") as client:
        try:
            result = await client.send({"id": "order-17", "total": 42}, key="customer-9")
        except DeliveryFailed as exc:
            ...  # every attempt failed: exc.attempts says where and why
        print(result["master"], result["attempts"])

Delivery is at least once: after a timeout the first master may have taken the message even
though the client retried elsewhere. Masters dedupe by message ``id`` (master protocol), so
``send`` gives a message without one a fresh id before the first attempt and keeps it for every
retry. Reports feed the exporter's passive outlier detection and in-flight load; they are best
effort and never fail a send.

A failover to a master's last checkpoint loses what it acknowledged since, so the client keeps
what each master acknowledged (:class:`ReplayBuffer`) and after a failover re-sends to the new
holder what lies above the watermark it received (docs/protocol.md "Watermarks", client.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

log = logging.getLogger(__name__)

# Master answers worth retrying elsewhere; any other 4xx means the message itself is refused.
RETRYABLE_STATUS = frozenset({408, 425, 429})
MAX_SEQ = 2**53  # a master's sequence numbers and watermarks (docs/protocol.md, "Watermarks")
MAX_ID = 2**63 - 1  # failover record ids
MAX_NAME, MAX_URL = 256, 2048  # a master's name and base URL, as the client accepts them
MAX_INFO_BODY = 1 << 20  # failover pages, a master's entry, a /health: nothing larger is read
FAILOVER_PAGE = 50
MAX_FAILOVER_PAGES = 20
REPLAY_CONCURRENCY = 8
REPLAY_KINDS = frozenset({"failover", "switchover"})  # moves that fence or release the source
JSON_HEADERS = {"Content-Type": "application/json"}


class ClientError(Exception):
    """Base of everything this client raises."""


class RouteUnavailable(ClientError):
    """The exporter has no master for us right now (503), or could not be reached."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RequestRejected(ClientError):
    """A 4xx that retrying cannot fix: a bad region for the exporter, a bad message for a
    master. ``master`` is None when the exporter refused the routing request."""

    def __init__(self, status: int, reason: str, master: str | None = None) -> None:
        where = f"master {master}" if master else "exporter"
        super().__init__(f"{where} refused the request ({status}): {reason}")
        self.status = status
        self.reason = reason
        self.master = master


@dataclass(frozen=True, slots=True)
class Attempt:
    master: str | None  # None when no routing decision was obtained
    error: str


class DeliveryFailed(ClientError):
    """Every attempt failed; the message may still have reached a master (see module doc)."""

    def __init__(self, message_id: str, attempts: list[Attempt]) -> None:
        tried = "; ".join(f"{a.master or 'routing'}: {a.error}" for a in attempts)
        text = f"message {message_id} not delivered after {len(attempts)} attempts ({tried})"
        super().__init__(text)
        self.message_id = message_id
        self.attempts = attempts


def _number(value: Any, low: int, high: int) -> int | None:
    """``value`` when it is an integer in ``low..high`` (not a bool), else None: numbers from a
    master or the exporter are never trusted as they come."""
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    return value if ok else None


def _name(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= MAX_NAME else None


def _url(value: Any) -> str | None:
    ok = isinstance(value, str) and len(value) <= MAX_URL and value.startswith(("http://", "https://"))
    return value.rstrip("/") if ok else None


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


def _error_text(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:200] or "(empty body)"
    if isinstance(data, dict) and "error" in data:
        return str(data["error"])
    return str(data)[:200]


class Client:
    """Routes through the exporter at ``base_url``; ``attempts`` bounds tries per message,
    ``timeout`` (seconds) bounds each HTTP request. Pass ``session`` to share connection pools
    (it is then not closed here); ``token`` is sent as a bearer token on reports.

    With ``replay`` (the default) it keeps up to ``replay_max_messages`` messages and
    ``replay_max_bytes`` bytes per master it delivered to, checks the exporter's failover
    records every ``sync_interval`` seconds, and re-sends what a failover left out."""

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession | None = None,
        attempts: int = 3,
        timeout: float = 5.0,
        *,
        backoff: float = 0.05,
        max_backoff: float = 0.5,
        token: str | None = None,
        replay: bool = True,
        replay_max_messages: int = 50_000,
        replay_max_bytes: int = 32 << 20,
        sync_interval: float = 1.0,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        if timeout <= 0:
            raise ValueError("timeout must be greater than 0")
        if replay_max_messages < 1 or replay_max_bytes < 1 or sync_interval <= 0:
            raise ValueError("replay caps must be at least 1, sync_interval greater than 0")
        self.base_url = base_url.rstrip("/")
        self.attempts = attempts
        self.backoff, self.max_backoff = max(0.0, backoff), max(0.0, max_backoff)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session, self._own_session = session, session is None
        self.replay, self.sync_interval = replay, sync_interval
        self.replay_max_messages, self.replay_max_bytes = replay_max_messages, replay_max_bytes
        self._buffers: dict[str, ReplayBuffer] = {}
        self._urls: dict[str, str] = {}  # master -> base URL, from routing decisions
        self._cursor: int | None = None  # failover records up to this id are dealt with
        self._handled: set[int] = set()  # dealt with, above the cursor
        self._sync_lock = asyncio.Lock()
        self._sync_task: asyncio.Task[None] | None = None
        self.replayed: Counter[str] = Counter()  # by failed master: re-sent and acknowledged
        self.replay_refused: Counter[str] = Counter()  # by failed master: the holder said 4xx
        self.at_risk: Counter[str] = Counter()  # dropped from a buffer, maybe not covered

    async def __aenter__(self) -> Client:
        self._http()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop watching failovers; close the session if this client created it."""
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
            self._sync_task = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
            self._own_session = True
        return self._session

    def stats(self) -> dict[str, dict[str, int]]:
        """Replay figures by master: messages and bytes held now, dropped by the caps (ever),
        re-sent after a failover, refused on re-send, and dropped ones a failover's watermark
        may not have covered (an upper bound of what was lost)."""
        bufs = self._buffers.items()
        return {"held": {m: len(b) for m, b in bufs}, "held_bytes": {m: b.bytes for m, b in bufs},
                "dropped": {m: b.dropped for m, b in bufs if b.dropped},
                "replayed": dict(self.replayed), "refused": dict(self.replay_refused),
                "at_risk": dict(self.at_risk)}

    async def route(self, key: str | None = None, region: str | None = None) -> dict[str, Any]:
        """One routing decision ``{"master", "url", "strategy"}``."""
        params = {k: v for k, v in (("key", key), ("region", region)) if v}
        try:
            async with self._http().get(f"{self.base_url}/api/v1/route", params=params,
                                        timeout=self._timeout) as resp:
                body, status = await resp.read(), resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RouteUnavailable(f"exporter unreachable: {exc!r}") from exc
        if status == 200:
            try:
                decision = json.loads(body)
            except ValueError:
                decision = None
            if not isinstance(decision, dict) or not {"master", "url"} <= decision.keys():
                raise RouteUnavailable(f"invalid routing answer: {body[:200]!r}")
            return decision
        if 400 <= status < 500:
            raise RequestRejected(status, _error_text(body))
        raise RouteUnavailable(f"{status}: {_error_text(body)}")

    async def report(self, master: str, ok: bool, latency_seconds: float) -> bool:
        """Tell the exporter how a routed message went; False if the report got lost."""
        payload = {"master": master, "ok": ok, "latency_seconds": round(latency_seconds, 6)}
        try:
            async with self._http().post(f"{self.base_url}/api/v1/route/report", json=payload,
                                         headers=self._headers, timeout=self._timeout) as resp:
                await resp.read()
                if resp.status < 300:
                    return True
                log.debug("report for %s refused: %s", master, resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("report for %s lost: %r", master, exc)
        return False

    async def send(
        self, message: dict[str, Any], key: str | None = None, region: str | None = None
    ) -> dict[str, Any]:
        """Deliver ``message`` to a master: ``{"id", "master", "url", "strategy", "attempts",
        "response"}``. Raises DeliveryFailed after ``attempts`` failures, RequestRejected at
        once for a 4xx that another try cannot fix."""
        msg = dict(message)
        if msg.get("id") in (None, ""):
            msg["id"] = uuid.uuid4().hex
        message_id = str(msg["id"])
        data = json.dumps(msg).encode()  # the same bytes for every attempt and any replay
        self._watch()
        failures: list[Attempt] = []
        for attempt in range(1, self.attempts + 1):
            if attempt > 1 and self.backoff:
                await asyncio.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 2)))
            try:
                decision = await self.route(key, region)
            except RouteUnavailable as exc:
                failures.append(Attempt(None, exc.reason))
                continue
            master, url = str(decision["master"]), str(decision["url"])
            started = time.monotonic()
            try:
                status, body = await self._post_message(url, data)
            except (aiohttp.ClientError, TimeoutError) as exc:
                await self.report(master, False, time.monotonic() - started)
                failures.append(Attempt(master, f"{type(exc).__name__}: {exc}".rstrip(": ")))
                continue
            latency = time.monotonic() - started
            if 200 <= status < 300:
                await self.report(master, True, latency)
                try:
                    response: Any = json.loads(body) if body else None
                except ValueError:
                    response = body.decode(errors="replace")
                self._hold(master, url, message_id, response, data)
                return {"id": message_id, "master": master, "url": decision["url"],
                        "strategy": decision.get("strategy"), "attempts": attempt,
                        "response": response}
            if status >= 500 or status in RETRYABLE_STATUS:
                await self.report(master, False, latency)
                failures.append(Attempt(master, f"HTTP {status}: {_error_text(body)}"))
                continue
            await self.report(master, True, latency)  # it answered properly; the message is bad
            raise RequestRejected(status, _error_text(body), master)
        raise DeliveryFailed(message_id, failures)

    async def _post_message(self, url: str, data: bytes) -> tuple[int, bytes]:
        async with self._http().post(f"{url.rstrip('/')}/messages", data=data,
                                     headers=JSON_HEADERS, timeout=self._timeout) as resp:
            return resp.status, await resp.read()

    # --- replay after a failover ------------------------------------------------------------
    def _watch(self) -> None:
        """Start watching the exporter's failover records, once, from inside the event loop."""
        if self.replay and self._sync_task is None:
            self._sync_task = asyncio.create_task(self._sync_loop(), name="client-replay-sync")

    def _hold(self, master: str, url: str, message_id: str, answer: Any, data: bytes) -> None:
        """Keep an acknowledged message with the sequence number the master gave it."""
        if not self.replay or _name(master) is None:
            return
        if (checked := _url(url)) is not None:
            self._urls[master] = checked
        seq = _number(answer.get("seq"), 1, MAX_SEQ) if isinstance(answer, dict) else None
        if master not in self._buffers:
            self._buffers[master] = ReplayBuffer(self.replay_max_messages, self.replay_max_bytes)
        self._buffers[master].add(message_id, seq, data)

    async def _sync_loop(self) -> None:
        while True:
            try:
                await self.sync()
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.debug("failover check failed: %r", exc)
            except Exception:  # a bug must not end the watch for good
                log.exception("failover check crashed")
            await asyncio.sleep(self.sync_interval)

    async def sync(self) -> int:
        """Read the exporter's new failover records and, for each finished successful failover
        or switchover of a master this client holds messages of, re-send to the new holder what
        the holder's imported watermark does not cover. Returns how many were re-sent. A move
        that could not be dealt with (the holder unreachable) is tried again next time; records
        that cannot be read raise (aiohttp.ClientError, TimeoutError, ValueError)."""
        async with self._sync_lock:
            records = await self._new_failovers()
            sent, blocked = 0, False
            for rec in records:
                done = rec["finished"] is not None and (
                    rec["result"] != "success" or rec["kind"] not in REPLAY_KINDS
                    or rec["backup"] in (None, rec["master"])
                    or not self._buffers.get(rec["master"])
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
            page = await self._get_json(f"{self.base_url}/api/v1/failovers{query}")
            items = page.get("items")
            if not isinstance(items, list):
                raise ValueError("failover page without items")
            recs = {r["id"]: r for r in map(_failover_record, items) if r is not None}
            if before is None and recs and max(recs) < (self._cursor or 0):
                self._cursor, self._handled = 0, set()  # the exporter's history restarted
            found.update((i, r) for i, r in recs.items() if i > (self._cursor or 0))
            before = _number(page.get("next_before"), 1, MAX_ID)
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
        url = self._urls.get(backup)
        if url is None:
            entry = await self._get_json(f"{self.base_url}/api/v1/masters/{quote(backup, '')}")
            if (url := _url(entry.get("url"))) is None:
                raise ValueError(f"no usable URL for master {backup!r}")
        marks = (await self._get_json(f"{url}/health")).get("imported_watermarks")
        watermark = _number(marks.get(source), 0, MAX_SEQ) if isinstance(marks, dict) else None
        buffer, before = self._buffers[source], self.replayed[source]
        todo = buffer.above(watermark)
        done: set[str] = set()
        sem = asyncio.Semaphore(REPLAY_CONCURRENCY)

        async def one(message_id: str, data: bytes) -> None:
            async with sem:
                try:
                    status, body = await self._post_message(url, data)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.debug("replay of %s to %s failed: %r", message_id, backup, exc)
                    return
            if 200 <= status < 300:
                try:
                    answer: Any = json.loads(body)
                except ValueError:
                    answer = None  # acknowledged all the same, without a number
                self._hold(backup, url, message_id, answer, data)
                self.replayed[source] += 1
                done.add(message_id)
            elif 400 <= status < 500 and status not in RETRYABLE_STATUS:
                log.warning("%s refused replayed %s: %s", backup, message_id, _error_text(body))
                self.replay_refused[source] += 1
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

    async def _get_json(self, url: str) -> dict[str, Any]:
        """A JSON object from a 2xx answer of at most MAX_INFO_BODY bytes; ValueError else.
        The token goes to the exporter only, never to a master."""
        body, headers = bytearray(), self._headers if url.startswith(f"{self.base_url}/") else {}
        async with self._http().get(url, headers=headers, timeout=self._timeout) as resp:
            if not 200 <= resp.status < 300:
                raise ValueError(f"GET {url}: HTTP {resp.status}")
            async for chunk in resp.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > MAX_INFO_BODY:
                    raise ValueError(f"GET {url}: answer larger than {MAX_INFO_BODY} bytes")
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError(f"GET {url}: not a JSON object")
        return data


def _failover_record(item: Any) -> dict[str, Any] | None:
    """The fields of a failover record the replay needs, validated; None when unusable."""
    if not isinstance(item, dict):
        return None
    rid, master = _number(item.get("id"), 1, MAX_ID), _name(item.get("master"))
    finished, kind, result = item.get("finished"), item.get("kind"), item.get("result")
    if rid is None or master is None or not isinstance(finished, int | float | None):
        return None
    return {"id": rid, "master": master, "backup": _name(item.get("backup")), "finished": finished,
            "result": str(result), "kind": str(kind)}
