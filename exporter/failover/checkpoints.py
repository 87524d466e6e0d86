"""State checkpoints: the latest GET /state of every serving active master, kept in the store.

Why: a master that dies cannot hand over its state, so the failover falls back to the newest
checkpoint; the checkpoint's age (a metric) is how much state such a failover would lose.
Snapshots are verified (checksum) before they replace the previous one: a corrupt pull never
overwrites a good checkpoint.

A master that sends an ``ETag`` is asked with ``If-None-Match``: its 304 says the stored
checkpoint is still its state, so the checkpoint is kept and stamped current, and an idle fleet
costs a round trip per master instead of all its snapshots every interval. Failures are counted
per master and reason (``failures``, the source of ``ha_master_checkpoint_failures_total``) and
logged once per change of reason.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Literal, NamedTuple

from exporter.failover.protocol import FAILURE_KINDS, FailureKind, MasterCallError, MasterClient
from exporter.fleet import SERVING, MasterRuntime
from exporter.store.sqlite import Store, StoreError

log = logging.getLogger(__name__)

#: Why a checkpoint failed: the protocol's failure kinds, or the store refused it.
CheckpointFailure = Literal[FailureKind, "store"]
FAILURE_REASONS: tuple[CheckpointFailure, ...] = (*FAILURE_KINDS, "store")
_STORE_ERRORS = (StoreError, sqlite3.Error, OSError)


class _Tagged(NamedTuple):
    """The ETag a master sent with the snapshot stored as its checkpoint, and that
    snapshot's checksum (a 304 to the tag vouches for exactly that checkpoint)."""

    etag: str
    checksum: str


class Checkpointer:
    """Pulls and stores checkpoints; ``times`` mirrors the store for cheap age metrics,
    ``errors`` holds the current failure text of each master that fails."""

    def __init__(self, store: Store, client: MasterClient, concurrency: int = 16) -> None:
        self.store = store
        self.client = client
        self.concurrency = concurrency
        self.times: dict[str, float] = store.checkpoint_times()
        self.errors: dict[str, str] = {}
        self._failures: dict[tuple[str, str], int] = {}
        self._tags: dict[str, _Tagged] = {}

    @property
    def failures(self) -> Mapping[tuple[str, str], int]:
        """(master, reason) -> failed checkpoints since start, a read-only view; every reason
        is one of ``FAILURE_REASONS``."""
        return MappingProxyType(self._failures)

    def ages(self, now: float | None = None) -> dict[str, float]:
        now = time.time() if now is None else now
        return {name: max(0.0, now - ts) for name, ts in self.times.items()}

    async def pull(self, rt: MasterRuntime, timeout: float) -> bool:
        """One checkpoint of one master; False (and the reason in ``errors``) on failure."""
        name = rt.name
        tagged = self._tags.get(name)
        try:
            snap = await self.client.get_state_if_changed(
                name, rt.config.url, tagged.etag if tagged else None, timeout=timeout)
        except MasterCallError as exc:
            self._failed(name, exc.kind, exc.reason)
            return False
        if snap is None:  # 304: only ever asked with a tag, so ``tagged`` is set
            assert tagged is not None
            return await self._still_current(rt, tagged, timeout)
        if snap.master not in (None, name):
            self._failed(name, "invalid", f"snapshot is the state of {snap.master!r}")
            return False
        now = time.time()
        try:
            await self.store.asave_checkpoint(name, now, snap.checksum, snap.raw)
        except _STORE_ERRORS as exc:
            self._tags.pop(name, None)
            self._failed(name, "store", f"cannot store the checkpoint: {exc}")
            return False
        if snap.etag:
            self._tags[name] = _Tagged(snap.etag, snap.checksum)
        else:
            self._tags.pop(name, None)
        self._succeeded(name, now)
        log.debug("checkpoint of %s: %d bytes, checksum %s", name, snap.size,
                  snap.checksum[:12], extra={"event": "checkpoint", "master": name,
                                             "ok": True, "bytes": snap.size})
        return True

    async def _still_current(self, rt: MasterRuntime, tagged: _Tagged, timeout: float) -> bool:
        """The master's 304: its kept checkpoint is stamped as taken now. When the kept
        checkpoint is no longer the one the tag names, the state is read again in full."""
        name, now = rt.name, time.time()
        try:
            current = self.store.touch_checkpoint(name, now, tagged.checksum)
        except _STORE_ERRORS as exc:
            self._failed(name, "store", f"cannot refresh the checkpoint: {exc}")
            return False
        if not current:
            self._tags.pop(name, None)
            return await self.pull(rt, timeout)  # untagged now: a full read, no recursion
        self._succeeded(name, now)
        log.debug("checkpoint of %s unchanged (ETag %s)", name, tagged.etag[:40],
                  extra={"event": "checkpoint", "master": name, "ok": True, "bytes": 0})
        return True

    def _succeeded(self, name: str, now: float) -> None:
        self.times[name] = now
        if self.errors.pop(name, None) is not None:
            log.info("checkpoints of %s work again", name,
                     extra={"event": "checkpoint", "master": name, "ok": True})

    def _failed(self, name: str, reason: CheckpointFailure, text: str) -> None:
        """Count every failure; log one when it starts or its text changes, not on every
        round: at 10,000 masters a per-round line each would drown the log."""
        key = (name, reason)
        self._failures[key] = self._failures.get(key, 0) + 1
        if self.errors.get(name) != text:
            log.warning("checkpoint of %s failed: %s (logged again only if the reason changes)",
                        name, text, extra={"event": "checkpoint", "master": name, "ok": False,
                                           "reason": reason})
        self.errors[name] = text

    async def round(self, masters: Iterable[MasterRuntime], timeout: float,
                    skip: Callable[[str], bool] = lambda _name: False) -> dict[str, bool]:
        """Checkpoint every serving one of ``masters`` (bounded concurrency); {name: ok}."""
        todo = [rt for rt in masters if rt.health.state in SERVING and not skip(rt.name)]
        sem = asyncio.Semaphore(self.concurrency)

        async def one(rt: MasterRuntime) -> tuple[str, bool]:
            async with sem:
                return rt.name, await self.pull(rt, timeout)

        results = await asyncio.gather(*(one(rt) for rt in todo))
        try:
            await self.store.aflush_stamps()  # the round's 304s, in one transaction
        except _STORE_ERRORS as exc:
            log.warning("checkpoint times not written: %s", exc)
        return dict(results)

    def forget(self, names: Iterable[str]) -> None:
        """Drop everything kept about masters no longer configured (their failure counts
        too: the series of a removed master ends)."""
        gone = set(names)
        for name in gone:
            self.times.pop(name, None)
            self.errors.pop(name, None)
            self._tags.pop(name, None)
        for key in [k for k in self._failures if k[0] in gone]:
            del self._failures[key]
