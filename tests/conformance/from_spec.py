"""A minimal master written from docs/protocol.md alone (no reference code read): state in
memory, every endpoint and rule the spec marks MUST, plus ETag and `epoch` in /health."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from aiohttp import web

MAX_EPOCH = 2**63 - 1
MAX_BODY = 64 * 1024 * 1024


def canonical(body: Any) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def checksum_of(snapshot: dict[str, Any]) -> str:
    rest = {k: v for k, v in snapshot.items() if k != "checksum"}
    return hashlib.sha256(canonical(rest)).hexdigest()


def error(status: int, text: str, **more: Any) -> web.Response:
    return web.json_response({"error": text, **more}, status=status)


class BadRequest(Exception):
    pass


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise BadRequest("duplicate key")
    return out


def _no_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not JSON")


async def read_object(request: web.Request, optional: bool) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        if optional:
            return {}
        raise BadRequest("body required")
    try:
        body = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_dupes, parse_constant=_no_constant
        )
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"invalid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


class Master:
    def __init__(self, name: str) -> None:
        self.name = name
        self.active = True
        self.duties: list[str] = [name]
        self.imported: dict[str, dict[str, Any]] = {}
        self.epoch: int | None = None

    def snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = {"master": self.name, "sessions": {}, "pending_messages": []}
        if self.imported:
            snap["imported"] = self.imported
        snap["checksum"] = checksum_of(snap)
        return snap

    def activity(self) -> dict[str, Any]:
        return {"active": self.active, "duties": list(self.duties)}

    def header_epoch(self, request: web.Request) -> int | None:
        values = request.headers.getall("X-HA-Epoch", [])
        if not values:
            return None
        if len(values) > 1 or not re.fullmatch(r"[0-9]+", values[0].strip()):
            raise BadRequest("invalid X-HA-Epoch")
        n = int(values[0].strip())
        if n > MAX_EPOCH:
            raise BadRequest("invalid X-HA-Epoch")
        return n

    def stale(self, n: int | None) -> web.Response | None:
        if n is not None and self.epoch is not None and n < self.epoch:
            return error(409, "stale epoch", epoch=self.epoch)
        return None

    def obeyed(self, n: int | None) -> None:
        if n is not None and (self.epoch is None or n > self.epoch):
            self.epoch = n


def taken_over_of(body: dict[str, Any]) -> str | None:
    t = body.get("taken_over")
    if t is not None and not isinstance(t, str):
        raise BadRequest("taken_over must be a string or null")
    if t is not None and len(t) > 200:
        raise BadRequest("taken_over too long")
    return t or None


MASTER = web.AppKey("master", Master)


def app(name: str) -> web.Application:
    m = Master(name)

    @web.middleware
    async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadRequest as e:
            return error(400, str(e))
        except web.HTTPRequestEntityTooLarge:
            return error(413, "body too large")
        except web.HTTPException as e:
            if e.status >= 400:
                return error(e.status, e.reason)
            raise

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "name": m.name, "epoch": m.epoch, **m.activity()})

    async def get_state(request: web.Request) -> web.Response:
        snap = m.snapshot()
        tag = f'"{snap["checksum"]}"'
        inm = request.headers.get("If-None-Match")
        if inm and tag in [t.strip() for t in inm.split(",")]:
            return web.Response(status=304, headers={"ETag": tag})
        return web.json_response(snap, headers={"ETag": tag})

    async def post_state(request: web.Request) -> web.Response:
        n = m.header_epoch(request)
        snap = await read_object(request, optional=False)
        if not (isinstance(snap.get("master"), str) and snap["master"]
                and isinstance(snap.get("sessions"), dict)
                and isinstance(snap.get("pending_messages"), list)
                and isinstance(snap.get("checksum"), str)):
            raise BadRequest("invalid snapshot")
        if snap["checksum"] != checksum_of(snap):
            raise BadRequest("snapshot checksum mismatch")
        if (r := m.stale(n)) is not None:  # checked right before the effect (no await since)
            return r
        m.imported[snap["master"]] = snap
        m.obeyed(n)
        return web.json_response({"checksum": snap["checksum"], "master": m.name})

    async def delete_state(request: web.Request) -> web.Response:
        n = m.header_epoch(request)
        if (r := m.stale(n)) is not None:
            return r
        removed = m.imported.pop(request.match_info["source"], None) is not None
        m.obeyed(n)
        return web.json_response({"removed": removed})

    async def activate(request: web.Request) -> web.Response:
        n = m.header_epoch(request)
        duty = taken_over_of(await read_object(request, optional=True)) or m.name
        if (r := m.stale(n)) is not None:
            return r
        m.active = True
        if duty not in m.duties:
            m.duties.append(duty)
        m.obeyed(n)
        return web.json_response(m.activity())

    async def deactivate(request: web.Request) -> web.Response:
        n = m.header_epoch(request)
        duty = taken_over_of(await read_object(request, optional=True))
        if (r := m.stale(n)) is not None:
            return r
        if duty is None:
            m.active, m.duties = False, []
        else:
            m.duties = [d for d in m.duties if d != duty]
            if not m.duties:
                m.active = False
        m.obeyed(n)
        return web.json_response(m.activity())

    a = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY)
    a.router.add_get("/health", health, allow_head=False)
    a.router.add_get("/state", get_state, allow_head=False)
    a.router.add_post("/state", post_state)
    a.router.add_delete("/state/{source}", delete_state)
    a.router.add_post("/activate", activate)
    a.router.add_post("/deactivate", deactivate)
    a[MASTER] = m
    return a
