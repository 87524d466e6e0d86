"""Fencing epochs and the conditional GET /state of the simulated master (docs/protocol.md)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from exporter.sim import SimulatedMaster, create_app
from exporter.sim.state import Reject
from tests.support import serve_app


@pytest.fixture
async def served() -> AsyncIterator[tuple[SimulatedMaster, str, aiohttp.ClientSession]]:
    m = SimulatedMaster("m", "uae", "active")
    async with serve_app(create_app(m)) as url, aiohttp.ClientSession() as http:
        yield m, url, http


async def call(http: aiohttp.ClientSession, method: str, url: str, epoch: str | None,
               body: Any = None) -> tuple[int, Any]:
    headers = {"X-HA-Epoch": epoch} if epoch is not None else {}
    async with http.request(method, url, json=body, headers=headers) as r:
        return r.status, await r.json()


def test_the_model_obeys_equal_and_higher_epochs_and_refuses_lower_ones():
    m = SimulatedMaster("m")
    m.obey(None)
    assert m.epoch is None  # a controller without epochs leaves nothing behind
    m.obey(5)
    m.obey(5)
    assert m.epoch == 5
    with pytest.raises(Reject) as refused:
        m.obey(4)
    assert (refused.value.status, str(refused.value), refused.value.extra) == (
        409, "stale epoch", {"epoch": 5})
    m.admit(7)  # checked, not obeyed: a call still reading its body
    m.obey(9)  # a newer controller's call lands first
    with pytest.raises(Reject):
        m.obey(7)  # checked again right before its effect
    m.obey(None)
    assert m.epoch == 9


async def test_every_control_call_refuses_a_lower_epoch_and_changes_nothing(served):
    m, url, http = served
    assert (await call(http, "POST", f"{url}/activate", "5", {"taken_over": "x"}))[0] == 200
    assert m.epoch == 5 and (await call(http, "GET", f"{url}/health", None))[1]["epoch"] == 5
    snap = m.snapshot()
    before = (m.active, list(m.duties), dict(m.imported))
    for method, path, body in (("POST", "/state", {**snap, "master": "other"}),
                               ("DELETE", "/state/x", None),
                               ("POST", "/activate", {"taken_over": "y"}),
                               ("POST", "/deactivate", None)):
        assert await call(http, method, url + path, "4", body) == (
            409, {"error": "stale epoch", "epoch": 5}), path
    assert (m.active, m.duties, m.imported) == before
    assert (await call(http, "POST", f"{url}/deactivate", "5", {"taken_over": "x"}))[0] == 200
    assert (await call(http, "POST", f"{url}/deactivate", "6"))[1] == {"active": False,
                                                                      "duties": []}
    assert m.epoch == 6


async def test_a_call_without_the_header_is_obeyed_and_compared_with_nothing(served):
    m, url, http = served
    await call(http, "POST", f"{url}/activate", "8", {})
    assert await call(http, "POST", f"{url}/deactivate", None) == (
        200, {"active": False, "duties": []})
    assert m.epoch == 8


@pytest.mark.parametrize("value", ["", "abc", "-1", "1.5", "+3", "0x10", "1 2", "٣",
                                   "9223372036854775808", "1" * 20])
async def test_a_malformed_epoch_is_400_and_changes_nothing(served, value):
    m, url, http = served
    status, body = await call(http, "POST", f"{url}/activate", value, {"taken_over": "z"})
    assert status == 400 and "X-HA-Epoch" in body["error"]
    assert "z" not in m.duties and m.epoch is None


async def test_the_header_given_twice_is_400(served):
    _, url, http = served
    async with http.post(f"{url}/deactivate",
                         headers=[("X-HA-Epoch", "1"), ("X-HA-Epoch", "2")]) as r:
        assert r.status == 400


async def test_a_refused_call_does_not_raise_the_epoch(served):
    m, url, http = served
    await call(http, "POST", f"{url}/activate", "3", {})
    assert (await call(http, "POST", f"{url}/activate", "9", {"taken_over": 5}))[0] == 400
    assert (await call(http, "POST", f"{url}/state", "9", {"master": "x"}))[0] == 400
    assert m.epoch == 3
    assert (await call(http, "POST", f"{url}/activate", "3", {}))[0] == 200


async def test_get_state_answers_304_to_its_own_etag(served):
    m, url, http = served
    async with http.get(f"{url}/state") as r:
        tag, snap = r.headers["ETag"], json.loads(await r.read())
    assert tag == f'"{snap["checksum"]}"'
    for header in (tag, f"W/{tag}", f'"other", {tag}', "*"):
        async with http.get(f"{url}/state", headers={"If-None-Match": header}) as r:
            assert (r.status, await r.read()) == (304, b""), header
            assert r.headers["ETag"] == tag
    async with http.get(f"{url}/state", headers={"If-None-Match": '"other"'}) as r:
        assert r.status == 200
    m.config["language"] = "ar"  # the state changed: a new tag, and a full answer
    async with http.get(f"{url}/state", headers={"If-None-Match": tag}) as r:
        assert r.status == 200 and r.headers["ETag"] != tag
