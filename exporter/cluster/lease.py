"""One replica's lease: its membership, its leadership and its verdicts all hang on it.

The replica may act as leader only while ``valid()``: until the send time of its last
successful keep-alive plus the TTL etcd then reported, less a safety margin. etcd counts the
TTL from when it received that keep-alive, which is later, so the replica stops acting before
etcd can have expired the lease and let another replica lead (self-fencing). A process that
was paused (SIGSTOP) or starved finds its monotonic clock past the bound as soon as it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from exporter.cluster.etcd import Etcd, EtcdError, LeaseLost

log = logging.getLogger(__name__)

MARGIN = 0.2  # share of the TTL kept as safety against clock-rate drift and scheduling


class MemberLease:
    """Grants a lease, keeps it alive every ``ttl / 3``, re-grants after losing it.

    ``on_change`` is called with the new lease id after each grant and with None when the
    lease is lost or a keep-alive fails (the owner steps down at once)."""

    def __init__(self, etcd: Etcd, ttl: float, on_change: Callable[[int | None], None]) -> None:
        self.etcd = etcd
        self.ttl = ttl
        self.on_change = on_change
        self.id: int | None = None
        self._valid_until = 0.0
        self._troubled = False
        self._task: asyncio.Task[None] | None = None
        self.failures = 0  # keep-alives or grants that failed, for logs and metrics

    def valid(self) -> bool:
        """Whether the lease can still be ours: granted, its last keep-alive answered, and
        within the bound above."""
        return self.id is not None and not self._troubled and time.monotonic() < self._valid_until

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster-lease")

    async def stop(self, revoke: bool = True) -> None:
        """Stop keeping the lease alive; ``revoke`` lets the others take over at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        lease, self.id = self.id, None
        if revoke and lease is not None:
            with contextlib.suppress(EtcdError):
                await self.etcd.revoke(lease)

    async def _run(self) -> None:
        while True:
            sent = time.monotonic()
            try:
                if self.id is None:
                    lease = await self.etcd.grant(self.ttl)
                    self.id, self._valid_until = lease, sent + self.ttl * (1 - MARGIN)
                    log.info("cluster lease %x granted (ttl %gs)", lease, self.ttl,
                             extra={"event": "cluster_lease", "lease": lease})
                else:
                    left = await self.etcd.keepalive(self.id)
                    self._valid_until = sent + left - self.ttl * MARGIN
                    if not self._troubled:
                        await asyncio.sleep(self.ttl / 3)
                        continue
                    log.info("cluster lease %x kept alive again", self.id,
                             extra={"event": "cluster_lease_back"})
                self._troubled = False
                self.on_change(self.id)
                await asyncio.sleep(self.ttl / 3)
            except LeaseLost as exc:
                self._lose(self.id, f"lease expired: {exc}", expired=True)
                await asyncio.sleep(min(self.ttl / 3, 1.0))
            except EtcdError as exc:
                # the lease may still be alive: stop acting now, retry quickly
                self._lose(self.id, f"keep-alive failed: {exc}", expired=False)
                await asyncio.sleep(min(self.ttl / 3, 1.0))

    def _lose(self, lease: int | None, why: str, expired: bool) -> None:
        self.failures += 1
        first = not self._troubled
        self._troubled = True
        if expired or (lease is not None and time.monotonic() >= self._valid_until):
            self.id, self._valid_until = None, 0.0
        if first or (self.id is None and lease is not None):
            log.warning("cluster lease %s: %s; not acting until it is back",
                        f"{lease:x}" if lease is not None else "(none)", why,
                        extra={"event": "cluster_lease_lost", "why": why})
        self.on_change(None)
