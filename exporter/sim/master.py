"""A simulated master: a real HTTP server speaking the whole master protocol.

Probing, failover and balancing are tested against real sockets and real processes through
it, and it can be told to misbehave (``POST /chaos``) or be killed like a real one. State and
behaviour live in ``exporter.sim.state``; this is the thin HTTP layer, and the only background
work is the task that advances the state's clock.

It is the reference implementation of docs/protocol.md, with one allowed shortcut: the highest
fencing epoch obeyed lives in memory, so a restarted simulated master has obeyed none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from exporter.sim.state import (
    MAX_BODY,
    MAX_STATE_BODY,
    THREAD_PARSE,
    Reject,
    SimulatedMaster,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

EPOCH_HEADER = "X-HA-Epoch"
_EPOCH_TEXT = re.compile(r"[0-9]{1,19}")
MAX_EPOCH = 2**63 - 1


def _error(status: int, message: str, extra: dict[str, Any] | None = None) -> web.Response:
    return web.json_response({"error": message, **(extra or {})}, status=status)


def _epoch(request: web.Request) -> int | None:
    """The control call's fencing epoch; None without the header, 400 when it is not one
    decimal integer from 0 to 2**63-1."""
    values = request.headers.getall(EPOCH_HEADER, [])
    if not values:
        return None
    text = values[0].strip()
    if len(values) > 1 or not _EPOCH_TEXT.fullmatch(text) or int(text) > MAX_EPOCH:
        raise Reject(400, f"invalid {EPOCH_HEADER} header: expected one integer 0..2**63-1")
    return int(text)


def _etag_matches(header: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names ``etag`` (weak tags compare equal, ``*`` too)."""
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` even when sent chunked (no length given)."""
    too_large = Reject(413, f"request body larger than {limit} bytes")
    if (request.content_length or 0) > limit:
        raise too_large
    raw = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        raw += chunk
        if len(raw) > limit:
            raise too_large
    return bytes(raw)


def _parse_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise Reject(400, "body is not JSON") from None
    if not isinstance(data, dict):
        raise Reject(400, "body must be a JSON object")
    return data


async def _json_body(request: web.Request, limit: int = MAX_BODY) -> dict[str, Any]:
    return _parse_object(await _read_body(request, limit))


def _optional_name(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise Reject(400, f"{key} must be a master name")
    return value or None


def _parse_and_verify(raw: bytes) -> tuple[dict[str, Any], str]:
    snap = _parse_object(raw)
    try:
        return snap, SimulatedMaster.verify_snapshot(snap)
    except ValueError as exc:
        raise Reject(400, str(exc)) from None


def create_app(master: SimulatedMaster) -> web.Application:
    """The master's HTTP server. Chaos applies to every endpoint but ``/chaos`` itself and
    ``GET /messages``, so a test can always heal the master and count what it accepted."""

    @web.middleware
    async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Reject as exc:
            return _error(exc.status, str(exc), exc.extra)
        except web.HTTPException as exc:  # the router's 404/405, aiohttp's own 413
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason.lower())

    @web.middleware
    async def chaos(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/chaos" or (request.path, request.method) == ("/messages", "GET"):
            return await handler(request)
        if master.mode == "hang":
            await master.hang()
            if master.stopping:
                raise Reject(503, "shutting down")
        if request.path == "/health":
            observer = request.headers.get("X-HA-Observer")
            master.count_probe(observer)
            if observer in master.refused_observers:
                raise Reject(503, "refusing this observer's probes (chaos)")
        mode = master.mode
        if mode == "slow":
            await asyncio.sleep(master.delay)
        elif mode == "error":
            raise Reject(500, "simulated internal error")
        elif mode == "garbage":
            return web.Response(text="<html>502 Bad Gateway</html> \x00garbage")
        elif mode == "down" and request.path != "/health":
            raise Reject(503, "master is down")
        return await handler(request)

    async def health(_: web.Request) -> web.Response:
        return web.json_response(master.health())

    async def get_state(request: web.Request) -> web.Response:
        body, checksum = master.snapshot_and_checksum()
        etag = f'"{checksum}"'
        if _etag_matches(request.headers.get("If-None-Match"), etag):
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(text=body, content_type="application/json", headers={"ETag": etag})

    # control calls: the epoch is checked first (fail fast), and obeyed right before the effect
    async def post_state(request: web.Request) -> web.Response:
        epoch = _epoch(request)
        master.admit(epoch)
        raw = await _read_body(request, MAX_STATE_BODY)
        if len(raw) > THREAD_PARSE:  # keep /health answering during a big import
            snap, checksum = await asyncio.to_thread(_parse_and_verify, raw)
        else:
            snap, checksum = _parse_and_verify(raw)
        master.obey(epoch)
        master.import_snapshot(snap, checksum)
        log.info("%s imported the state of %s", master.name, snap["master"])
        return web.json_response({"checksum": checksum, "master": snap["master"]})

    async def delete_state(request: web.Request) -> web.Response:
        master.obey(_epoch(request))
        return web.json_response({"removed": master.drop_import(request.match_info["source"])})

    async def activate(request: web.Request) -> web.Response:
        epoch = _epoch(request)
        master.admit(epoch)
        taken = _optional_name(await _json_body(request), "taken_over")
        master.obey(epoch)
        out = master.activate(taken)
        log.info("%s active, duties %s", master.name, out["duties"])
        return web.json_response(out)

    async def deactivate(request: web.Request) -> web.Response:
        epoch = _epoch(request)
        master.admit(epoch)
        taken = _optional_name(await _json_body(request), "taken_over")
        master.obey(epoch)
        out = master.deactivate(taken)
        log.info("%s released %s, duties %s", master.name, taken or "everything", out["duties"])
        return web.json_response(out)

    async def post_message(request: web.Request) -> web.Response:
        if not master.active:
            raise Reject(503, "inactive")
        message = await _json_body(request)
        try:
            fresh = master.accept(message)
        except ValueError as exc:
            raise Reject(400, str(exc)) from None
        return web.json_response(
            {"accepted": True, "duplicate": not fresh, "seq": master.seq_of(message["id"])},
            status=202 if fresh else 200,
        )

    async def get_messages(_: web.Request) -> web.Response:
        return web.json_response({"ids": master.accepted, "count": len(master.accepted)})

    async def post_chaos(request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            out = master.set_chaos(
                body.get("mode"), body.get("delay_seconds"), body.get("queue_length"),
                body.get("refuse_observers"),
            )
        except ValueError as exc:
            raise Reject(400, str(exc)) from None
        log.warning("%s chaos: %s", master.name, out)
        return web.json_response(out)

    async def get_chaos(_: web.Request) -> web.Response:
        return web.json_response(master.chaos_state())

    async def clock(_: web.Application) -> AsyncIterator[None]:
        master.stopping = False
        task = asyncio.create_task(master.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def release_hung(_: web.Application) -> None:
        master.stopping = True

    app = web.Application(middlewares=[json_errors, chaos], client_max_size=MAX_STATE_BODY)
    app.cleanup_ctx.append(clock)
    app.on_shutdown.append(release_hung)
    app.router.add_get("/health", health)
    app.router.add_get("/state", get_state)
    app.router.add_post("/state", post_state)
    app.router.add_delete("/state/{source}", delete_state)
    app.router.add_post("/activate", activate)
    app.router.add_post("/deactivate", deactivate)
    app.router.add_post("/messages", post_message)
    app.router.add_get("/messages", get_messages)
    app.router.add_post("/chaos", post_chaos)
    app.router.add_get("/chaos", get_chaos)
    return app


async def serve_master(
    name: str,
    port: int,
    region: str = "default",
    role: str = "active",
    host: str = "127.0.0.1",
    drain_rate: float = 50.0,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Run one master until SIGTERM/SIGINT or cancellation, then close within a second
    (hung requests are let go, in-flight ones get half a second).

    ``port`` 0 binds an ephemeral port; ``on_listening`` is called with the base URL actually
    bound (``http://host:port``) once the socket listens, so a caller can learn that port."""
    master = SimulatedMaster(name, region, role, drain_rate=drain_rate)
    runner = web.AppRunner(create_app(master), access_log=None, shutdown_timeout=0.5)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:  # before listening: a signal right after start must not kill it raw
        loop.add_signal_handler(sig, stop.set)
    try:
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0][1] if runner.addresses else port
        log.info(
            "master %s listening on http://%s:%s",
            name,
            host,
            bound,
            extra={"master": name, "region": region, "role": role, "event": "listening"},
        )
        if on_listening is not None:
            on_listening(f"http://{host}:{bound}")
        await stop.wait()
        log.info("master %s stopping", name)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
