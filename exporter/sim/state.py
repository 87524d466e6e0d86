"""The simulated master's state and behaviour, with no I/O: checked without a server.

It stands in for a WhatsApp-bot "master" account (phone-number sessions, pending messages,
a region); time advances only through :meth:`SimulatedMaster.step`. The HTTP layer is
``exporter.sim.master``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
import time
from typing import Any

log = logging.getLogger(__name__)

CHAOS_MODES = ("ok", "down", "hang", "slow", "error", "garbage")
ROLES = ("active", "standby")
MAX_BODY = 1 << 20  # 1 MiB: messages and control calls
MAX_STATE_BODY = 64 << 20  # a big master's snapshot is far larger than any message
HANG_SECONDS = 3600.0
TICK = 0.1  # seconds per simulation step
_HANG_POLL = 0.05
THREAD_PARSE = 256 << 10  # above this, parsing and hashing a snapshot leave the event loop
_SNAPSHOT_TYPES: dict[str, type | tuple[type, ...]] = {
    "master": str,
    "sessions": dict,
    "pending_messages": list,
    "checksum": str,
}
MAX_SEQ = 2**53  # watermarks stay exact in readers that parse JSON numbers as doubles
_COUNTRY = {"uae": "+9715", "usa": "+1202"}
_EPOCH = 1_735_689_600  # 2025-01-01: seeded sessions look real and stay deterministic


def _canonical(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def snapshot_checksum(snapshot: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``snapshot`` without its own ``checksum`` key: the
    protocol's one rule, shared by masters and the exporter so either can verify the other."""
    body = {k: v for k, v in snapshot.items() if k != "checksum"}
    return hashlib.sha256(_canonical(body).encode()).hexdigest()


def _clamp(value: float, low: float = 0.0, high: float = 100.0) -> float:
    return max(low, min(high, value))


def watermark_of(snapshot: dict[str, Any]) -> int | None:
    """A snapshot's ``watermark`` when it is a valid one (an integer 0..2**53); anything else
    is no watermark, so a reader replays everything rather than trust a bad number."""
    value = snapshot.get("watermark")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        return None
    return value


def _message_id(value: Any) -> str | None:
    """Ids are strings (integers tolerated); anything else cannot be deduplicated sensibly."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value) or None


class Reject(Exception):
    """A request refused with a status and a reason; the app answers it as JSON
    (``{"error": message, **extra}``)."""

    def __init__(self, status: int, message: str, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra or {}


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
        self.refused_observers: frozenset[str] = frozenset()  # set by chaos
        self.probes_by_observer: dict[str, int] = {}  # /health asked, by X-HA-Observer
        self.activations = 0  # duties taken on by /activate (an idempotent repeat is not one)
        self.activate_calls = 0
        self.stale_refused = 0  # control calls refused for a lower epoch
        self.backlog = 0  # injected by chaos: stays until cleared, like a stuck consumer
        self.stopping = False  # set on shutdown: hung requests let go
        self.pending: list[dict[str, Any]] = []
        self.accepted: list[str] = []
        self.seq = 0  # the highest sequence number given to an accepted message
        self._seen: dict[str, int] = {}  # message id -> its sequence number
        self.imported: dict[str, dict[str, Any]] = {}
        self._imported_ids: dict[str, frozenset[str]] = {}  # pending ids of each import
        self.epoch: int | None = None  # the highest fencing epoch obeyed; kept in memory only
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
            "epoch": self.epoch,
            "watermark": self.seq,
            "imported_watermarks": self.imported_watermarks(),
        }

    def imported_watermarks(self) -> dict[str, int]:
        """The watermark of each imported snapshot that carries a valid one."""
        marks = {src: watermark_of(snap) for src, snap in self.imported.items()}
        return {src: mark for src, mark in marks.items() if mark is not None}

    # --- fencing epochs ------------------------------------------------------------------
    def admit(self, epoch: int | None) -> None:
        """Refuse a control call from a controller older than one already obeyed (409); a
        call without an epoch comes from a controller that predates epochs and is let in."""
        if epoch is not None and self.epoch is not None and epoch < self.epoch:
            self.stale_refused += 1
            raise Reject(409, "stale epoch", {"epoch": self.epoch})

    def obey(self, epoch: int | None) -> None:
        """Admit the call and remember its epoch; called right before its effect, with no
        await in between, so a newer controller's call can never be overtaken."""
        self.admit(epoch)
        if epoch is not None:
            self.epoch = epoch if self.epoch is None else max(self.epoch, epoch)

    # --- state -------------------------------------------------------------------------
    def snapshot_json(self) -> str:
        """The snapshot as served: encoded once, for both the checksum and the body."""
        return self.snapshot_and_checksum()[0]

    def snapshot_and_checksum(self) -> tuple[str, str]:
        """The snapshot as served and its checksum (also its ETag)."""
        body = _canonical(
            {
                "master": self.name,
                "region": self.region,
                "sessions": self.sessions,
                "pending_messages": self.pending,
                "config": self.config,
                "imported": self.imported,
                "watermark": self.seq,
            }
        )
        checksum = hashlib.sha256(body.encode()).hexdigest()
        return f'{body[:-1]},"checksum":"{checksum}"}}', checksum

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
        keeps one copy, and the checksum answered is that of what is stored. Its pending ids
        count as seen, so a producer replaying that master's messages cannot get one taken
        twice."""
        stored = checksum or self.verify_snapshot(snap)
        self.imported[snap["master"]] = snap
        ids = (_message_id(m.get("id")) for m in snap["pending_messages"] if isinstance(m, dict))
        self._imported_ids[snap["master"]] = frozenset(i for i in ids if i is not None)
        return stored

    def drop_import(self, source: str) -> bool:
        self._imported_ids.pop(source, None)
        return self.imported.pop(source, None) is not None

    # --- messages and duties -------------------------------------------------------------
    def accept(self, message: dict[str, Any]) -> bool:
        """Take a message and number it (:meth:`seq_of`); False when its id was seen before,
        taken here or pending in an imported snapshot (masters dedupe by id)."""
        mid = _message_id(message.get("id"))
        if mid is None:
            raise ValueError("message needs an id (a non-empty string)")
        if mid in self._seen or any(mid in ids for ids in self._imported_ids.values()):
            return False
        if self.seq >= MAX_SEQ:
            raise ValueError("message sequence numbers exhausted")
        self.seq += 1
        self._seen[mid] = self.seq
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

    def seq_of(self, message_id: Any) -> int | None:
        """The sequence number this master gave the message; None when it holds the message
        only in an imported snapshot (numbered by the master it came from) or not at all."""
        mid = _message_id(message_id)
        return None if mid is None else self._seen.get(mid)

    def activate(self, taken_over: str | None = None) -> dict[str, Any]:
        """Serve, holding ``taken_over``'s duty (or, with none, its own)."""
        duty = taken_over or self.name
        self.active = True
        self.activate_calls += 1
        if duty not in self.duties:
            self.duties.append(duty)
            self.activations += 1
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
        self, mode: str | None, delay_seconds: Any = None, queue_length: Any = None,
        refuse_observers: Any = None,
    ) -> dict[str, Any]:
        """Validate everything before changing anything: a bad call leaves the mode as is.
        ``refuse_observers``: names of exporter replicas (their ``X-HA-Observer`` probe
        header) whose probes of /health get 503, as if only they were cut off."""
        if refuse_observers is not None and (
            not isinstance(refuse_observers, list)
            or len(refuse_observers) > 64
            or not all(isinstance(o, str) and 0 < len(o) <= 200 for o in refuse_observers)
        ):
            raise ValueError("refuse_observers must be a list of up to 64 observer names")
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
        if refuse_observers is not None:
            self.refused_observers = frozenset(refuse_observers)
        return {"mode": self.mode, "delay_seconds": self.delay, "queue_length": self.queue_length}

    def count_probe(self, observer: str | None) -> None:
        """One /health request, counted by the replica that sent it (at most 64 names kept,
        then "(other)"), so tests can see which replicas probe this master."""
        name = observer or "(none)"
        counts = self.probes_by_observer
        if name not in counts and len(counts) >= 64:
            name = "(other)"
        counts[name] = counts.get(name, 0) + 1

    def chaos_state(self) -> dict[str, Any]:
        """``GET /chaos``: the knobs as set, and what tests count on the master's side."""
        return {"mode": self.mode, "delay_seconds": self.delay, "queue_length": self.queue_length,
                "refuse_observers": sorted(self.refused_observers),
                "probes_by_observer": dict(self.probes_by_observer),
                "activations": self.activations, "activate_calls": self.activate_calls,
                "stale_refused": self.stale_refused, "epoch": self.epoch}

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
