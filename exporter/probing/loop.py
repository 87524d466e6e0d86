"""The event loop the long-running commands use: uvloop where it is installed (a declared
dependency on Linux), asyncio's own loop elsewhere.

The probe hot loop is mostly event-loop work (wake-ups, socket reads and writes, callbacks);
uvloop does that in C on libuv and halves its cost (docs/benchmarks.md). Set
``HA_EXPORTER_EVENT_LOOP=asyncio`` to run on asyncio's loop anyway (to compare, or to rule the
loop out when chasing a problem).
"""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger(__name__)

ENV = "HA_EXPORTER_EVENT_LOOP"


def install_fast_loop() -> str:
    """Make ``asyncio.run`` use uvloop from now on, when it is installed and not opted out.
    Returns the name of the loop that will run: ``"uvloop"`` or ``"asyncio"``."""
    if os.environ.get(ENV, "").strip().lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
