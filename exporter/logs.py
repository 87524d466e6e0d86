"""Logging setup: readable text for people, one JSON object per line for log pipelines.

Structured fields passed with ``extra=`` (master, from, to, reason, event, step...) are kept
in both formats, so a transition can be found by master name in either.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Hashable
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("apscheduler", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Throttle:
    """Admits one event per key every ``every`` seconds and counts the rest, so a failure that
    recurs on every probe, scrape or bad request costs a line per period, not one each. At
    most ``max_keys`` keys are remembered (then it starts over), so no client can grow it."""

    def __init__(
        self,
        every: float = 10.0,
        max_keys: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every, self.max_keys, self.clock = every, max_keys, clock
        self._seen: dict[Hashable, tuple[float, int]] = {}

    def admit(self, key: Hashable) -> int | None:
        """None to stay quiet; else how many events of ``key`` were left out since the last
        one admitted."""
        now = self.clock()
        last, skipped = self._seen.get(key, (float("-inf"), 0))
        if now - last < self.every:
            self._seen[key] = (last, skipped + 1)
            return None
        if key not in self._seen and len(self._seen) >= self.max_keys:
            self._seen.clear()
        self._seen[key] = (now, 0)
        return skipped


class ThrottledLog:
    """``error(key, ...)`` logs (with the traceback) at most once per ``interval`` per key,
    saying how often the failure recurred in between."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self._throttle = Throttle(interval, clock=clock)

    def error(self, key: str, msg: str, *args: object, exc_info: bool = True) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``interval`` ago; True if
        logged. Call it from an ``except`` block for the traceback."""
        skipped = self._throttle.admit(key)
        if skipped is None:
            return False
        if skipped:
            msg += " (%d more times since the last report)"
            args = (*args, skipped)
        self.logger.error(msg, *args, exc_info=exc_info)
        return True
