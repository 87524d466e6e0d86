"""The producer client: route (locally from the routing table, or by asking the exporter),
deliver, report, retry on the next decision, and replay after a failover."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from contextvars import ContextVar
from types import TracebackType
from typing import Any

import aiohttp

from exporter.client.errors import (
    Attempt,
    DeliveryFailed,
    ExporterUnreachable,
    RequestRejected,
    RouteUnavailable,
    error_text,
)
from exporter.client.local import LocalRouting
from exporter.client.replay import RETRYABLE_STATUS, FailoverReplay
from exporter.client.reports import Outcome, Reporter
from exporter.client.wire import MAX_INFO_BODY, Exporters, read_capped
from exporter.routing import RoutingTable

log = logging.getLogger(__name__)

JSON_HEADERS = {"Content-Type": "application/json"}
MAX_WATCH_WAIT = 60.0  # the exporter's own bound on a watch
#: Set while send() asks route() for a decision: that one comes from the table when one is held.
_FOR_SEND: ContextVar[bool] = ContextVar("exporter_client_for_send", default=False)


class Client:
    """Routes producers' messages to masters through the exporter(s) at ``base_url`` (one URL
    or a list to fail over between: replicas, or one exporter under several names).

    ``attempts`` bounds tries per message, ``timeout`` (seconds) each HTTP request. Pass
    ``session`` to share connection pools (it is then not closed here); ``token`` is sent as a
    bearer token on reports and exporter reads.

    With ``local_routing`` (the default) it fetches the routing table, watches it (long polls
    of ``watch_wait`` seconds) and decides locally for every message with the router's own
    strategies, so it keeps delivering while no exporter answers; an exporter without the table
    is asked per message. Reports then go out in the background (at most ``report_queue``
    waiting) and are dropped while no exporter answers. See docs/client.md.

    With ``replay`` (the default) it keeps up to ``replay_max_messages`` messages and
    ``replay_max_bytes`` bytes per master it delivered to, checks the exporter's failover
    records every ``sync_interval`` seconds, and re-sends what a failover left out."""

    def __init__(
        self,
        base_url: str | Sequence[str],
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
        local_routing: bool = True,
        watch_wait: float = 30.0,
        stale_after: float = 60.0,
        eject_for: float = 10.0,
        report_queue: int = 10_000,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        if timeout <= 0:
            raise ValueError("timeout must be greater than 0")
        if replay_max_messages < 1 or replay_max_bytes < 1 or sync_interval <= 0:
            raise ValueError("replay caps must be at least 1, sync_interval greater than 0")
        if not 0 < watch_wait <= MAX_WATCH_WAIT or stale_after <= 0 or eject_for < 0:
            raise ValueError(f"watch_wait must be in (0, {MAX_WATCH_WAIT:g}], stale_after "
                             "greater than 0, eject_for at least 0")
        if not 1 <= report_queue <= 1_000_000:
            raise ValueError("report_queue must be 1 to 1,000,000")
        self._exporters = Exporters(base_url)
        self.attempts, self.timeout = attempts, timeout
        self.backoff, self.max_backoff = max(0.0, backoff), max(0.0, max_backoff)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session, self._own_session = session, session is None
        self.replay, self.sync_interval = replay, sync_interval
        self._replay = FailoverReplay(replay_max_messages, replay_max_bytes,
                                      lambda: self._exporters.base, self._get_json,
                                      self._post_message)
        self._sync_task: asyncio.Task[None] | None = None
        self._local = LocalRouting(
            self._exporters, self._http, timeout=timeout, wait=watch_wait,
            stale_after=stale_after, eject_for=eject_for) if local_routing else None
        self._reporter = Reporter(self._post_report, self._exporters, report_queue)

    @property
    def base_url(self) -> str:
        """The exporter URL that answered last (requests start there)."""
        return self._exporters.base

    @property
    def exporters(self) -> tuple[str, ...]:
        return self._exporters.urls

    @property
    def table(self) -> RoutingTable | None:
        """The routing table decisions come from; None while asking per message."""
        return self._local.table if self._local is not None else None

    @property
    def replayed(self) -> Counter[str]:
        """By failed master: messages re-sent to its successor and acknowledged."""
        return self._replay.replayed

    @property
    def replay_refused(self) -> Counter[str]:
        """By failed master: re-sent messages the successor refused (4xx)."""
        return self._replay.refused

    @property
    def at_risk(self) -> Counter[str]:
        """By failed master: dropped from its buffer, maybe not covered by the failover."""
        return self._replay.at_risk

    async def __aenter__(self) -> Client:
        self._http()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the watches, send queued reports for up to ``timeout`` seconds, and close the
        session if this client created it."""
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
            self._sync_task = None
        if self._local is not None:
            await self._local.close()
        await self._reporter.close(self.timeout)
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
            self._own_session = True
        return self._session

    def stats(self) -> dict[str, Any]:
        """Replay figures by master: ``held`` and ``held_bytes`` (buffered now), ``dropped`` (by
        the caps, ever), ``replayed`` and ``refused`` (re-sent after a failover), ``at_risk``
        (dropped ones a failover's watermark may not have covered). Routing: ``local_routing``
        (a table is in use), ``table_version``, ``table_age_seconds`` (since an exporter last
        vouched for the table; None without one), ``table_updates``, ``locally_ejected``,
        ``exporter`` (the URL that answered last) and ``exporter_up``; reports ``sent``,
        ``refused`` (answered non-2xx) and ``dropped`` (no exporter answered, or queue full)."""
        out: dict[str, Any] = self._replay.stats()
        local, rep = self._local, self._reporter
        table = local.table if local is not None else None
        out.update({
            "local_routing": table is not None,
            "table_version": table.version if table is not None else None,
            "table_age_seconds": local.age() if local is not None else None,
            "table_updates": local.updates if local is not None else 0,
            "locally_ejected": local.ejected() if local is not None else [],
            "exporter": self.base_url, "exporter_up": self._exporters.up,
            "reports_sent": rep.sent, "reports_refused": rep.refused,
            "reports_dropped": rep.dropped,
        })
        return out

    # --- routing ---------------------------------------------------------------------------

    async def route(self, key: str | None = None, region: str | None = None) -> dict[str, Any]:
        """One routing decision ``{"master", "url", "strategy"}``. For send() it comes from the
        routing table when local routing holds one. Asked directly, it is the exporter's own
        (GET /api/v1/route), or the table's while no exporter answers. Raises RouteUnavailable
        (ExporterUnreachable when no exporter answered) or RequestRejected (a bad region)."""
        local = self._local
        if local is not None:
            local.start()
            if _FOR_SEND.get():
                await local.ready(self.timeout)
                if local.table is not None:
                    return local.decide(key, region)
        try:
            return await self._ask(key, region)
        except ExporterUnreachable:
            if local is not None and local.table is not None:
                return local.decide(key, region)
            raise

    async def _ask(self, key: str | None, region: str | None) -> dict[str, Any]:
        params = {k: v for k, v in (("key", key), ("region", region)) if v}
        failure: BaseException | None = None
        for i in self._exporters.order():
            base = self._exporters.urls[i]
            try:
                async with self._http().get(f"{base}/api/v1/route", params=params,
                                            timeout=self._timeout) as resp:
                    status, body = resp.status, await read_capped(resp, MAX_INFO_BODY)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                failure = exc
                continue
            self._exporters.answered(i)
            if status == 200:
                try:
                    decision = json.loads(body)
                except ValueError:
                    decision = None
                if not isinstance(decision, dict) or not {"master", "url"} <= decision.keys():
                    raise RouteUnavailable(f"invalid routing answer: {body[:200]!r}")
                return decision
            if 400 <= status < 500:
                raise RequestRejected(status, error_text(body))
            raise RouteUnavailable(f"{status}: {error_text(body)}")
        raise ExporterUnreachable(f"exporter unreachable: {failure!r}")

    # --- reports ---------------------------------------------------------------------------

    async def report(self, master: str, ok: bool, latency_seconds: float) -> bool:
        """Tell an exporter how a routed message went; False if no exporter took it."""
        return await self._post_report(master, ok, latency_seconds) == "sent"

    async def _post_report(self, master: str, ok: bool, latency_seconds: float) -> Outcome:
        payload = {"master": master, "ok": ok, "latency_seconds": round(latency_seconds, 6)}
        for i in self._exporters.order():
            base = self._exporters.urls[i]
            try:
                async with self._http().post(f"{base}/api/v1/route/report", json=payload,
                                             headers=self._headers, timeout=self._timeout) as r:
                    await read_capped(r, MAX_INFO_BODY)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.debug("report for %s to %s lost: %r", master, base, exc)
                continue
            self._exporters.answered(i)
            if r.status < 300:
                return "sent"
            log.debug("report for %s refused: %s", master, r.status)
            return "refused"
        return "lost"

    async def _outcome(self, master: str, ok: bool, latency: float) -> None:
        """Routing locally: count it there and report in the background. Asking per message:
        report first, so the exporter has it before the next decision it makes for us."""
        local = self._local
        if local is not None and local.table is not None:
            local.outcome(master, ok)
            self._reporter.submit(master, ok, latency)
        else:
            self._reporter.count(await self._post_report(master, ok, latency))

    # --- delivery --------------------------------------------------------------------------

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
        if self.replay and self._sync_task is None:
            self._sync_task = asyncio.create_task(self._sync_loop(), name="client-replay-sync")
        failures: list[Attempt] = []
        for attempt in range(1, self.attempts + 1):
            if attempt > 1 and self.backoff:
                await asyncio.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 2)))
            token = _FOR_SEND.set(True)
            try:
                decision = await self.route(key, region)
            except RouteUnavailable as exc:
                failures.append(Attempt(None, exc.reason))
                continue
            finally:
                _FOR_SEND.reset(token)
            master, url = str(decision["master"]), str(decision["url"])
            started = time.monotonic()
            try:
                status, body = await self._post_message(url, data)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                await self._outcome(master, False, time.monotonic() - started)
                failures.append(Attempt(master, f"{type(exc).__name__}: {exc}".rstrip(": ")))
                continue
            latency = time.monotonic() - started
            if 200 <= status < 300:
                await self._outcome(master, True, latency)
                try:
                    response: Any = json.loads(body) if body else None
                except ValueError:
                    response = body.decode(errors="replace")
                if self.replay:
                    self._replay.hold(master, url, message_id, response, data)
                return {"id": message_id, "master": master, "url": decision["url"],
                        "strategy": decision.get("strategy"), "attempts": attempt,
                        "response": response}
            if status >= 500 or status in RETRYABLE_STATUS:
                await self._outcome(master, False, latency)
                failures.append(Attempt(master, f"HTTP {status}: {error_text(body)}"))
                continue
            await self._outcome(master, True, latency)  # it answered properly; the message is bad
            raise RequestRejected(status, error_text(body), master)
        raise DeliveryFailed(message_id, failures)

    async def _post_message(self, url: str, data: bytes) -> tuple[int, bytes]:
        async with self._http().post(f"{url.rstrip('/')}/messages", data=data,
                                     headers=JSON_HEADERS, timeout=self._timeout) as resp:
            return resp.status, await read_capped(resp, MAX_INFO_BODY)

    # --- replay after a failover -----------------------------------------------------------

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
        """Check the exporter's failover records now and re-send what a finished failover or
        switchover left out (see exporter.client.replay); how many messages were re-sent."""
        return await self._replay.sync()

    async def _get_json(self, url: str) -> dict[str, Any]:
        """A JSON object from a 2xx answer of at most MAX_INFO_BODY bytes; ValueError else.
        The token goes to the exporters only, never to a master."""
        headers = self._headers if self._exporters.owns(url) else {}
        async with self._http().get(url, headers=headers, timeout=self._timeout) as resp:
            if not 200 <= resp.status < 300:
                raise ValueError(f"GET {url}: HTTP {resp.status}")
            body = await read_capped(resp, MAX_INFO_BODY)
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError(f"GET {url}: not a JSON object")
        return data
