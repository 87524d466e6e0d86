"""State checkpoints: the latest GET /state of every serving active master, kept in the store.

Why: a master that dies cannot hand over its state, so the failover falls back to the newest
checkpoint; the checkpoint's age (a metric) is how much state such a failover would lose.
Snapshots are verified (checksum) before they replace the previous one: a corrupt pull never
overwrites a good checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from exporter.failover.protocol import MasterCallError, MasterClient
from exporter.fleet import SERVING, MasterRuntime
from exporter.store.sqlite import Store

log = logging.getLogger(__name__)


class Checkpointer:
    """Pulls and stores checkpoints; ``times`` mirrors the store for cheap age metrics."""

    def __init__(self, store: Store, client: MasterClient, concurrency: int = 16) -> None:
        self.store = store
        self.client = client
        self.concurrency = concurrency
        self.times: dict[str, float] = store.checkpoint_times()
        self.errors: dict[str, str] = {}

    def ages(self, now: float | None = None) -> dict[str, float]:
        now = time.time() if now is None else now
        return {name: max(0.0, now - ts) for name, ts in self.times.items()}

    async def pull(self, rt: MasterRuntime, timeout: float) -> bool:
        """One checkpoint of one master; False (and the reason in ``errors``) on failure."""
        try:
            snap = await self.client.get_state(rt.name, rt.config.url, timeout=timeout)
        except MasterCallError as exc:
            self._failed(rt.name, exc.reason)
            return False
        if snap.master not in (None, rt.name):
            self._failed(rt.name, f"snapshot is the state of {snap.master!r}")
            return False
        now = time.time()
        await self.store.asave_checkpoint(rt.name, now, snap.checksum, snap.raw)
        self.times[rt.name] = now
        if self.errors.pop(rt.name, None) is not None:
            log.info("checkpoints of %s work again", rt.name,
                     extra={"event": "checkpoint", "master": rt.name, "ok": True})
        log.debug("checkpoint of %s: %d bytes, checksum %s", rt.name, snap.size,
                  snap.checksum[:12], extra={"event": "checkpoint", "master": rt.name,
                                             "ok": True, "bytes": snap.size})
        return True

    def _failed(self, name: str, reason: str) -> None:
        """Log a failure when it starts or its reason changes, not on every round: at
        10,000 masters a per-round line each would drown the log."""
        if self.errors.get(name) != reason:
            log.warning("checkpoint of %s failed: %s (logged again only if the reason changes)",
                        name, reason, extra={"event": "checkpoint", "master": name, "ok": False})
        self.errors[name] = reason

    async def round(self, masters: Iterable[MasterRuntime], timeout: float,
                    skip: Callable[[str], bool] = lambda _name: False) -> dict[str, bool]:
        """Checkpoint every serving one of ``masters`` (bounded concurrency); {name: ok}."""
        todo = [rt for rt in masters if rt.health.state in SERVING and not skip(rt.name)]
        sem = asyncio.Semaphore(self.concurrency)

        async def one(rt: MasterRuntime) -> tuple[str, bool]:
            async with sem:
                return rt.name, await self.pull(rt, timeout)

        results = await asyncio.gather(*(one(rt) for rt in todo))
        return dict(results)

    def forget(self, names: Iterable[str]) -> None:
        for name in names:
            self.times.pop(name, None)
            self.errors.pop(name, None)
