"""Client side of the master protocol, as the failover orchestrator uses it.

Every call has its own timeout and fails with one exception type, ``MasterCallError``, whose
message says which master, which call and why (timeout, connection, HTTP status with the
master's own error text, invalid JSON, checksum mismatch, a stale fencing epoch): that text goes
verbatim into the failover record, so an operator reading the audit trail needs nothing else.

Every control call (import, drop, activate, deactivate) carries the exporter's fencing epoch in
``X-HA-Epoch``; a master that has obeyed a newer controller answers 409 ``stale epoch`` and the
call fails as ``StaleEpoch``. docs/protocol.md is the normative description of all of it.

Snapshots travel as the raw bytes the source sent: the checksum is verified once on receipt and
the same bytes are forwarded to the backup, so a 10 MB state is parsed once and never re-encoded
on the event loop (parsing of big bodies runs in a worker thread).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import aiohttp

BIG_BODY = 256 * 1024  # above this, JSON parsing and hashing leave the event loop
STORED_KEYS = ("sessions", "pending_messages", "config", "imported")
EPOCH_HEADER = "X-HA-Epoch"
STALE_EPOCH = "stale epoch"  # the ``error`` of a master's 409 to a lower epoch


class MasterCallError(Exception):
    """A master protocol call failed; ``str()`` is the reason for the record."""

    def __init__(self, master: str, op: str, reason: str, status: int | None = None) -> None:
        super().__init__(f"{op} on {master}: {reason}")
        self.master = master
        self.op = op
        self.reason = reason
        self.status = status


class StaleEpoch(MasterCallError):
    """The master has obeyed a higher epoch than ours: another controller is in charge, and
    retrying with this exporter's epoch can never succeed."""


def snapshot_checksum(snapshot: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``snapshot`` without its ``checksum`` key (the
    protocol's definition, identical to the simulated master's)."""
    body = {k: v for k, v in snapshot.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _checksum_of_parts(parts: dict[str, str], keys: list[str]) -> str:
    """The canonical-JSON checksum of the object made of ``keys``, from values already
    encoded canonically: a 10 MB snapshot is encoded once for several checksums."""
    h = hashlib.sha256(b"{")
    for i, k in enumerate(sorted(keys)):
        if i:
            h.update(b",")
        h.update(json.dumps(k).encode() + b":" + parts[k].encode())
    h.update(b"}")
    return h.hexdigest()


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

    @property
    def size(self) -> int:
        return len(self.raw)


def _count(value: Any) -> int | None:
    return len(value) if isinstance(value, list | dict) else None


def parse_snapshot(raw: bytes, who: str = "?", op: str = "get_state") -> Snapshot:
    """Parse and verify a snapshot; CPU-bound (run big ones in a thread)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MasterCallError(who, op, f"snapshot is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("checksum"), str):
        raise MasterCallError(who, op, "snapshot has no checksum")
    parts = {k: json.dumps(v, sort_keys=True, separators=(",", ":"))
             for k, v in data.items() if k != "checksum"}
    actual = _checksum_of_parts(parts, list(parts))
    if actual != data["checksum"]:
        raise MasterCallError(
            who, op, f"snapshot checksum mismatch: claims {data['checksum'][:12]}…, "
            f"content hashes to {actual[:12]}…")
    kept = _checksum_of_parts(parts, [k for k in STORED_KEYS if k in parts])
    return Snapshot(raw=raw, checksum=actual, master=data.get("master"),
                    sessions=_count(data.get("sessions")),
                    pending_messages=_count(data.get("pending_messages")),
                    import_checksums=frozenset({actual, kept}))


async def parse_snapshot_async(raw: bytes, who: str = "?", op: str = "get_state") -> Snapshot:
    if len(raw) < BIG_BODY:
        return parse_snapshot(raw, who, op)
    return await asyncio.to_thread(parse_snapshot, raw, who, op)


class MasterClient:
    """The protocol calls over a shared session; ``timeout`` is the per-step default and
    ``epoch`` the fencing epoch sent with every control call (None: no header, for tools)."""

    def __init__(self, session: aiohttp.ClientSession, timeout: float = 5.0,
                 epoch: int | None = None) -> None:
        self.session = session
        self.timeout = timeout
        self.epoch = epoch

    async def _call(self, who: str, op: str, method: str, url: str, *,
                    json_body: Any = None, data: bytes | None = None,
                    timeout: float | None = None, control: bool = False) -> bytes:
        limit = self.timeout if timeout is None else timeout
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if control and self.epoch is not None:
            headers[EPOCH_HEADER] = str(self.epoch)
        try:
            async with asyncio.timeout(limit):
                async with self.session.request(
                    method, url, json=json_body, data=data, headers=headers or None,
                    timeout=aiohttp.ClientTimeout(total=None),
                ) as resp:
                    body = await resp.read()
                    if resp.status == 409 and _error_text(body) == STALE_EPOCH:
                        raise self._stale(who, op, body)
                    if resp.status >= 300:
                        raise MasterCallError(who, op, f"HTTP {resp.status}: "
                                              f"{_error_text(body)}", resp.status)
                    return body
        except TimeoutError:
            raise MasterCallError(who, op, f"timeout after {limit:g}s") from None
        except aiohttp.ClientConnectorError as exc:
            raise MasterCallError(who, op, f"cannot connect: {exc.os_error or exc}") from None
        except aiohttp.ClientError as exc:
            raise MasterCallError(who, op, f"{type(exc).__name__}: {exc}") from None

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

    async def get_state(self, who: str, base: str, timeout: float | None = None) -> Snapshot:
        raw = await self._call(who, "get_state", "GET", f"{base}/state", timeout=timeout)
        return await parse_snapshot_async(raw, who)

    async def state_json(self, who: str, base: str,
                         timeout: float | None = None) -> dict[str, Any]:
        """The master's own /state as a dict (journal recovery asserts on it)."""
        raw = await self._call(who, "get_state", "GET", f"{base}/state", timeout=timeout)
        data = json.loads(raw) if len(raw) < BIG_BODY else await asyncio.to_thread(
            json.loads, raw)
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
