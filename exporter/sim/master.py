"""A simulated master: a real HTTP server speaking the whole master protocol.

It stands in for a WhatsApp-bot "master" account (phone-number sessions, pending messages,
a region) so that probing, failover and balancing are tested against real sockets and real
processes, and can be told to misbehave (``POST /chaos``) or be killed like a real one.

State and behaviour live in :class:`SimulatedMaster` (no I/O, time advanced by
:meth:`SimulatedMaster.step`) so they can be checked without a server; :func:`create_app`
is the thin HTTP layer, and the only background work is the task that calls ``step``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

CHAOS_MODES = ("ok", "down", "hang", "slow", "error", "garbage")
ROLES = ("active", "standby")
MAX_BODY = 1 << 20  # 1 MiB: messages and control calls
MAX_STATE_BODY = 64 << 20  # a big master's snapshot is far larger than any message
HANG_SECONDS = 3600.0
TICK = 0.1  # seconds per simulation step
_HANG_POLL = 0.05
_THREAD_PARSE = 256 << 10  # above this, parsing and hashing a snapshot leave the event loop
_SNAPSHOT_TYPES: dict[str, type | tuple[type, ...]] = {
    "master": str,
    "sessions": dict,
    "pending_messages": list,
    "checksum": str,
}
_COUNTRY = {"uae": "+9715", "usa": "+1202"}
_EPOCH = 1_735_689_600  # 2025-01-01: seeded sessions look real and stay deterministic

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _canonical(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def snapshot_checksum(snapshot: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``snapshot`` without its own ``checksum`` key: the
    protocol's one rule, shared by masters and the exporter so either can verify the other."""
    body = {k: v for k, v in snapshot.items() if k != "checksum"}
    return hashlib.sha256(_canonical(body).encode()).hexdigest()


def _clamp(value: float, low: float = 0.0, high: float = 100.0) -> float:
    return max(low, min(high, value))


def _message_id(value: Any) -> str | None:
    """Ids are strings (integers tolerated); anything else cannot be deduplicated sensibly."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value) or None


class Reject(Exception):
    """A request refused with a status and a reason; the app answers it as JSON."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SimulatedMaster:
    """State and behaviour of one master. Attributes are public on purpose: tests and the
    benchmark set ``mode``, ``drain_rate``, ``sessions`` or ``pending`` directly."""

    def __init__(
        self,
        name: str,
        region: str = "default",
        role: str = "active",
        drain_rate: float = 50.0,
        degraded_queue: int = 1000,
        seed: int | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if drain_rate < 0 or degraded_queue < 0:
            raise ValueError("drain_rate and degraded_queue must not be negative")
        self.name = name
        self.region = region
        self.role = role
        self.active = role == "active"
        self.duties: list[str] = [name] if self.active else []
        self.drain_rate = drain_rate
        self.degraded_queue = degraded_queue
        self.mode = "ok"
        self.delay = 1.0
        self.backlog = 0  # injected by chaos: stays until cleared, like a stuck consumer
        self.stopping = False  # set on shutdown: hung requests let go
        self.pending: list[dict[str, Any]] = []
        self.accepted: list[str] = []
        self._seen: set[str] = set()
        self.imported: dict[str, dict[str, Any]] = {}
        self.config: dict[str, Any] = {
            "webhook": f"https://bots.example/{name}",
            "language": "en",
            "rate_limit_per_minute": 600,
        }
        self._rng = random.Random(f"{name}/{seed}")  # str seeds are stable across runs
        self._budget = 0.0
        country = _COUNTRY.get(region, "+4420")
        self.sessions: dict[str, dict[str, Any]] = {
            f"{name}-s{i}": {
                "phone": f"{country}{self._rng.randrange(10**6, 10**7)}",
                "opened_at": _EPOCH + self._rng.randrange(30 * 86400),
                "messages": 0,
            }
            for i in range(self._rng.randint(3, 5))
        }
        self.cpu = 5.0 + self._rng.random() * 5
        self.memory = self._memory_target()

    # --- figures -----------------------------------------------------------------------
    @property
    def queue_length(self) -> int:
        return len(self.pending) + self.backlog

    @property
    def active_messages(self) -> int:
        """Messages in the batch being worked on now: a second's worth at most."""
        return min(len(self.pending), math.ceil(self.drain_rate))

    def _memory_target(self) -> float:
        sessions = len(self.sessions) + sum(
            len(s.get("sessions") or ()) for s in self.imported.values()
        )
        return 20.0 + 60.0 * (1 - math.exp(-sessions / 20_000))  # slow growth, never past 80

    def step(self, dt: float) -> int:
        """Advance the simulation by ``dt`` seconds and return how many messages were
        processed. A down or hung master is frozen: nothing drains, figures stand still."""
        if self.mode in ("down", "hang"):
            return 0
        self._budget += self.drain_rate * dt
        done = min(int(self._budget), len(self.pending))
        del self.pending[:done]
        # leftover budget carries over only while there is work, so idling builds no burst
        self._budget = self._budget - int(self._budget) if self.pending else 0.0
        load = min(1.0, self.queue_length / max(1, self.degraded_queue))
        pull = min(1.0, dt)  # cpu follows the load within about a second
        self.cpu = _clamp(
            self.cpu + (5 + 85 * load - self.cpu) * pull + self._rng.uniform(-2, 2) * pull
        )
        self.memory = _clamp(
            self.memory
            + (self._memory_target() - self.memory) * 0.05 * pull
            + self._rng.uniform(-0.2, 0.2) * pull
        )
        return done

    def health(self) -> dict[str, Any]:
        degraded = self.mode == "slow" or self.queue_length > self.degraded_queue
        return {
            "status": "down" if self.mode == "down" else ("degraded" if degraded else "ok"),
            "queue_length": self.queue_length,
            "active_messages": self.active_messages,
            "cpu_percent": round(self.cpu, 2),
            "memory_percent": round(self.memory, 2),
            "name": self.name,
            "region": self.region,
            "active": self.active,
            "duties": list(self.duties),
        }

    # --- state -------------------------------------------------------------------------
    def snapshot_json(self) -> str:
        """The snapshot as served: encoded once, for both the checksum and the body."""
        body = _canonical(
            {
                "master": self.name,
                "region": self.region,
                "sessions": self.sessions,
                "pending_messages": self.pending,
                "config": self.config,
                "imported": self.imported,
            }
        )
        checksum = hashlib.sha256(body.encode()).hexdigest()
        return f'{body[:-1]},"checksum":"{checksum}"}}'

    def snapshot(self) -> dict[str, Any]:
        """A detached copy: later messages do not change a snapshot already taken."""
        return json.loads(self.snapshot_json())

    @staticmethod
    def verify_snapshot(snap: Any) -> str:
        """The checksum of a well-formed, untampered snapshot; ValueError otherwise."""
        if not isinstance(snap, dict):
            raise ValueError("snapshot must be a JSON object")
        for key, kind in _SNAPSHOT_TYPES.items():
            if key not in snap:
                raise ValueError(f"snapshot lacks {key!r}")
            if not isinstance(snap[key], kind):
                raise ValueError(f"snapshot {key!r} has the wrong type")
        if not snap["master"]:
            raise ValueError("snapshot 'master' is empty")
        checksum = snapshot_checksum(snap)
        if checksum != snap["checksum"]:
            raise ValueError("checksum does not match the snapshot")
        return checksum

    def import_snapshot(self, snap: Any, checksum: str | None = None) -> str:
        """Keep another master's snapshot, as received, under its name: importing it twice
        keeps one copy, and the checksum answered is that of what is stored."""
        stored = checksum or self.verify_snapshot(snap)
        self.imported[snap["master"]] = snap
        return stored

    def drop_import(self, source: str) -> bool:
        return self.imported.pop(source, None) is not None

    # --- messages and duties -------------------------------------------------------------
    def accept(self, message: dict[str, Any]) -> bool:
        """Take a message; False when its id was seen before (masters dedupe by id)."""
        mid = _message_id(message.get("id"))
        if mid is None:
            raise ValueError("message needs an id (a non-empty string)")
        if mid in self._seen:
            return False
        self._seen.add(mid)
        self.accepted.append(mid)
        self.pending.append(message)
        chat = _message_id(message.get("chat", message.get("session")))
        if chat is not None:
            now = round(time.time(), 3)
            session = self.sessions.setdefault(
                chat, {"phone": chat, "opened_at": now, "messages": 0}
            )
            session["messages"] = session.get("messages", 0) + 1
            session["last_seen"] = now
        return True

    def activate(self, taken_over: str | None = None) -> dict[str, Any]:
        """Serve, holding ``taken_over``'s duty (or, with none, its own)."""
        duty = taken_over or self.name
        self.active = True
        if duty not in self.duties:
            self.duties.append(duty)
        return {"active": True, "duties": list(self.duties)}

    def deactivate(self, taken_over: str | None = None) -> dict[str, Any]:
        """Release one duty (a master left with none goes back to standby), or with none
        named, fence: stop serving altogether. Imported state is kept either way."""
        if taken_over:
            if taken_over in self.duties:
                self.duties.remove(taken_over)
            self.active = self.active and bool(self.duties)
        else:
            self.active = False
            self.duties = []
        return {"active": self.active, "duties": list(self.duties)}

    def set_chaos(
        self, mode: str | None, delay_seconds: Any = None, queue_length: Any = None
    ) -> dict[str, Any]:
        """Validate everything before changing anything: a bad call leaves the mode as is."""
        if mode is not None and mode not in CHAOS_MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(CHAOS_MODES)}")
        number = int | float
        if delay_seconds is not None and (
            isinstance(delay_seconds, bool)
            or not isinstance(delay_seconds, number)
            or not 0 <= delay_seconds <= HANG_SECONDS
        ):
            raise ValueError(f"delay_seconds must be a number of seconds, 0 to {HANG_SECONDS:g}")
        if queue_length is not None and (
            isinstance(queue_length, bool) or not isinstance(queue_length, int) or queue_length < 0
        ):
            raise ValueError("queue_length must be a non-negative integer")
        if mode is not None:
            self.mode = mode
            self.delay = 1.0 if delay_seconds is None else float(delay_seconds)
        if queue_length is not None:
            self.backlog = queue_length
        return {"mode": self.mode, "delay_seconds": self.delay, "queue_length": self.queue_length}

    async def hang(self) -> None:
        """Hold a request like a frozen process: until healed, shut down, or an hour."""
        deadline = time.monotonic() + HANG_SECONDS
        while self.mode == "hang" and not self.stopping and time.monotonic() < deadline:
            await asyncio.sleep(_HANG_POLL)

    async def run(self) -> None:
        """The background clock: one :meth:`step` per tick, until cancelled."""
        while True:
            await asyncio.sleep(TICK)
            self.step(TICK)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


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
            return _error(exc.status, str(exc))
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

    async def get_state(_: web.Request) -> web.Response:
        return web.Response(text=master.snapshot_json(), content_type="application/json")

    async def post_state(request: web.Request) -> web.Response:
        raw = await _read_body(request, MAX_STATE_BODY)
        if len(raw) > _THREAD_PARSE:  # keep /health answering during a big import
            snap, checksum = await asyncio.to_thread(_parse_and_verify, raw)
        else:
            snap, checksum = _parse_and_verify(raw)
        master.import_snapshot(snap, checksum)
        log.info("%s imported the state of %s", master.name, snap["master"])
        return web.json_response({"checksum": checksum, "master": snap["master"]})

    async def delete_state(request: web.Request) -> web.Response:
        return web.json_response({"removed": master.drop_import(request.match_info["source"])})

    async def activate(request: web.Request) -> web.Response:
        out = master.activate(_optional_name(await _json_body(request), "taken_over"))
        log.info("%s active, duties %s", master.name, out["duties"])
        return web.json_response(out)

    async def deactivate(request: web.Request) -> web.Response:
        taken = _optional_name(await _json_body(request), "taken_over")
        out = master.deactivate(taken)
        log.info("%s released %s, duties %s", master.name, taken or "everything", out["duties"])
        return web.json_response(out)

    async def post_message(request: web.Request) -> web.Response:
        if not master.active:
            raise Reject(503, "inactive")
        try:
            fresh = master.accept(await _json_body(request))
        except ValueError as exc:
            raise Reject(400, str(exc)) from None
        return web.json_response(
            {"accepted": True, "duplicate": not fresh}, status=202 if fresh else 200
        )

    async def get_messages(_: web.Request) -> web.Response:
        return web.json_response({"ids": master.accepted, "count": len(master.accepted)})

    async def post_chaos(request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            out = master.set_chaos(
                body.get("mode"), body.get("delay_seconds"), body.get("queue_length")
            )
        except ValueError as exc:
            raise Reject(400, str(exc)) from None
        log.warning("%s chaos: %s", master.name, out)
        return web.json_response(out)

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
