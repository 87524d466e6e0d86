"""The exporter's side of fencing epochs: the client sends X-HA-Epoch on every control call
and reads a 409 stale epoch as such; the store's counter grows once per start and survives a
reopen; a restarted exporter fences out the one it replaces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from exporter.failover.protocol import (
    EPOCH_HEADER,
    MasterCallError,
    MasterClient,
    StaleEpoch,
    parse_snapshot,
    snapshot_checksum,
)
from exporter.store.sqlite import Store
from tests.failover.test_manager import Lab
from tests.support import serve_app

SNAP: dict[str, Any] = {"master": "a", "sessions": {}, "pending_messages": [], "config": {}}
SNAP["checksum"] = snapshot_checksum(SNAP)
CONTROL = {("POST", "/state"), ("DELETE", "/state/a"), ("POST", "/activate"),
           ("POST", "/deactivate")}


class Recorder:
    """A master that answers every protocol call well and records what it was sent; with
    ``refuse``, control calls get that status and body instead."""

    def __init__(self, refuse: tuple[int, dict[str, Any]] | None = None) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        self.refuse = refuse

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.seen.append((request.method, request.path, request.headers.get(EPOCH_HEADER)))
            if self.refuse is not None and (request.method, request.path) in CONTROL:
                return web.json_response(self.refuse[1], status=self.refuse[0])
            answers: dict[tuple[str, str], Any] = {
                ("GET", "/health"): {"status": "ok", "active": True, "duties": ["a"]},
                ("GET", "/state"): SNAP,
                ("POST", "/state"): {"checksum": SNAP["checksum"]},
                ("DELETE", "/state/a"): {"removed": True},
                ("POST", "/activate"): {"active": True, "duties": ["a"]},
                ("POST", "/deactivate"): {"active": False, "duties": []},
            }
            return web.json_response(answers[(request.method, request.path)])

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


async def every_call(client: MasterClient, url: str) -> None:
    await client.health("a", url)
    snap = await client.get_state("a", url)
    await client.state_json("a", url)
    await client.import_state("a", url, snap)
    await client.drop_import("a", url, "a")
    await client.activate("a", url, None)
    await client.activate("a", url, "b")
    await client.deactivate("a", url, "b")
    await client.deactivate("a", url)


@pytest.mark.parametrize("epoch", [7, None])
async def test_every_control_call_carries_the_epoch_and_reads_do_not(epoch):
    rec = Recorder()
    async with serve_app(rec.app()) as url, aiohttp.ClientSession() as http:
        await every_call(MasterClient(http, 2.0, epoch), url)
    sent = str(epoch) if epoch is not None else None
    assert {(m, p) for m, p, _ in rec.seen} >= CONTROL | {("GET", "/health"), ("GET", "/state")}
    for method, path, header in rec.seen:
        control = (method, path) in CONTROL
        assert header == (sent if control else None), (method, path, header)


@pytest.mark.parametrize("body, theirs", [({"error": "stale epoch", "epoch": 9}, "epoch 9"),
                                          ({"error": "stale epoch"}, "a higher epoch")])
async def test_a_409_stale_epoch_is_a_stale_epoch_error_on_every_control_call(body, theirs):
    rec = Recorder(refuse=(409, body))
    async with serve_app(rec.app()) as url, aiohttp.ClientSession() as http:
        client = MasterClient(http, 2.0, 7)
        snap = parse_snapshot(json.dumps(SNAP).encode())
        calls = {"import_state": client.import_state("a", url, snap),
                 "drop_import": client.drop_import("a", url, "a"),
                 "activate": client.activate("a", url, "b"),
                 "deactivate": client.deactivate("a", url)}
        for op, call in calls.items():
            with pytest.raises(StaleEpoch) as refused:
                await call
            err = refused.value
            assert isinstance(err, MasterCallError) and err.status == 409 and err.op == op
            assert err.reason.startswith("stale epoch: a has obeyed ")
            assert theirs in err.reason and "this exporter's epoch 7" in err.reason


async def test_another_409_is_an_ordinary_http_error():
    rec = Recorder(refuse=(409, {"error": "busy importing"}))
    async with serve_app(rec.app()) as url, aiohttp.ClientSession() as http:
        with pytest.raises(MasterCallError) as refused:
            await MasterClient(http, 2.0, 7).activate("a", url, "b")
    assert not isinstance(refused.value, StaleEpoch)
    assert refused.value.reason == "HTTP 409: busy importing"


def test_the_epoch_grows_once_per_start_and_survives_a_reopen(tmp_path: Path):
    path = tmp_path / "state.db"
    store = Store(path)
    assert store.epoch() == 0
    assert [store.next_epoch(), store.next_epoch()] == [1, 2]
    store.close()
    store = Store(path)
    assert store.epoch() == 2  # reading does not raise it
    assert store.next_epoch() == 3
    store.close()
    assert Store(path).epoch() == 3


async def test_a_restarted_exporter_fences_out_the_one_it_replaces(tmp_path: Path):
    async with Lab(tmp_path) as lab:
        old = lab.mgr
        assert old.client.epoch == lab.store.epoch() == 1
        new = lab.new_manager()  # a restart: one more epoch, from the same store
        try:
            assert new.client.epoch == 2
            record = await new.failover("a", to="c")
            assert record["result"] == "success", record
            assert (lab.sims["a"].epoch, lab.sims["c"].epoch) == (2, 2)
            with pytest.raises(StaleEpoch, match="has obeyed epoch 2 and refuses this "
                                                 "exporter's epoch 1"):
                await old.client.activate("a", lab.urls["a"], None)
            assert (lab.sims["a"].active, lab.sims["a"].duties) == (False, [])
        finally:
            await new.shutdown(2.0)


async def test_an_undo_refused_for_a_stale_epoch_is_not_queued_for_retry(tmp_path: Path):
    """Another controller is in charge of that master: retrying could never succeed."""
    async with Lab(tmp_path) as lab:
        new = lab.new_manager()
        try:
            assert (await new.failover("a", to="c"))["result"] == "success"
            errors: list[str] = []
            await lab.mgr.undo.undo(lab.fleet.get("c"), "fence", None, errors)
            assert len(errors) == 1 and errors[0].startswith("stale epoch: c has obeyed ")
            assert lab.store.cleanups() == []
            assert lab.sims["c"].active  # the stale controller changed nothing
        finally:
            await new.shutdown(2.0)
