"""The engine's tests run on both event loops the exporter may run on: asyncio's and uvloop
(``ha-exporter run`` uses uvloop where it is installed). Other probing tests keep asyncio's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux only
    uvloop = None  # type: ignore[assignment]

BOTH_LOOPS = ("test_engine",)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    module = getattr(item, "module", None)
    if uvloop is not None and module is not None and module.__name__.endswith(BOTH_LOOPS):
        factories["uvloop"] = uvloop.new_event_loop
    return factories
