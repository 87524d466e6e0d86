"""Client side of the master protocol, as the failover orchestrator uses it.

Every call has its own timeout and fails with one exception type, ``MasterCallError``, whose
message says which master, which call and why (timeout, connection, HTTP status with the
master's own error text, invalid JSON, checksum mismatch, a stale fencing epoch, a body too
large or compressed): that text goes verbatim into the failover record, so an operator reading
the audit trail needs nothing else. Its ``kind`` is the same failure as one of a few fixed
words, for metrics.

Every control call (import, drop, activate, deactivate) carries the exporter's fencing epoch in
``X-HA-Epoch``; a master that has obeyed a newer controller answers 409 ``stale epoch`` and the
call fails as ``StaleEpoch``. docs/protocol.md is the normative description of all of it.

A master is not trusted with the exporter's memory: no call follows a redirect (a 3xx fails
naming its status), none accepts a compressed answer (a small gzip body can inflate to
gigabytes), and every body is read in chunks up to a cap (``max_state_bytes`` for a snapshot,
``ANSWER_BYTES`` for the other answers), refused early when its Content-Length is over it.

Snapshots travel as the raw bytes the source sent: the checksum is verified once on receipt and
the same bytes are forwarded to the backup, so a 10 MB state is read without a copy, parsed
once and never re-encoded whole (parsing of big bodies runs in a worker thread).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import aiohttp
from aiohttp import hdrs

BIG_BODY = 256 * 1024  # above this, JSON parsing and hashing leave the event loop
STORED_KEYS = ("sessions", "pending_messages", "config", "imported")
EPOCH_HEADER = "X-HA-Epoch"
STALE_EPOCH = "stale epoch"  # the ``error`` of a master's 409 to a lower epoch
#: The default of ``failover.max_state_bytes``: the biggest snapshot read from a master.
DEFAULT_MAX_STATE_BYTES = 64 * 1024 * 1024
#: Cap of every answer that is not a snapshot; the same the conformance check applies, with
#: room for an /activate or /health answer that lists thousands of duties.
ANSWER_BYTES = 1024 * 1024
#: Of an error answer only this much is read: its text is cut to 200 characters anyway.
ERROR_BODY_BYTES = 4096
READ_CHUNK = 65_536
MAX_ETAG = 512  # a longer ETag is ignored (treated as none), never sent back
#: Sent with every call: a compressed answer is refused rather than inflated.
REQUEST_HEADERS: dict[str, str] = {hdrs.ACCEPT_ENCODING: "identity"}

FailureKind = Literal["timeout", "connect_error", "http_error", "too_large", "invalid",
                      "checksum"]
FAILURE_KINDS: tuple[FailureKind, ...] = get_args(FailureKind)


class MasterCallError(Exception):
    """A master protocol call failed; ``str()`` is the reason for the record, ``kind`` the
    failure as one of ``FAILURE_KINDS`` (default: ``http_error`` with a status, else
    ``invalid``)."""

    def __init__(self, master: str, op: str, reason: str, status: int | None = None,
                 kind: FailureKind | None = None) -> None:
        super().__init__(f"{op} on {master}: {reason}")
        self.master = master
        self.op = op
        self.reason = reason
        self.status = status
        self.kind: FailureKind = kind or ("http_error" if status is not None else "invalid")


class StaleEpoch(MasterCallError):
    """The master has obeyed a higher epoch than ours: another controller is in charge, and
    retrying with this exporter's epoch can never succeed."""


def snapshot_checksum(snapshot: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``snapshot`` without its ``checksum`` key (the
    protocol's definition, identical to the simulated master's)."""
    body = {k: v for k, v in snapshot.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_BATCH = 1024  # items of an object or array encoded at once while hashing


def _canonical(value: Any) -> bytes:
    return _CANONICAL.encode(value).encode("ascii")  # ensure_ascii: the text is pure ASCII


def _canonical_chunks(value: Any) -> Iterator[bytes]:
    """The canonical JSON of ``value`` in pieces of ``_BATCH`` items of an object or array:
    the same bytes as ``_canonical(value)``, but no more than one batch's encoding is held at
    once (the sessions of a 64 MiB snapshot are not encoded into a second 64 MiB)."""
    if isinstance(value, dict) and value:
        keys = sorted(value)
        for i in range(0, len(keys), _BATCH):
            yield b"," if i else b"{"
            yield _canonical({k: value[k] for k in keys[i:i + _BATCH]})[1:-1]
        yield b"}"
    elif isinstance(value, list) and value:
        for i in range(0, len(value), _BATCH):
            yield b"," if i else b"["
            yield _canonical(value[i:i + _BATCH])[1:-1]
        yield b"]"
    else:
        yield _canonical(value)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A verified state snapshot: raw bytes to forward, the checksum it claims and matches."""

    raw: bytes
    checksum: str
    master: str | None
    sessions: int | None = None
    pending_messages: int | None = None
    # checksums a backup may answer for a faithful import: the snapshot's own, or that of
    # the form the simulated master keeps (sessions, pending_messages, config, imported)
    import_checksums: frozenset[str] = frozenset()
    etag: str | None = None  # the master's ETag of this state, for a conditional next read

    @property
    def size(self) -> int:
        return len(self.raw)


def _count(value: Any) -> int | None:
    return len(value) if isinstance(value, list | dict) else None


def parse_snapshot(raw: bytes, who: str = "?", op: str = "get_state") -> Snapshot:
    """Parse and verify a snapshot; CPU-bound (run big ones in a thread). Both checksums are
    hashed in one pass, batch by batch, and each top-level value is released once hashed:
    besides ``raw`` and the text json.loads decodes it to while parsing, only the parsed tree
    is held, and it shrinks as the pass goes."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MasterCallError(who, op, f"snapshot is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("checksum"), str):
        raise MasterCallError(who, op, "snapshot has no checksum")
    claimed: str = data.pop("checksum")
    master = data.get("master")
    counts: dict[str, int | None] = {}
    whole, kept = hashlib.sha256(b"{"), hashlib.sha256(b"{")
    kept_any = False
    for i, key in enumerate(sorted(data)):
        value = data.pop(key)
        counts[key] = _count(value)
        if i:
            whole.update(b",")
        hashers = [whole]
        if key in STORED_KEYS:
            if kept_any:
                kept.update(b",")
            kept_any = True
            hashers.append(kept)
        name = _canonical(key) + b":"
        for h in hashers:
            h.update(name)
        for chunk in _canonical_chunks(value):
            for h in hashers:
                h.update(chunk)
    whole.update(b"}")
    kept.update(b"}")
    actual = whole.hexdigest()
    if actual != claimed:
        raise MasterCallError(
            who, op, f"snapshot checksum mismatch: claims {claimed[:12]}…, "
            f"content hashes to {actual[:12]}…", kind="checksum")
    return Snapshot(raw=raw, checksum=actual, master=master,
                    sessions=counts.get("sessions"),
                    pending_messages=counts.get("pending_messages"),
                    import_checksums=frozenset({actual, kept.hexdigest()}))


async def parse_snapshot_async(raw: bytes, who: str = "?", op: str = "get_state") -> Snapshot:
    if len(raw) < BIG_BODY:
        return parse_snapshot(raw, who, op)
    return await asyncio.to_thread(parse_snapshot, raw, who, op)


class _Answer(NamedTuple):
    status: int
    body: bytes  # empty for a 304
    etag: str | None


def _etag_of(resp: aiohttp.ClientResponse) -> str | None:
    """The answer's ETag when it can be sent back as is: printable ASCII, bounded, not ``*``
    (which in ``If-None-Match`` would match any state)."""
    tag = resp.headers.get(hdrs.ETAG, "").strip()
    if not tag or tag == "*" or len(tag) > MAX_ETAG or not (tag.isascii() and tag.isprintable()):
        return None
    return tag


async def _read_prefix(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """Up to ``limit`` bytes of the body; the rest is left unread (the caller drops the
    connection)."""
    buf = bytearray()
    while len(buf) < limit and (chunk := await resp.content.read(limit - len(buf))):
        buf += chunk
    return bytes(buf)


class MasterClient:
    """The protocol calls over a shared session; ``timeout`` is the per-step default,
    ``epoch`` the fencing epoch sent with every control call (None: no header, for tools) and
    ``max_state_bytes`` the biggest snapshot read (``failover.max_state_bytes``)."""

    def __init__(self, session: aiohttp.ClientSession, timeout: float = 5.0,
                 epoch: int | None = None,
                 max_state_bytes: int = DEFAULT_MAX_STATE_BYTES) -> None:
        self.session = session
        self.timeout = timeout
        self.epoch = epoch
        self.max_state_bytes = max_state_bytes
        # awaited before every control call: None to go ahead, or why this controller may
        # not act now (a cluster member that lost its lease); the call is then never made
        self.fence: Callable[[], Awaitable[str | None]] | None = None

    async def _request(self, who: str, op: str, method: str, url: str, *, cap: int,
                       json_body: Any = None, data: bytes | None = None,
                       timeout: float | None = None, control: bool = False,
                       if_none_match: str | None = None) -> _Answer:
        """One call: a 2xx with its body (read up to ``cap``), or a 304 when
        ``if_none_match`` was sent and still matches; anything else raises."""
        limit = self.timeout if timeout is None else timeout
        headers: dict[str, str] = dict(REQUEST_HEADERS)
        if data is not None:
            headers[hdrs.CONTENT_TYPE] = "application/json"
        if control and self.fence is not None:
            why = await self.fence()
            if why is not None:
                raise StaleEpoch(who, op, f"not sent: {why}")
        if control and self.epoch is not None:
            headers[EPOCH_HEADER] = str(self.epoch)
        if if_none_match is not None:
            headers[hdrs.IF_NONE_MATCH] = if_none_match
        try:
            async with asyncio.timeout(limit):
                async with self.session.request(
                    method, url, json=json_body, data=data, headers=headers,
                    allow_redirects=False, auto_decompress=False,
                    timeout=aiohttp.ClientTimeout(total=None),
                ) as resp:
                    if resp.status == 304 and if_none_match is not None:
                        return _Answer(304, b"", if_none_match)  # a 304 has no body
                    if not 200 <= resp.status < 300:
                        raise await self._refused(who, op, resp)
                    body = await self._read_body(who, op, resp, cap)
                    return _Answer(resp.status, body, _etag_of(resp))
        except TimeoutError:
            raise MasterCallError(who, op, f"timeout after {limit:g}s", kind="timeout") from None
        except aiohttp.ClientConnectorError as exc:
            raise MasterCallError(who, op, f"cannot connect: {exc.os_error or exc}",
                                  kind="connect_error") from None
        except aiohttp.ClientError as exc:
            raise MasterCallError(who, op, f"{type(exc).__name__}: {exc}",
                                  kind="connect_error") from None

    @staticmethod
    async def _read_body(who: str, op: str, resp: aiohttp.ClientResponse, cap: int) -> bytes:
        """The body of a 2xx answer, in chunks, never more than ``cap`` bytes of it held. A
        BytesIO hands its buffer over as the result without a copy: a snapshot near the cap is
        held once, not twice."""
        encoding = resp.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
        if encoding not in ("", "identity"):
            resp.close()
            raise MasterCallError(who, op, f"compressed body refused (Content-Encoding "
                                  f"{encoding[:40]})", kind="invalid")
        what = "state" if op == "get_state" else "answer"
        too_large = MasterCallError(who, op, f"{what} too large (limit {cap} bytes)",
                                    kind="too_large")
        if resp.content_length is not None and resp.content_length > cap:
            resp.close()
            raise too_large
        buf, size = io.BytesIO(), 0
        while chunk := await resp.content.read(min(READ_CHUNK, cap + 1 - size)):
            size += len(chunk)
            if size > cap:
                resp.close()  # drop the connection: the rest of the body is unread
                raise too_large
            buf.write(chunk)
        return buf.getvalue()

    async def _refused(self, who: str, op: str, resp: aiohttp.ClientResponse) -> MasterCallError:
        """The error for a non-2xx answer: a redirect names its target (not followed), an
        error its text (at most ``ERROR_BODY_BYTES`` of it read; a compressed one unread)."""
        status = resp.status
        target = resp.headers.get(hdrs.LOCATION, "")
        if 300 <= status < 400 and target:
            resp.close()
            return MasterCallError(who, op, f"HTTP {status}: redirect to {target[:200]} not "
                                   "followed", status)
        encoding = resp.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
        body = b"" if encoding not in ("", "identity") else await _read_prefix(
            resp, ERROR_BODY_BYTES)
        if not resp.content.at_eof():
            resp.close()
        if status == 409 and _error_text(body) == STALE_EPOCH:
            return self._stale(who, op, body)
        return MasterCallError(who, op, f"HTTP {status}: {_error_text(body)}", status)

    async def _call(self, who: str, op: str, method: str, url: str, **kw: Any) -> bytes:
        """A call whose answer is small (not a snapshot): capped at ``ANSWER_BYTES``."""
        return (await self._request(who, op, method, url, cap=ANSWER_BYTES, **kw)).body

    def _stale(self, who: str, op: str, body: bytes) -> StaleEpoch:
        theirs = _json_field(body, "epoch")
        obeyed = f"epoch {theirs}" if isinstance(theirs, int) else "a higher epoch"
        return StaleEpoch(who, op, f"stale epoch: {who} has obeyed {obeyed} and refuses this "
                          f"exporter's epoch {self.epoch}; another controller is in charge",
                          409)

    async def _call_json(self, who: str, op: str, method: str, url: str, **kw: Any) -> Any:
        body = await self._call(who, op, method, url, **kw)
        if not body.strip():
            return {}
        try:
            return json.loads(body)
        except ValueError:
            raise MasterCallError(who, op, f"invalid JSON answer: {body[:80]!r}") from None

    async def health(self, who: str, base: str, timeout: float | None = None) -> dict[str, Any]:
        out = await self._call_json(who, "health", "GET", f"{base}/health", timeout=timeout)
        if not isinstance(out, dict):
            raise MasterCallError(who, "health", "answer is not a JSON object")
        return out

    async def _read_state(self, who: str, base: str, timeout: float | None,
                          etag: str | None = None) -> _Answer:
        return await self._request(who, "get_state", "GET", f"{base}/state",
                                   cap=self.max_state_bytes, timeout=timeout,
                                   if_none_match=etag)

    @staticmethod
    async def _verified(who: str, answer: _Answer) -> Snapshot:
        snap = await parse_snapshot_async(answer.body, who)
        return dataclasses.replace(snap, etag=answer.etag) if answer.etag else snap

    async def get_state(self, who: str, base: str, timeout: float | None = None) -> Snapshot:
        """The master's snapshot, verified (with its ETag, when it sends one)."""
        return await self._verified(who, await self._read_state(who, base, timeout))

    async def get_state_if_changed(self, who: str, base: str, etag: str | None,
                                   timeout: float | None = None) -> Snapshot | None:
        """The snapshot, or None when ``etag`` is given and the master answers 304 (its state
        is still the one that tag names): an unchanged state is not transferred again."""
        answer = await self._read_state(who, base, timeout, etag)
        return None if answer.status == 304 else await self._verified(who, answer)

    async def state_json(self, who: str, base: str,
                         timeout: float | None = None) -> dict[str, Any]:
        """The master's own /state as a dict (journal recovery asserts on it)."""
        raw = (await self._read_state(who, base, timeout)).body
        try:
            data = json.loads(raw) if len(raw) < BIG_BODY else await asyncio.to_thread(
                json.loads, raw)
        except ValueError as exc:
            raise MasterCallError(who, "get_state", f"snapshot is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise MasterCallError(who, "get_state", "answer is not a JSON object")
        return data

    async def import_state(self, who: str, base: str, snapshot: Snapshot,
                           timeout: float | None = None) -> str:
        """POST the snapshot; returns the checksum the backup says it stored."""
        out = await self._call_json(who, "import_state", "POST", f"{base}/state",
                                    data=snapshot.raw, timeout=timeout, control=True)
        checksum = out.get("checksum") if isinstance(out, dict) else None
        if not isinstance(checksum, str):
            raise MasterCallError(who, "import_state", f"answer has no checksum: {out!r:.80}")
        return checksum

    async def drop_import(self, who: str, base: str, source: str,
                          timeout: float | None = None) -> None:
        try:
            await self._call(who, "drop_import", "DELETE", f"{base}/state/{source}",
                             timeout=timeout, control=True)
        except MasterCallError as exc:
            if exc.status != 404:  # nothing imported: already rolled back
                raise

    async def activate(self, who: str, base: str, taken_over: str | None,
                       timeout: float | None = None) -> dict[str, Any]:
        body = {"taken_over": taken_over} if taken_over else {}
        out = await self._call_json(who, "activate", "POST", f"{base}/activate",
                                    json_body=body, timeout=timeout, control=True)
        return out if isinstance(out, dict) else {}

    async def deactivate(self, who: str, base: str, taken_over: str | None = None,
                         timeout: float | None = None) -> dict[str, Any]:
        """Release one taken-over duty, or with ``taken_over=None`` fence the master."""
        body = {"taken_over": taken_over} if taken_over else None
        out = await self._call_json(who, "deactivate", "POST", f"{base}/deactivate",
                                    json_body=body, timeout=timeout, control=True)
        return out if isinstance(out, dict) else {}


def _json_field(body: bytes, key: str) -> Any:
    """``key`` of a JSON object body, None when the body is not one."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data.get(key) if isinstance(data, dict) else None


def _error_text(body: bytes) -> str:
    try:
        data = json.loads(body)
        if isinstance(data, dict) and "error" in data:
            return str(data["error"])[:200]
    except ValueError:
        pass
    return body[:200].decode("utf-8", "replace") or "(empty body)"
