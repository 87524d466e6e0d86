"""The test harness, in-process half: condition waits with deadlines, aiohttp apps served on
127.0.0.1, and the one config builder.

The rule for ports: a server we start binds port 0 and the port is read back from it (here,
``runner.addresses``; for child processes, their output: see tests.processes). Nothing picks a
"free" port to bind later, which races on a busy machine. ``closed_port()`` is for the tests
that need an address where nobody listens.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml
from aiohttp import web

from exporter.config import Config, load_config, parse_config

T = TypeVar("T")

#: Bearer token of every exporter the harness starts, read from TOKEN_ENV (never from the file).
TOKEN = "e2e-test-token-0123456789"
TOKEN_ENV = "HA_TEST_TOKEN"
#: Probe settings of test configs: a failed master is detected within about 2 s.
FAST_PROBE: dict[str, Any] = {
    "interval": "500ms",
    "timeout": "300ms",
    "failure_threshold": 3,
    "recovery_threshold": 2,
    "jitter": "10%",
}


async def wait_for(
    check: Callable[[], Awaitable[T] | T], timeout: float, what: str, poll: float = 0.05
) -> T:
    """Poll ``check`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            last = result
            if result:
                return result
        except Exception as exc:  # the condition may raise while the system settles
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(poll)


# --- ports ---------------------------------------------------------------------------------


def closed_port() -> int:
    """A port on 127.0.0.1 where nobody listens (bound, then closed at once): for tests of
    refused connections. Never for a server of ours: that one binds port 0 itself."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def url_of(runner: web.BaseRunner, host: str = "127.0.0.1") -> str:
    """Base URL of the first socket a started runner listens on (its real, bound port)."""
    assert runner.addresses, "the runner listens on nothing: start a site first"
    return f"http://{host}:{runner.addresses[0][1]}"


@asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve an aiohttp app on 127.0.0.1, port 0; yield its base URL (the bound port)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield url_of(runner)
    finally:
        await runner.cleanup()


# --- the config builder --------------------------------------------------------------------


def master_entry(
    name: str, url: str, region: str = "uae", role: str = "active", priority: int = 1
) -> dict[str, Any]:
    """One ``masters:`` item."""
    return {"name": name, "url": url, "region": region, "role": role, "priority": priority}


def config_dict(tmp: Path, masters: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    """A test config as plain data: listen on 127.0.0.1 port 0, state under ``tmp``,
    FAST_PROBE, the API token from $HA_TEST_TOKEN. Each keyword replaces that whole top-level
    section (``probe={**FAST_PROBE, "interval": "300ms"}`` to change one setting)."""
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "state_path": str(tmp / "state.db"),
        "probe": dict(FAST_PROBE),
        "masters": masters,
        "api": {"token_env": TOKEN_ENV},
        **sections,
    }


def make_config(tmp: Path, masters: list[dict[str, Any]], **sections: Any) -> Config:
    """config_dict(...) validated: the Config an in-process Service runs with."""
    return parse_config(config_dict(tmp, masters, **sections))


def write_config(
    tmp: Path, masters: list[dict[str, Any]], *, filename: str = "config.yml", **sections: Any
) -> Path:
    """config_dict(...) written as YAML to ``tmp/filename`` and validated (load_config raises
    ConfigError naming every bad key); the path an ``ha-exporter run`` process is given."""
    path = tmp / filename
    path.write_text(yaml.safe_dump(config_dict(tmp, masters, **sections), sort_keys=False))
    load_config(path)
    return path


# --- HTTP helpers --------------------------------------------------------------------------


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as r:
        return await r.json()


async def metric_value(http: aiohttp.ClientSession, base: str, series: str) -> float | None:
    """The value of one exact series (name plus labels as rendered) on the exporter's /metrics."""
    async with http.get(f"{base}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
    return None


async def wait_ready(http: aiohttp.ClientSession, base: str, timeout: float = 15) -> None:
    async def ready() -> bool:
        async with http.get(f"{base}/readyz") as r:
            return r.status == 200

    await wait_for(ready, timeout, f"readiness of {base}")
