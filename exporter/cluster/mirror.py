"""A local copy of everything under the cluster prefix, kept current by one etcd watch.

Every replica reads members, the leader, verdicts and facts from this copy instead of asking
etcd: one read of the prefix at start (and after a broken watch), then only the changes. When
the watch breaks the copy is read again in full and the differences are reported as changes,
so a consumer never misses a put or a delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from exporter.cluster.etcd import Etcd, EtcdError, KeyValue, WatchEvent

log = logging.getLogger(__name__)

# called with the key and its new value (None: deleted) for every change
Listener = Callable[[str, KeyValue | None], None]
RETRY = 1.0  # seconds between attempts while etcd does not answer


class Mirror:
    def __init__(self, etcd: Etcd, prefix: str, listener: Listener) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.listener = listener
        self.kvs: dict[str, KeyValue] = {}
        self.revision = 0
        self.synced = asyncio.Event()  # set while the copy follows etcd
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster-mirror")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def under(self, prefix: str) -> dict[str, KeyValue]:
        return {k: kv for k, kv in self.kvs.items() if k.startswith(prefix)}

    async def _run(self) -> None:
        failed = False
        while True:
            try:
                await self._resync()
                if failed:
                    log.info("cluster: etcd answers again (revision %d)", self.revision,
                             extra={"event": "etcd_back"})
                failed = False
                async for events in self.etcd.watch(self.prefix, self.revision + 1):
                    self._apply(events)
            except EtcdError as exc:
                if not failed:
                    log.warning("cluster: etcd watch lost: %s", exc,
                                extra={"event": "etcd_lost", "error": str(exc)})
                failed = True
            self.synced.clear()
            await asyncio.sleep(RETRY)

    async def _resync(self) -> None:
        kvs, revision = await self.etcd.get_prefix(self.prefix)
        fresh = {kv.key: kv for kv in kvs}
        old, self.kvs, self.revision = self.kvs, fresh, revision
        for key in old.keys() - fresh.keys():
            self.listener(key, None)
        for key, kv in fresh.items():
            before = old.get(key)
            if before is None or before.mod_revision != kv.mod_revision:
                self.listener(key, kv)
        self.synced.set()

    def _apply(self, events: list[WatchEvent]) -> None:
        for event in events:
            key = event.kv.key
            self.revision = max(self.revision, event.kv.mod_revision)
            if event.kind == "delete":
                if self.kvs.pop(key, None) is not None:
                    self.listener(key, None)
            else:
                self.kvs[key] = event.kv
                self.listener(key, event.kv)
