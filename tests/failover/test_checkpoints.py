"""Checkpoint rounds against real masters on 127.0.0.1: an unchanged state is not transferred
again (ETag / 304) yet its checkpoint stays current, masters without an ETag work as before,
and every failure is counted per master and reason."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from exporter.config import parse_config
from exporter.failover.checkpoints import FAILURE_REASONS, Checkpointer
from exporter.failover.protocol import FAILURE_KINDS, MasterClient, snapshot_checksum
from exporter.fleet import Fleet, MasterRuntime
from exporter.sim import SimulatedMaster, create_app
from exporter.store.sqlite import Store
from tests.support import closed_port, serve_app

TIMEOUT = 2.0
CAP = 65_536  # max_state_bytes of the failure test: 10,000 sessions are over it


def snapshot(name: str, sessions: int = 200, **extra: Any) -> dict[str, Any]:
    snap: dict[str, Any] = {"master": name, "pending_messages": [], "config": {},
                            "sessions": {f"s{i}": {"n": i} for i in range(sessions)}, **extra}
    snap["checksum"] = snapshot_checksum(snap)
    return snap


class Master:
    """A master serving ``state`` at GET /state, with an ETag unless ``etag`` is False; it
    counts requests, conditional requests and the body bytes it sent."""

    def __init__(self, name: str, etag: bool = True) -> None:
        self.name = name
        self.etag = etag
        self.state = snapshot(name)
        self.requests = 0
        self.conditional: list[str] = []
        self.body_bytes = 0

    def app(self) -> web.Application:
        async def get_state(request: web.Request) -> web.Response:
            self.requests += 1
            body = json.dumps(self.state).encode()
            tag = f'"{self.state["checksum"]}"'
            headers = {"ETag": tag} if self.etag else {}
            if (asked := request.headers.get("If-None-Match")) is not None:
                self.conditional.append(asked)
                if self.etag and asked == tag:
                    return web.Response(status=304, headers=headers)
            self.body_bytes += len(body)
            return web.Response(body=body, content_type="application/json", headers=headers)

        app = web.Application()
        app.router.add_get("/state", get_state)
        return app


class Rig:
    """Masters served on 127.0.0.1, their runtimes, a store and a Checkpointer."""

    def __init__(self, tmp_path: Path, urls: dict[str, str], max_state_bytes: int = 2**20):
        config = parse_config({"state_path": str(tmp_path / "s.db"),
                               "masters": [{"name": n, "url": u} for n, u in urls.items()]})
        self.fleet = Fleet(config.masters, config.probe, 5)
        self.store = Store(tmp_path / "s.db")
        self.max_state_bytes = max_state_bytes

    async def __aenter__(self) -> Rig:
        self.http = aiohttp.ClientSession()
        self.ckpt = Checkpointer(self.store, MasterClient(
            self.http, TIMEOUT, max_state_bytes=self.max_state_bytes))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()
        self.store.close()

    def masters(self) -> list[MasterRuntime]:
        return list(self.fleet)

    async def round(self) -> dict[str, bool]:
        return await self.ckpt.round(self.masters(), TIMEOUT)


@asynccontextmanager
async def served(apps: dict[str, web.Application]) -> AsyncIterator[dict[str, str]]:
    """Serve each app on 127.0.0.1; yield {name: url}."""
    async with AsyncExitStack() as stack:
        yield {name: await stack.enter_async_context(serve_app(app))
               for name, app in apps.items()}


def apps_of(*masters: Master) -> dict[str, web.Application]:
    return {m.name: m.app() for m in masters}


async def test_an_unchanged_state_is_not_transferred_again_and_stays_current(tmp_path):
    masters = [Master(f"m{i}") for i in range(5)]
    async with served(apps_of(*masters)) as urls:
        async with Rig(tmp_path, urls) as rig:
            assert await rig.round() == {m.name: True for m in masters}
            first = sum(m.body_bytes for m in masters)
            assert first > 5 * 2000
            stored = {m.name: rig.store.checkpoint(m.name) for m in masters}
            times = dict(rig.ckpt.times)
            await asyncio.sleep(0.01)

            assert await rig.round() == {m.name: True for m in masters}
            assert sum(m.body_bytes for m in masters) == first  # no body the second time
            for m in masters:
                assert m.requests == 2 and m.conditional == [f'"{m.state["checksum"]}"']
                ts, checksum, raw = rig.store.checkpoint(m.name)
                old_ts, old_checksum, old_raw = stored[m.name]
                assert (checksum, raw) == (old_checksum, old_raw)  # the same checkpoint...
                assert ts > old_ts and rig.ckpt.times[m.name] == ts > times[m.name]  # ...current
            assert rig.ckpt.failures == {}

            changed, idle = masters[0], masters[1:]
            changed.state = snapshot(changed.name, sessions=3)
            before = (changed.body_bytes, sum(m.body_bytes for m in idle))
            assert await rig.round() == {m.name: True for m in masters}
            assert changed.body_bytes == before[0] + len(json.dumps(changed.state))
            assert rig.store.checkpoint(changed.name)[1] == changed.state["checksum"]
            assert sum(m.body_bytes for m in idle) == before[1]  # the others: nothing more


async def test_masters_without_an_etag_are_read_in_full_every_round(tmp_path):
    plain = Master("plain", etag=False)
    async with served(apps_of(plain)) as urls:
        async with Rig(tmp_path, urls) as rig:
            for _ in range(3):
                assert await rig.round() == {"plain": True}
            assert plain.requests == 3 and plain.conditional == []
            assert plain.body_bytes == 3 * len(json.dumps(plain.state).encode())


async def test_the_simulated_master_answers_304_to_a_checkpoint_round(tmp_path):
    """The reference master (exporter.sim) and the Checkpointer agree on ETag use."""
    sim = SimulatedMaster("a", "uae", "active")
    app = create_app(sim)
    statuses: Counter[int] = Counter()

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        resp = await handler(request)
        if request.path == "/state":
            statuses[resp.status] += 1
        return resp

    app.middlewares.insert(0, count)
    async with serve_app(app) as url, Rig(tmp_path, {"a": url}) as rig:
        for _ in range(3):
            assert await rig.round() == {"a": True}
        assert statuses == {200: 1, 304: 2}


async def test_a_304_for_a_checkpoint_replaced_meanwhile_reads_the_state_again(tmp_path):
    m = Master("a")
    async with served(apps_of(m)) as urls:
        async with Rig(tmp_path, urls) as rig:
            assert await rig.round() == {"a": True}
            rig.store.save_checkpoint("a", 1.0, "0" * 64, b"{}")  # not what the tag names
            assert await rig.round() == {"a": True}
            assert m.requests == 3 and len(m.conditional) == 1  # the 304, then a full read
            assert rig.store.checkpoint("a")[1] == m.state["checksum"]


def _hang_app() -> web.Application:
    async def hang(_: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    app = web.Application()
    app.router.add_get("/state", hang)
    return app


def _raw_app(status: int, body: bytes) -> web.Application:
    async def answer(_: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/state", answer)
    return app


async def test_failures_are_counted_per_master_and_reason(tmp_path, caplog):
    bad_sum = json.dumps({**snapshot("checksum"), "checksum": "f" * 64}).encode()
    apps = {
        "timeout": _hang_app(),
        "http_error": _raw_app(500, b'{"error": "boom"}'),
        "too_large": _raw_app(200, json.dumps(snapshot("too_large", sessions=10_000)).encode()),
        "invalid": _raw_app(200, b"<html>garbage"),
        "wrong_master": _raw_app(200, json.dumps(snapshot("someone-else")).encode()),
        "checksum": _raw_app(200, bad_sum),
        "store": _raw_app(200, json.dumps(snapshot("store")).encode()),
    }
    async with served(apps) as urls:
        urls["connect_error"] = f"http://127.0.0.1:{closed_port()}"
        async with Rig(tmp_path, urls, max_state_bytes=CAP) as rig:
            save = rig.store.asave_checkpoint

            async def flaky_save(master: str, *args: Any) -> None:
                if master == "store":
                    raise sqlite3.OperationalError("database or disk is full")
                await save(master, *args)

            rig.store.asave_checkpoint = flaky_save
            caplog.set_level(logging.WARNING, "exporter.failover.checkpoints")
            for _ in range(2):
                assert await rig.round() == {name: False for name in urls}
            expected = {(name, name): 2 for name in FAILURE_REASONS}
            expected[("wrong_master", "invalid")] = 2
            assert dict(rig.ckpt.failures) == expected
            assert set(FAILURE_REASONS) == {*FAILURE_KINDS, "store"}
            assert rig.ckpt.errors["too_large"] == f"state too large (limit {CAP} bytes)"
            assert "disk is full" in rig.ckpt.errors["store"]
            assert "someone-else" in rig.ckpt.errors["wrong_master"]
            # counted every round, logged once per master while the reason stays the same
            logged = [r for r in caplog.records if r.name == "exporter.failover.checkpoints"]
            assert len(logged) == len(urls)
            with pytest.raises(TypeError):
                rig.ckpt.failures[("x", "timeout")] = 1
            rig.ckpt.forget(["timeout", "store"])
            assert not any(m in ("timeout", "store") for m, _ in rig.ckpt.failures)


async def test_a_store_failure_on_a_304_is_counted_and_the_next_round_recovers(tmp_path):
    m = Master("a")
    async with served(apps_of(m)) as urls:
        async with Rig(tmp_path, urls) as rig:
            assert await rig.round() == {"a": True}
            touch = rig.store.touch_checkpoint

            def broken(_master: str, _ts: float, _checksum: str) -> bool:
                raise sqlite3.OperationalError("disk I/O error")

            rig.store.touch_checkpoint = broken  # type: ignore[method-assign]
            assert await rig.round() == {"a": False}
            assert dict(rig.ckpt.failures) == {("a", "store"): 1}
            rig.store.touch_checkpoint = touch  # type: ignore[method-assign]
            assert await rig.round() == {"a": True}
            assert "a" not in rig.ckpt.errors and m.body_bytes == len(json.dumps(m.state))
