"""An asyncio etcd v3 client over etcd's own JSON gateway (``POST /v3/...``).

The gateway speaks HTTP with JSON bodies (keys and values in base64), which is all the few
calls here need (leases, a txn, a watch): no grpc/protobuf dependency, the way Patroni talks
to etcd over HTTP. What the gateway does, as checked against etcd 3.4:

* int64 fields are JSON strings (``"revision": "2"``) and zero, false and empty fields are
  left out (an empty value, ``succeeded`` of a failed txn, the TTL of a gone lease);
* a refused call is a non-200 answer ``{"error", "message", "code"}`` (gRPC codes: 5 not
  found, 11 compacted, 14 unavailable); on a stream, a line ``{"error": ...}``;
* stream endpoints answer newline-delimited ``{"result": ...}`` lines. ``lease/keepalive``
  answers one line per request line and ends when the request body does, so one POST is one
  keepalive; a gone lease is answered without a TTL. A ``watch`` stays open after its one
  request: a ``created`` line, then one line per batch of events; a compacted start revision
  is a ``canceled`` line with ``compact_revision``.

Every answer is untrusted: read up to ``max_answer_bytes`` (a stream: per line), parsed
strictly and checked field by field, so a broken or foreign answer is an ``EtcdError`` naming
the endpoint and the field, never a KeyError. Each call tries each endpoint at most once, each
attempt bounded by ``timeout``: a connection error, a timeout or "unavailable" (a member
without leader) moves on to the next endpoint, which is then kept for the next calls. After a
timeout a mutation may still have been applied by the member that did not answer, so a retry
on the next endpoint can see its own write: txn compares should tolerate that.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from exporter.cluster.etcdtypes import (
    REQUEST_HEADERS,
    Compacted,
    Compare,
    Delete,
    EtcdError,
    KeyValue,
    LeaseLost,
    Put,
    T,
    TxnResult,
    WatchEvent,
    _Failure,
    _invalid,
)
from exporter.cluster.etcdwire import (
    _b64,
    _bool,
    _check_status,
    _compare,
    _describe,
    _dump,
    _int,
    _json_object,
    _kvs,
    _Lines,
    _op,
    _range,
    _read,
    _refused_in_answer,
    _revision,
    _stream_result,
    _watch_events,
)

__all__ = ["Compacted", "Compare", "Delete", "Etcd", "EtcdError", "KeyValue", "LeaseLost", "Put",
           "TxnResult", "WatchEvent"]

log = logging.getLogger(__name__)

class _Endpoint:
    """One etcd member: its URL as configured, and the session that reaches it."""

    def __init__(self, spec: str) -> None:
        self.name = spec
        self.socket: str | None = None
        if spec.startswith("unix://"):
            self.socket = spec.removeprefix("unix://")  # the path may contain ':'
            if not self.socket.startswith("/"):
                raise ValueError(f"etcd endpoint {spec!r}: a socket is unix:///absolute/path")
            self.base = "http://localhost"
        else:
            parts = urlsplit(spec)
            if parts.scheme not in ("http", "https") or not parts.hostname \
                    or parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ValueError(
                    f"etcd endpoint {spec!r}: expected http://host:port or unix:///path")
            self.base = f"{parts.scheme}://{parts.netloc}"
        self._session: aiohttp.ClientSession | None = None

    def http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector: aiohttp.BaseConnector = (
                aiohttp.UnixConnector(path=self.socket) if self.socket else aiohttp.TCPConnector())
            # Deadlines are ours (asyncio.timeout per attempt); a watch has none in total.
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None), headers=REQUEST_HEADERS)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class Etcd:
    """A client of one etcd cluster. ``endpoints``: ``http://host:port`` or
    ``unix:///absolute/path`` (the path may contain ':'). ``timeout`` bounds each attempt, so
    a call takes at most ``timeout`` x the number of endpoints. Close it with ``close()``."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 2.0,
                 max_answer_bytes: int = 32 * 1024 * 1024) -> None:
        if isinstance(endpoints, str) or not endpoints:
            raise ValueError("etcd endpoints: a non-empty list of URLs")
        if timeout <= 0 or max_answer_bytes <= 0:
            raise ValueError("etcd timeout and max_answer_bytes must be positive")
        self._endpoints = [_Endpoint(e) for e in endpoints]
        self._current = 0
        self.timeout = timeout
        self.max_answer_bytes = max_answer_bytes

    async def __aenter__(self) -> Etcd:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        for ep in self._endpoints:
            await ep.close()

    # --- leases ----------------------------------------------------------------------------

    async def grant(self, ttl: float) -> int:
        """A new lease of ``ttl`` seconds (rounded up, at least 1; etcd may raise it to its
        minimum); its id."""
        def parse(answer: dict[str, Any]) -> int:
            _refused_in_answer(answer)
            lease = _int(answer, "ID", required=True)
            if lease <= 0:
                raise _invalid(f"lease ID {lease}")
            return lease

        seconds = max(1, math.ceil(ttl))
        return await self._unary("grant", "/v3/lease/grant", {"TTL": str(seconds)}, parse)

    async def keepalive(self, lease: int) -> float:
        """Refresh ``lease``; its remaining TTL in seconds. LeaseLost when it is gone."""
        data = _dump({"ID": str(lease)})

        async def attempt(ep: _Endpoint) -> float:
            async def call() -> bytes | None:
                async with ep.http().post(ep.base + "/v3/lease/keepalive", data=data) as resp:
                    await _check_status(resp)
                    return await _Lines(resp.content, self.max_answer_bytes).next()

            line = await self._bounded(call)
            if line is None:
                raise _Failure("the keepalive stream ended without an answer", retry=True)
            result = _stream_result(_json_object(line))
            if _int(result, "ID", "result.") != lease:
                raise _invalid(f"result.ID {result.get('ID')!r:.40} is not lease {lease}")
            ttl = _int(result, "TTL", "result.")
            if ttl <= 0:
                raise _Failure(f"lease {lease} is gone (keepalive answered TTL {ttl})",
                               LeaseLost)
            return float(ttl)

        return await self._failover(f"keepalive of lease {lease}", attempt)

    async def revoke(self, lease: int) -> None:
        """Revoke ``lease``, deleting its keys; a lease already gone is fine."""
        try:
            await self._unary(f"revoke of lease {lease}", "/v3/lease/revoke",
                              {"ID": str(lease)}, _revision)
        except LeaseLost:
            pass

    # --- keys ------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        def parse(answer: dict[str, Any]) -> KeyValue | None:
            _revision(answer)
            kvs = _kvs(answer)
            if len(kvs) > 1 or (kvs and kvs[0].key != key):
                raise _invalid(f"asked for one key {key!r}, got {[kv.key for kv in kvs]!r:.200}")
            return kvs[0] if kvs else None

        return await self._unary(f"get {key!r}", "/v3/kv/range", {"key": _b64(key)}, parse)

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix``, sorted by key, and the revision they were read at."""
        def parse(answer: dict[str, Any]) -> tuple[list[KeyValue], int]:
            revision = _revision(answer)
            kvs = _kvs(answer)
            if _bool(answer, "more"):
                raise _invalid("more=true to a range without limit")
            for kv in kvs:
                if not kv.key.startswith(prefix):
                    raise _invalid(f"key {kv.key!r} is not under {prefix!r}")
            return sorted(kvs, key=lambda kv: kv.key), revision

        return await self._unary(f"get_prefix {prefix!r}", "/v3/kv/range",
                                 _range(prefix, True), parse)

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Set ``key``; the revision of the write. LeaseLost if ``lease`` is gone."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return await self._unary(f"put {key!r}", "/v3/kv/put", body, _revision)

    async def delete(self, key: str, prefix: bool = False) -> int:
        """Delete ``key`` (every key under it with ``prefix``); the revision after it."""
        return await self._unary(f"delete {key!r}", "/v3/kv/deleterange",
                                 _range(key, prefix), _revision)

    async def txn(self, compares: Sequence[Compare], success: Sequence[Put | Delete],
                  failure: Sequence[Put | Delete] = ()) -> TxnResult:
        """If every compare holds, apply ``success``, else ``failure``, atomically."""
        body = {
            "compare": [_compare(c) for c in compares],
            "success": [_op(o) for o in success],
            "failure": [_op(o) for o in failure],
        }

        def parse(answer: dict[str, Any]) -> TxnResult:
            return TxnResult(_bool(answer, "succeeded"), _revision(answer))

        return await self._unary("txn", "/v3/kv/txn", body, parse)

    # --- watch -----------------------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Each batch of changes under ``prefix`` from ``start_revision`` on, in order.

        It ends only by raising: EtcdError when the stream breaks (restart from the last
        mod_revision seen + 1), Compacted when ``start_revision`` is gone. Opening (up to etcd's
        ``created``) is bounded by ``timeout``; after that nothing is, so a hung member is
        noticed by the caller cancelling. Close it early with ``contextlib.aclosing``.
        """
        request = {"create_request": {**_range(prefix, True),
                                      "start_revision": str(start_revision)}}
        data = _dump(request)
        what = f"watch {prefix!r} from {start_revision}"

        async def attempt(ep: _Endpoint) -> tuple[_Endpoint, aiohttp.ClientResponse, _Lines,
                                                  list[WatchEvent]]:
            async def call() -> tuple[aiohttp.ClientResponse, _Lines, bytes | None]:
                resp = await ep.http().post(ep.base + "/v3/watch", data=data)
                try:
                    await _check_status(resp)
                    lines = _Lines(resp.content, self.max_answer_bytes)
                    return resp, lines, await lines.next()
                except BaseException:
                    resp.close()
                    raise

            resp, lines, first = await self._bounded(call)
            try:
                if first is None:
                    raise _Failure("the stream ended before etcd created the watch", retry=True)
                return ep, resp, lines, _watch_events(first, start_revision)
            except BaseException:
                resp.close()
                raise

        ep, resp, lines, events = await self._failover(what, attempt)
        where = f"{what} on {ep.name}"
        try:
            while True:
                if events:
                    yield events
                try:
                    line = await lines.next()
                    if line is None:
                        raise _Failure("the stream ended")
                    events = _watch_events(line, start_revision)
                except _Failure as exc:
                    raise exc.public(where) from None
                except (aiohttp.ClientError, OSError) as exc:
                    raise EtcdError(f"{where}: the stream broke: {_describe(exc)}") from None
        finally:
            resp.close()

    # --- plumbing --------------------------------------------------------------------------

    async def _unary(self, what: str, path: str, body: dict[str, Any],
                     parse: Callable[[dict[str, Any]], T]) -> T:
        """POST ``body`` to ``path``; the answer through ``parse`` (which may raise _Failure)."""
        data = _dump(body)

        async def attempt(ep: _Endpoint) -> T:
            async def call() -> bytes:
                async with ep.http().post(ep.base + path, data=data) as resp:
                    await _check_status(resp)
                    return await _read(resp, self.max_answer_bytes)

            return parse(_json_object(await self._bounded(call)))

        return await self._failover(what, attempt)

    async def _bounded(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` within ``timeout``; transport failures as a _Failure to retry elsewhere."""
        try:
            async with asyncio.timeout(self.timeout):
                return await call()
        except TimeoutError:
            raise _Failure(f"no answer within {self.timeout:g}s", retry=True) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            raise _Failure(f"connection failed: {_describe(exc)}", retry=True) from None
        except aiohttp.ClientError as exc:  # e.g. an answer that is not HTTP
            raise _Failure(f"bad HTTP answer: {_describe(exc)}") from None

    async def _failover(self, what: str, attempt: Callable[[_Endpoint], Awaitable[T]]) -> T:
        """``attempt`` on each endpoint once, the last one that worked first, until one does
        or fails in a way another endpoint would not fix."""
        failures: list[str] = []
        count = len(self._endpoints)
        for step in range(count):
            index = (self._current + step) % count
            ep = self._endpoints[index]
            try:
                result = await attempt(ep)
            except _Failure as exc:
                if not exc.retry:
                    raise exc.public(f"{what} on {ep.name}") from None
                failures.append(f"{ep.name}: {exc.reason}")
                continue
            if index != self._current:
                log.debug("etcd: switching to %s (%s)", ep.name, "; ".join(failures))
                self._current = index
            return result
        raise EtcdError(f"{what}: " + "; ".join(failures))


