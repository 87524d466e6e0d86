"""The etcd JSON gateway's wire format: request bodies out, answers checked field by field
(``etcd.py``). Every answer is untrusted; anything off is an ``EtcdError`` naming the field."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import aiohttp
from aiohttp import hdrs

from exporter.cluster.etcdtypes import (
    _INT,
    _RESULTS,
    _TARGETS,
    ERROR_BODY_BYTES,
    LEASE_NOT_FOUND,
    READ_CHUNK,
    UNAVAILABLE,
    Compacted,
    Compare,
    Delete,
    EtcdError,
    KeyValue,
    LeaseLost,
    Put,
    WatchEvent,
    _Failure,
    _invalid,
)


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

