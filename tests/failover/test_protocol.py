"""The exporter's side of fencing epochs: the client sends X-HA-Epoch on every control call
and reads a 409 stale epoch as such; the store's counter grows once per start and survives a
reopen; a restarted exporter fences out the one it replaces."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.failover import protocol
from exporter.failover.protocol import (
    EPOCH_HEADER,
    FAILURE_KINDS,
    MasterCallError,
    MasterClient,
    StaleEpoch,
    _canonical_chunks,
    parse_snapshot,
    snapshot_checksum,
)
from exporter.store.sqlite import Store
from tests.failover.test_manager import Lab
from tests.support import closed_port, serve_app

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


# --- bounded reads, failure kinds, ETag ----------------------------------------------------


def _state_app(body: bytes, etag: str | None, seen: list[str | None]) -> web.Application:
    """GET /state answering ``body`` with ``etag``, 304 to a matching If-None-Match; ``seen``
    gets the If-None-Match of every request."""

    async def state(request: web.Request) -> web.Response:
        asked = request.headers.get("If-None-Match")
        seen.append(asked)
        headers = {"ETag": etag} if etag else {}
        if etag and asked == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type="application/json", headers=headers)

    app = web.Application()
    app.router.add_get("/state", state)
    return app


async def test_a_conditional_read_gets_none_for_an_unchanged_state_and_the_snapshot_else():
    seen: list[str | None] = []
    tag = f'"{SNAP["checksum"]}"'
    async with serve_app(_state_app(json.dumps(SNAP).encode(), tag, seen)) as url, \
            aiohttp.ClientSession() as http:
        client = MasterClient(http, 2.0)
        snap = await client.get_state("a", url)
        assert snap.etag == tag and snap.checksum == SNAP["checksum"]
        assert await client.get_state_if_changed("a", url, tag) is None
        again = await client.get_state_if_changed("a", url, '"older"')
        assert again is not None and again.raw == snap.raw
        assert seen == [None, tag, '"older"']


@pytest.mark.parametrize("etag", ["*", "x" * 600, '"bad\ttag"'])
async def test_an_etag_that_cannot_be_sent_back_is_ignored(etag):
    async with serve_app(_state_app(json.dumps(SNAP).encode(), etag, [])) as url, \
            aiohttp.ClientSession() as http:
        assert (await MasterClient(http, 2.0).get_state("a", url)).etag is None


async def test_a_304_to_an_unconditional_read_is_an_http_error():
    async def not_modified(_: web.Request) -> web.Response:
        return web.Response(status=304)

    app = web.Application()
    app.router.add_get("/state", not_modified)
    async with serve_app(app) as url, aiohttp.ClientSession() as http:
        with pytest.raises(MasterCallError) as failed:
            await MasterClient(http, 2.0).get_state("a", url)
    assert (failed.value.status, failed.value.kind) == (304, "http_error")


async def test_every_failure_has_its_kind():
    bad_sum = json.dumps({**SNAP, "checksum": "0" * 64}).encode()

    async def answer(request: web.Request) -> web.Response:
        case = request.match_info["case"]
        if case == "hang":
            await asyncio.sleep(10)
        if case == "error":
            return web.json_response({"error": "nope"}, status=503)
        body = {"garbage": b"<html>", "checksum": bad_sum, "list": b"[1]"}[case]
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/{case}/state", answer)
    async with serve_app(app) as url, aiohttp.ClientSession() as http:
        client = MasterClient(http, 0.3)
        kinds = {}
        for case in ("hang", "error", "garbage", "checksum", "list"):
            with pytest.raises(MasterCallError) as failed:
                await client.get_state("a", f"{url}/{case}")
            kinds[case] = failed.value.kind
        with pytest.raises(MasterCallError) as refused:
            await client.get_state("a", f"http://127.0.0.1:{closed_port()}")
        with pytest.raises(MasterCallError) as not_json:
            await client.state_json("a", f"{url}/garbage")
    assert kinds == {"hang": "timeout", "error": "http_error", "garbage": "invalid",
                     "checksum": "checksum", "list": "invalid"}
    assert refused.value.kind == "connect_error"
    assert not_json.value.kind == "invalid" and "not JSON" in not_json.value.reason
    assert set(kinds.values()) | {"connect_error", "too_large"} == set(FAILURE_KINDS)


@settings(max_examples=150, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=7) | st.dictionaries(st.text(), inner, max_size=7),
    max_leaves=40))
def test_hashing_in_batches_is_the_canonical_json(value):
    """Parsing hashes big objects and arrays batch by batch (batches of 2 here, so every
    boundary case is reached): the bytes are those of one canonical encoding of the whole."""
    whole = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    with mock.patch.object(protocol, "_BATCH", 2):
        assert b"".join(_canonical_chunks(value)) == whole


@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 1025, 2049])
def test_batches_of_the_real_size_are_the_canonical_json(n):
    obj = {f"k{(i * 7919) % 5003}-{i}": {"i": i, "x": [i / 3, "é😀", None]} for i in range(n)}
    for value in (obj, list(obj.values())):
        whole = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
        assert b"".join(_canonical_chunks(value)) == whole
