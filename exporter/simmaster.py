"""A simulated master: a real HTTP server speaking the whole master protocol.

It stands in for a WhatsApp-bot "master" account (phone-number sessions, pending messages,
a region) so that probing, failover and balancing are tested against real sockets and real
processes, and can be told to misbehave (``POST /chaos``) or be killed like a real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import signal
import time
from typing import Any

from aiohttp import web

log = logging.getLogger("exporter.simmaster")

CHAOS_MODES = ("ok", "down", "hang", "slow", "error", "garbage")
MAX_MESSAGE = 1 << 20  # 1 MiB per message
MAX_BODY = 64 << 20  # state snapshots can be large
HANG_SECONDS = 3600.0


def snapshot_checksum(snapshot: dict) -> str:
    """sha256 of the canonical JSON of a snapshot without its own checksum field."""
    body = {k: v for k, v in snapshot.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class SimulatedMaster:
    """State and behaviour of one master; the only background work is the queue drain."""

    def __init__(
        self,
        name: str,
        region: str = "default",
        role: str = "active",
        drain_rate: float = 50.0,
        degraded_queue: int = 1000,
        seed: int | None = None,
    ) -> None:
        self.name = name
        self.region = region
        self.role = role
        self.active = role == "active"
        self.duties: list[str] = [name] if self.active else []
        self.drain_rate = drain_rate
        self.degraded_queue = degraded_queue
        self.mode = "ok"
        self.delay = 1.0
        self.backlog = 0
        self.pending: list[dict] = []
        self.accepted: list[str] = []
        self._accepted_set: set[str] = set()
        self.imported: dict[str, dict] = {}
        rng = random.Random(seed if seed is not None else name)
        self._rng = rng
        self.cpu = 5.0 + rng.random() * 10
        self.memory = 20.0 + rng.random() * 10
        self.config = {
            "webhook": f"https://bots.example/{name}",
            "language": "en",
            "rate_limit_per_minute": 600,
        }
        country = {"uae": "+9715", "usa": "+1202"}.get(region, "+4420")
        self.sessions: dict[str, dict] = {
            f"{name}-s{i}": {
                "phone": f"{country}{rng.randrange(10**6, 10**7)}",
                "opened_at": round(time.time(), 3),
                "messages": 0,
            }
            for i in range(rng.randint(3, 5))
        }

    # --- figures -----------------------------------------------------------------------
    @property
    def queue_length(self) -> int:
        return len(self.pending) + self.backlog

    def health(self) -> dict[str, Any]:
        """Figures move like a real service: cpu follows the queue, memory the sessions."""
        load = min(100.0, self.queue_length / max(1, self.degraded_queue) * 80)
        self.cpu = max(
            1.0, min(100.0, 0.7 * self.cpu + 0.3 * (8 + load) + self._rng.uniform(-2, 2))
        )
        self.memory = max(
            1.0, min(100.0, 20 + len(self.sessions) * 0.05 + self._rng.uniform(-0.5, 0.5))
        )
        degraded = self.mode == "slow" or self.queue_length > self.degraded_queue
        return {
            "status": "down" if self.mode == "down" else ("degraded" if degraded else "ok"),
            "queue_length": self.queue_length,
            "active_messages": min(len(self.pending), 10),
            "cpu_percent": round(self.cpu, 2),
            "memory_percent": round(self.memory, 2),
            "name": self.name,
            "region": self.region,
            "active": self.active,
            "duties": self.duties,
        }

    # --- state -------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = {
            "master": self.name,
            "region": self.region,
            "sessions": self.sessions,
            "pending_messages": self.pending,
            "config": self.config,
            "imported": self.imported,
        }
        snap["checksum"] = snapshot_checksum(snap)
        return snap

    def import_snapshot(self, snap: dict) -> str:
        """Store another master's snapshot under its name, as received (so the answered
        checksum is the snapshot's own); idempotent by source."""
        for key in ("master", "sessions", "pending_messages", "checksum"):
            if key not in snap:
                raise ValueError(f"snapshot lacks {key!r}")
        if snapshot_checksum(snap) != snap["checksum"]:
            raise ValueError("checksum does not match the snapshot")
        self.imported[snap["master"]] = snap
        return snap["checksum"]

    def accept(self, message: dict) -> bool:
        """Take a message; False when its id was seen before (masters dedupe by id)."""
        mid = str(message["id"])
        if mid in self._accepted_set:
            return False
        self._accepted_set.add(mid)
        self.accepted.append(mid)
        self.pending.append(message)
        session = message.get("chat") or message.get("session")
        if session is not None:
            entry = self.sessions.setdefault(
                str(session),
                {"phone": str(session), "opened_at": round(time.time(), 3), "messages": 0},
            )
            entry["messages"] += 1
        return True

    async def drain(self) -> None:
        """Process pending messages at ``drain_rate`` per second, forever."""
        tick = 0.1
        budget = 0.0
        while True:
            await asyncio.sleep(tick)
            if self.mode in ("down", "hang"):
                continue
            budget += self.drain_rate * tick
            n = int(budget)
            if n:
                budget -= n
                from_backlog = min(self.backlog, max(0, n - len(self.pending)))
                del self.pending[:n]
                self.backlog -= from_backlog


def create_app(master: SimulatedMaster) -> web.Application:
    """The master's HTTP server; chaos applies to everything but /chaos and GET /messages."""

    @web.middleware
    async def chaos(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/chaos" or (request.path == "/messages" and request.method == "GET"):
            return await handler(request)
        mode = master.mode
        if mode == "hang":
            await asyncio.sleep(HANG_SECONDS)
        elif mode == "slow":
            await asyncio.sleep(master.delay)
        elif mode == "error":
            return _error(500, "simulated internal error")
        elif mode == "garbage":
            return web.Response(text="<html>502 Bad Gateway</html> \x00garbage")
        elif mode == "down" and request.path != "/health":
            return _error(503, "master is down")
        if request.path == "/messages" and (request.content_length or 0) > MAX_MESSAGE:
            return _error(413, f"message larger than {MAX_MESSAGE} bytes")
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"request body larger than {MAX_BODY} bytes")

    async def body(request: web.Request) -> dict:
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            raise web.HTTPBadRequest(
                text='{"error": "body is not JSON"}', content_type="application/json"
            ) from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(
                text='{"error": "body must be a JSON object"}', content_type="application/json"
            )
        return data

    async def health(_: web.Request) -> web.Response:
        return web.json_response(master.health())

    async def get_state(_: web.Request) -> web.Response:
        return web.json_response(master.snapshot())

    async def post_state(request: web.Request) -> web.Response:
        snap = await body(request)
        try:
            checksum = master.import_snapshot(snap)
        except ValueError as exc:
            return _error(400, str(exc))
        log.info("%s imported the state of %s", master.name, snap["master"])
        return web.json_response({"checksum": checksum, "master": snap["master"]})

    async def delete_state(request: web.Request) -> web.Response:
        removed = master.imported.pop(request.match_info["source"], None) is not None
        return web.json_response({"removed": removed})

    async def activate(request: web.Request) -> web.Response:
        taken = (await body(request)).get("taken_over")
        master.active = True
        duty = str(taken) if taken else master.name
        if duty not in master.duties:
            master.duties.append(duty)
        log.info("%s active, duties %s", master.name, master.duties)
        return web.json_response({"active": True, "duties": master.duties})

    async def deactivate(request: web.Request) -> web.Response:
        taken = (await body(request)).get("taken_over")
        if taken:
            if str(taken) in master.duties:
                master.duties.remove(str(taken))
            master.active = bool(master.duties)  # nothing left to serve: back to standby
        else:
            master.active = False
            master.duties = []
        log.info("%s deactivated (%s), duties %s", master.name, taken or "fenced", master.duties)
        return web.json_response({"active": master.active, "duties": master.duties})

    async def post_message(request: web.Request) -> web.Response:
        if not master.active:
            return _error(503, "inactive")
        msg = await body(request)
        if "id" not in msg or msg["id"] in (None, ""):
            return _error(400, "message needs an id")
        fresh = master.accept(msg)
        return web.json_response(
            {"accepted": True, "duplicate": not fresh}, status=202 if fresh else 200
        )

    async def get_messages(_: web.Request) -> web.Response:
        return web.json_response({"ids": master.accepted, "count": len(master.accepted)})

    async def post_chaos(request: web.Request) -> web.Response:
        data = await body(request)
        mode = data.get("mode", "ok")
        if mode not in CHAOS_MODES:
            return _error(400, f"unknown mode {mode!r}; expected one of {', '.join(CHAOS_MODES)}")
        master.mode = mode
        master.delay = float(data.get("delay_seconds", master.delay))
        if "queue_length" in data:
            master.backlog = max(0, int(data["queue_length"]))
        log.warning("%s chaos mode %s", master.name, mode)
        return web.json_response({"mode": mode, "queue_length": master.queue_length})

    async def drain_ctx(_: web.Application) -> Any:
        task = asyncio.create_task(master.drain())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = web.Application(middlewares=[chaos], client_max_size=MAX_BODY)
    app.cleanup_ctx.append(drain_ctx)
    app.router.add_get("/health", health)
    app.router.add_get("/state", get_state)
    app.router.add_post("/state", post_state)
    app.router.add_delete("/state/{source}", delete_state)
    app.router.add_post("/activate", activate)
    app.router.add_post("/deactivate", deactivate)
    app.router.add_post("/messages", post_message)
    app.router.add_get("/messages", get_messages)
    app.router.add_post("/chaos", post_chaos)
    return app


async def serve_master(
    name: str,
    port: int,
    region: str = "default",
    role: str = "active",
    host: str = "127.0.0.1",
    drain_rate: float = 50.0,
) -> None:
    """Run one master until SIGTERM/SIGINT or cancellation, then close cleanly."""
    master = SimulatedMaster(name, region, role, drain_rate=drain_rate)
    runner = web.AppRunner(create_app(master), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"master {name} listening on http://{host}:{port} ({region}, {role})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
