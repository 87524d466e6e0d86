"""Throttled logging: a recurring failure is logged once per interval, with how often it
recurred meanwhile."""

from __future__ import annotations

import logging

from exporter.logs import ThrottledLog


def test_logs_once_per_interval_per_key(caplog):
    now = [1000.0]
    throttled = ThrottledLog(logging.getLogger("test.throttle"), 60.0, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, "test.throttle"):
        assert throttled.error("a", "metric %s failed", "x", exc_info=False)
        for _ in range(5):
            now[0] += 1
            assert not throttled.error("a", "metric %s failed", "x", exc_info=False)
        assert throttled.error("b", "other key", exc_info=False)  # keys are independent
        now[0] += 60
        assert throttled.error("a", "metric %s failed", "x", exc_info=False)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "metric x failed",
        "other key",
        "metric x failed (5 more times since the last report)",
    ]
