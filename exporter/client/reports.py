"""Outcome reports sent in the background while the client routes locally.

A report feeds the exporter's passive outlier detection and in-flight load, so it is worth
sending while an exporter answers; but a producer must not wait on an exporter it no longer
needs for routing. Reports wait in a bounded queue drained by a few tasks. While no exporter
answers (``Exporters.up`` is False) or the queue is full, a report is dropped and counted,
never queued forever: an exporter that comes back probes the masters itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from exporter.client.wire import Exporters

log = logging.getLogger(__name__)

Outcome = Literal["sent", "refused", "lost"]
Post = Callable[[str, bool, float], Awaitable[Outcome]]
WORKERS = 4


class Reporter:
    def __init__(self, post: Post, exporters: Exporters, capacity: int) -> None:
        self._post, self._exporters = post, exporters
        self._queue: asyncio.Queue[tuple[str, bool, float]] = asyncio.Queue(capacity)
        self._tasks: list[asyncio.Task[None]] = []
        self.sent = self.refused = self.dropped = 0

    def submit(self, master: str, ok: bool, latency: float) -> None:
        if not self._exporters.up:
            self.dropped += 1
            return
        try:
            self._queue.put_nowait((master, ok, latency))
        except asyncio.QueueFull:
            self.dropped += 1
            return
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._work(), name=f"client-reports-{i}")
                           for i in range(WORKERS)]

    async def _work(self) -> None:
        while True:
            master, ok, latency = await self._queue.get()
            outcome: Outcome = "lost"
            try:
                if self._exporters.up:
                    outcome = await self._post(master, ok, latency)
            except asyncio.CancelledError:
                self.dropped += 1
                raise
            except Exception:  # a bug must not stop the reports for good
                log.exception("report for %s crashed", master)
            finally:
                self._queue.task_done()
            self.count(outcome)

    def count(self, outcome: Outcome) -> None:
        if outcome == "sent":
            self.sent += 1
        elif outcome == "refused":
            self.refused += 1
        else:
            self.dropped += 1

    async def close(self, timeout: float) -> None:
        """Send what is queued for up to ``timeout`` seconds, then drop the rest."""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._queue.join()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        self.dropped += self._queue.qsize()
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
