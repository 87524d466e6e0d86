"""How the state store is doing: failures counted by operation, the current reason, and one log
line per change.

Why: a failing store must be visible (``ha_state_store_errors_total{op}``, ``/readyz``) without
flooding the log when every probe round's write is refused: a line when the reason starts or
changes, one when the store works again, and a throttled reminder while it stays failing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType

from exporter.logs import Throttle

log = logging.getLogger(__name__)

REMIND_EVERY = 60.0


class StoreHealth:
    """Counters and reason of one store; safe to update from the checkpoint worker thread."""

    def __init__(self, path: str, remind_every: float = REMIND_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._errors: dict[str, int] = {}
        self.errors: Mapping[str, int] = MappingProxyType(self._errors)
        self.failing: str | None = None
        self._lock = threading.Lock()
        self._remind = Throttle(remind_every, clock=clock)
        self._drops = Throttle(remind_every, clock=clock)

    def count(self, op: str) -> None:
        """One more write or read of ``op`` that did not reach the file."""
        with self._lock:
            self._errors[op] = self._errors.get(op, 0) + 1

    def failed(self, op: str, exc: BaseException) -> None:
        """SQLite refused an ``op``: counted, and logged if the reason is new."""
        reason = str(exc) or type(exc).__name__
        with self._lock:
            self._errors[op] = self._errors.get(op, 0) + 1
            changed, self.failing = reason != self.failing, reason
        if changed:
            self._remind.admit("failing")  # the reminder period starts now
            log.error("state store %s failing: %s (on %s); its writes are kept in memory and "
                      "written when it works again", self.path, reason, op,
                      extra={"event": "store_failing", "op": op, "reason": reason})

    def still_failing(self, waiting: int) -> None:
        """A retry failed again: a reminder at most every ``remind_every`` seconds."""
        skipped = self._remind.admit("failing")
        if skipped is not None:
            log.warning("state store %s still failing (%s): %d writes waiting in memory, lost "
                        "if the exporter stops before it works again", self.path, self.failing,
                        waiting, extra={"event": "store_failing", "waiting": waiting})

    def dropped(self, total: int, limit: int) -> None:
        """The backlog dropped its oldest audit entry to stay within ``limit``."""
        skipped = self._drops.admit("dropped")
        if skipped is not None:
            log.warning("state store backlog full (%d writes): oldest audit entries dropped, "
                        "%d so far", limit, total,
                        extra={"event": "store_backlog_drop", "dropped": total})

    def recovered(self, replayed: int) -> None:
        """A replay succeeded: the reason is cleared."""
        with self._lock:
            was, self.failing = self.failing, None
        if was is not None:
            log.warning("state store %s works again (was: %s); %d waiting writes written",
                        self.path, was, replayed,
                        extra={"event": "store_recovered", "replayed": replayed})
