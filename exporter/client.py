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
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

# Master answers worth retrying elsewhere; any other 4xx means the message itself is refused.
RETRYABLE_STATUS = frozenset({408, 425, 429})


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
        super().__init__(
            f"message {message_id} not delivered after {len(attempts)} attempts ({tried})"
        )
        self.message_id = message_id
        self.attempts = attempts


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
    (it is then not closed here); ``token`` is sent as a bearer token on reports."""

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
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        if timeout <= 0:
            raise ValueError("timeout must be greater than 0")
        self.base_url = base_url.rstrip("/")
        self.attempts = attempts
        self.backoff = max(0.0, backoff)
        self.max_backoff = max(0.0, max_backoff)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> Client:
        self._http()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client created it."""
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
            self._own_session = True
        return self._session

    async def route(self, key: str | None = None, region: str | None = None) -> dict[str, Any]:
        """One routing decision ``{"master", "url", "strategy"}``."""
        params = {k: v for k, v in (("key", key), ("region", region)) if v}
        try:
            async with self._http().get(
                f"{self.base_url}/api/v1/route", params=params, timeout=self._timeout
            ) as resp:
                body = await resp.read()
                status = resp.status
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
            async with self._http().post(
                f"{self.base_url}/api/v1/route/report",
                json=payload,
                headers=self._headers,
                timeout=self._timeout,
            ) as resp:
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
        failures: list[Attempt] = []
        for attempt in range(1, self.attempts + 1):
            if attempt > 1 and self.backoff:
                await asyncio.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 2)))
            try:
                decision = await self.route(key, region)
            except RouteUnavailable as exc:
                failures.append(Attempt(None, exc.reason))
                continue
            master = str(decision["master"])
            started = time.monotonic()
            try:
                async with self._http().post(
                    f"{str(decision['url']).rstrip('/')}/messages",
                    json=msg,
                    timeout=self._timeout,
                ) as resp:
                    body = await resp.read()
                    status = resp.status
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
                return {
                    "id": message_id,
                    "master": master,
                    "url": decision["url"],
                    "strategy": decision.get("strategy"),
                    "attempts": attempt,
                    "response": response,
                }
            if status >= 500 or status in RETRYABLE_STATUS:
                await self.report(master, False, latency)
                failures.append(Attempt(master, f"HTTP {status}: {_error_text(body)}"))
                continue
            await self.report(master, True, latency)  # it answered properly; the message is bad
            raise RequestRejected(status, _error_text(body), master)
        raise DeliveryFailed(message_id, failures)
