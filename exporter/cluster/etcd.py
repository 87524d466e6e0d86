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
import base64
import binascii
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import aiohttp
from aiohttp import hdrs

log = logging.getLogger(__name__)

T = TypeVar("T")

READ_CHUNK = 65_536
#: Of a refusal only this much is read: its message is all we keep.
ERROR_BODY_BYTES = 4096
#: gRPC status codes the gateway passes on.
UNAVAILABLE = 14
LEASE_NOT_FOUND = "requested lease not found"
REQUEST_HEADERS: dict[str, str] = {
    hdrs.CONTENT_TYPE: "application/json",
    hdrs.ACCEPT_ENCODING: "identity",  # a compressed answer is refused, never inflated
}
_INT = re.compile(r"-?[0-9]{1,20}")
_TARGETS = {
    "create": ("CREATE", "create_revision"),
    "mod": ("MOD", "mod_revision"),
    "version": ("VERSION", "version"),
    "value": ("VALUE", "value"),
    "lease": ("LEASE", "lease"),
}
_RESULTS = {"equal": "EQUAL", "greater": "GREATER", "less": "LESS", "not_equal": "NOT_EQUAL"}


class EtcdError(Exception):
    """An etcd call failed: unreachable, timed out, a bad or oversized answer, or refused.
    The message names the call, the endpoint and why."""


class LeaseLost(EtcdError):
    """The lease is gone (expired or revoked): whatever was held under it is lost."""


class Compacted(EtcdError):
    """A watch's start revision was compacted; ``compact_revision`` is the oldest one etcd
    still has (0 if it did not say). The caller must re-read, then watch from there."""

    def __init__(self, message: str, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A put or a delete; a delete's ``kv`` has value b"" and, as etcd sends it, the delete's
    own revision as ``mod_revision``."""

    kind: Literal["put", "delete"]
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class Compare:
    """One txn condition: ``target`` of ``key`` compared to ``value`` (bytes for "value",
    an int otherwise; create revision 0 means "absent")."""

    key: str
    target: Literal["create", "mod", "version", "value", "lease"]
    value: int | bytes
    result: Literal["equal", "greater", "less", "not_equal"] = "equal"

    def __post_init__(self) -> None:
        if self.target not in _TARGETS:
            raise ValueError(f"Compare target {self.target!r}: one of {sorted(_TARGETS)}")
        if self.result not in _RESULTS:
            raise ValueError(f"Compare result {self.result!r}: one of {sorted(_RESULTS)}")
        want_bytes = self.target == "value"
        is_int = isinstance(self.value, int) and not isinstance(self.value, bool)
        if want_bytes != isinstance(self.value, bytes) or (not want_bytes and not is_int):
            kind = "bytes" if want_bytes else "an int"
            raise ValueError(f"Compare on {self.target!r} needs {kind}, not {self.value!r}")


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int


class _Failure(Exception):
    """Why one endpoint failed one call, before the call and the endpoint are named.
    ``retry``: another endpoint may do (connection, timeout, unavailable)."""

    def __init__(self, reason: str, kind: type[EtcdError] = EtcdError, *, retry: bool = False,
                 compact_revision: int = 0) -> None:
        super().__init__(reason)
        self.reason, self.kind, self.retry = reason, kind, retry
        self.compact_revision = compact_revision

    def public(self, where: str) -> EtcdError:
        message = f"{where}: {self.reason}"
        if self.kind is Compacted:
            return Compacted(message, self.compact_revision)
        return self.kind(message)


def _invalid(what: str) -> _Failure:
    return _Failure(f"invalid answer: {what}")


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


class _Lines:
    """The newline-delimited messages of a streamed answer, each at most ``cap`` bytes."""

    def __init__(self, content: aiohttp.StreamReader, cap: int) -> None:
        self.content, self.cap = content, cap
        self.buf = bytearray()
        self.scanned = 0  # bytes of buf known to hold no newline

    async def next(self) -> bytes | None:
        """The next non-blank message; None at the end of the stream."""
        while True:
            end = self.buf.find(b"\n", self.scanned)
            if end > self.cap or (end < 0 and len(self.buf) > self.cap):
                raise _Failure(f"a streamed message over {self.cap} bytes")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 1]
                self.scanned = 0
                if line.strip():
                    return line
                continue
            self.scanned = len(self.buf)
            chunk = await self.content.readany()
            if not chunk:
                rest, self.buf = bytes(self.buf), bytearray()
                return rest if rest.strip() else None
            self.buf += chunk


async def _read(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The whole body, refused once over ``cap`` bytes."""
    if resp.content_length is not None and resp.content_length > cap:
        raise _Failure(f"answer of {resp.content_length} bytes, over the {cap} bytes cap")
    body = bytearray()
    while chunk := await resp.content.read(READ_CHUNK):
        body += chunk
        if len(body) > cap:
            raise _Failure(f"answer over the {cap} bytes cap")
    return bytes(body)


async def _check_status(resp: aiohttp.ClientResponse) -> None:
    """Nothing for a 200; else the refusal, with etcd's message."""
    if resp.status == 200:
        if resp.headers.get(hdrs.CONTENT_ENCODING, "identity") != "identity":
            raise _Failure(f"compressed answer ({resp.headers[hdrs.CONTENT_ENCODING]})")
        return
    body = await resp.content.read(ERROR_BODY_BYTES)
    message, code = body.decode(errors="replace").strip()[:200], None
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        answer = None
    if isinstance(answer, dict):
        message, code = _error_text(answer)
    raise _refusal(f"HTTP {resp.status}", message, code, resp.status == 503)


def _refusal(status: str, message: str, code: int | None, unavailable: bool = False
             ) -> _Failure:
    kind = LeaseLost if LEASE_NOT_FOUND in message else EtcdError
    suffix = f" (gRPC code {code})" if code is not None else ""
    return _Failure(f"etcd refused ({status}): {message or 'no message'}{suffix}", kind,
                    retry=unavailable or code == UNAVAILABLE)


def _error_text(answer: dict[str, Any]) -> tuple[str, int | None]:
    """(message, gRPC code) of an error object, in either of the gateway's shapes."""
    error = answer.get("error")
    if isinstance(error, dict):  # a stream's {"error": {"grpc_code", "message", ...}}
        answer, error = error, None
    message = answer.get("message")
    text = message if isinstance(message, str) else error if isinstance(error, str) else ""
    code = answer.get("code", answer.get("grpc_code"))
    ok = isinstance(code, int) and not isinstance(code, bool)
    return text[:200], code if ok else None


def _refused_in_answer(answer: dict[str, Any]) -> None:
    """A 200 answer that carries an error string (LeaseGrantResponse.error)."""
    error = answer.get("error")
    if error:
        message, code = _error_text(answer)
        raise _refusal("200", message or str(error)[:200], code)


def _stream_result(message: dict[str, Any]) -> dict[str, Any]:
    """The ``result`` of one streamed line, or the error it carries."""
    if "error" in message:
        text, code = _error_text(message)
        raise _refusal("stream", text, code)
    return _object(message.get("result"), "result")


def _watch_events(line: bytes, start_revision: int) -> list[WatchEvent]:
    """The events of one watch line ([] for created and progress lines)."""
    result = _stream_result(_json_object(line))
    compacted = _int(result, "compact_revision", "result.")
    if compacted > 0:
        raise _Failure(f"start revision {start_revision} is compacted (etcd keeps revisions "
                       f"from {compacted} on)", Compacted, compact_revision=compacted)
    if _bool(result, "canceled", "result."):
        reason = result.get("cancel_reason")
        raise _Failure(f"etcd canceled the watch: {reason if isinstance(reason, str) else '?'}")
    events = result.get("events", [])
    if not isinstance(events, list):
        raise _invalid("result.events is not a list")
    out = []
    for i, item in enumerate(events):
        event = _object(item, f"events[{i}]")
        kind = event.get("type", "PUT")
        if kind not in ("PUT", "DELETE", 0, 1):
            raise _invalid(f"events[{i}].type {kind!r}")
        kv = _kv(event.get("kv"), f"events[{i}].kv")
        out.append(WatchEvent("put" if kind in ("PUT", 0) else "delete", kv))
    return out


# --- the shapes of requests and answers ----------------------------------------------------


def _dump(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _range(key: str, prefix: bool) -> dict[str, str]:
    """``key``, or with ``prefix`` every key that starts with it ("" is every key)."""
    raw = key.encode()
    if not prefix:
        return {"key": _b64(raw)}
    end = raw.rstrip(b"\xff")
    if not end:  # "" or all 0xff: up to the end of the keyspace
        return {"key": _b64(raw or b"\0"), "range_end": _b64(b"\0")}
    return {"key": _b64(raw), "range_end": _b64(end[:-1] + bytes([end[-1] + 1]))}


def _compare(c: Compare) -> dict[str, str]:
    target, field = _TARGETS[c.target]
    value = _b64(c.value) if isinstance(c.value, bytes) else str(c.value)
    return {"key": _b64(c.key), "target": target, "result": _RESULTS[c.result], field: value}


def _op(op: Put | Delete) -> dict[str, Any]:
    if isinstance(op, Put):
        put: dict[str, str] = {"key": _b64(op.key), "value": _b64(op.value)}
        if op.lease:
            put["lease"] = str(op.lease)
        return {"request_put": put}
    return {"request_delete_range": _range(op.key, op.prefix)}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"not JSON ({exc}): {raw[:80]!r}") from None
    return _object(answer, "the answer")


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(f"{path} is not an object: {value!r:.80}")
    return value


def _int(obj: dict[str, Any], name: str, path: str = "", *, required: bool = False) -> int:
    """An int64 field: a JSON string of digits (or a number); absent is 0 unless required."""
    value = obj.get(name)
    if value is None:
        if required:
            raise _invalid(f"{path}{name} is missing")
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INT.fullmatch(value):
        return int(value)
    raise _invalid(f"{path}{name} is not an integer: {value!r:.80}")


def _bool(obj: dict[str, Any], name: str, path: str = "") -> bool:
    value = obj.get(name, False)
    if not isinstance(value, bool):
        raise _invalid(f"{path}{name} is not a boolean: {value!r:.80}")
    return value


def _bytes(obj: dict[str, Any], name: str, path: str, *, required: bool = False) -> bytes:
    value = obj.get(name)
    if value is None and not required:
        return b""
    if not isinstance(value, str):
        raise _invalid(f"{path}.{name} is not a base64 string: {value!r:.80}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"{path}.{name} is not base64: {value!r:.80}") from None


def _revision(answer: dict[str, Any]) -> int:
    """The answer's header revision: the store's revision when the call was applied."""
    revision = _int(_object(answer.get("header"), "header"), "revision", "header.",
                    required=True)
    if revision <= 0:
        raise _invalid(f"header.revision {revision}")
    return revision


def _kvs(answer: dict[str, Any]) -> list[KeyValue]:
    kvs = answer.get("kvs", [])
    if not isinstance(kvs, list):
        raise _invalid("kvs is not a list")
    return [_kv(item, f"kvs[{i}]") for i, item in enumerate(kvs)]


def _kv(value: Any, path: str) -> KeyValue:
    obj = _object(value, path)
    try:
        key = _bytes(obj, "key", path, required=True).decode()
    except UnicodeDecodeError:
        raise _invalid(f"{path}.key is not UTF-8") from None
    ints = {name: _int(obj, name, f"{path}.")
            for name in ("create_revision", "mod_revision", "version", "lease")}
    return KeyValue(key, _bytes(obj, "value", path), **ints)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
