"""Service lifecycle: readiness, reload without losing state, bad reloads rejected."""

from __future__ import annotations

import logging

import aiohttp
import pytest
import yaml
from aiohttp import web

from exporter.config import load_config
from exporter.fleet import Outcome, Result, State
from exporter.service import Service
from exporter.web.server import running as serving
from tests.support import serve_app, wait_for, wait_ready

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def ok_app() -> web.Application:
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/{who}/health", health)
    return app


def write_config(path, url: str, names: list[str], **probe) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "state_path": str(path.parent / "state.db"),
                "probe": {"interval": "200ms", "timeout": "100ms", **probe},
                "masters": [{"name": n, "url": f"{url}/{n}"} for n in names],
                "api": {"token_env": None},
            }
        )
    )


@pytest.fixture
async def running(tmp_path):
    """A started Service over masters a and b, its config file, base URL and a client."""
    cfg_path = tmp_path / "config.yml"
    async with serve_app(ok_app()) as url, aiohttp.ClientSession() as http:
        write_config(cfg_path, url, ["a", "b"])
        svc = Service(load_config(cfg_path), cfg_path, token=TOKEN)
        async with serving(svc, "127.0.0.1", 0) as server:
            yield svc, cfg_path, url, f"http://127.0.0.1:{server.port}", http


async def test_reload_adds_removes_and_keeps_state_of_unchanged(running, caplog):
    svc, cfg_path, url, base, http = running
    await wait_ready(http, base, 5)
    await wait_for(lambda: sum(svc.fleet.get("a").result_counts) >= 3, 5, "probes of a")
    a_before = svc.fleet.get("a")

    write_config(cfg_path, url, ["a", "c"])
    async with http.post(f"{base}/-/reload") as r:
        assert r.status == 401
        assert (await r.json())["error"] == "missing or invalid bearer token"
    async with http.post(f"{base}/-/reload", headers=AUTH) as r:
        assert r.status == 200, await r.text()
    assert [rt.name for rt in svc.fleet] == ["a", "c"]
    assert svc.fleet.get("a") is a_before  # same record: counters kept
    assert sum(a_before.result_counts) >= 3
    await wait_for(lambda: sum(svc.fleet.get("c").result_counts) >= 1, 5, "probe of c")

    cfg_path.write_text(cfg_path.read_text().replace("200ms", "2 fortnights"))
    with caplog.at_level(logging.ERROR, logger="exporter.service"):
        async with http.post(f"{base}/-/reload", headers=AUTH) as r:
            body = await r.json()
            assert r.status == 400
    assert any(e.startswith("probe.interval:") for e in body["errors"])
    assert "probe.interval:" in caplog.text
    assert svc.config.probe.interval == 0.2  # the running config is kept
    async with http.get(f"{base}/metrics") as r:
        assert "ha_config_last_reload_success 0.0" in await r.text()
    n = sum(svc.fleet.get("c").result_counts)
    await wait_for(
        lambda: sum(svc.fleet.get("c").result_counts) > n,
        5,
        "probing to go on after a rejected reload",
    )


async def test_api_lists_masters_and_404s_as_json(running):
    svc, _, url, base, http = running
    await wait_for(lambda: svc.ready, 5, "readiness")
    async with http.get(f"{base}/api/v1/masters") as r:
        names = [m["name"] for m in (await r.json())["masters"]]
    assert names == ["a", "b"]
    async with http.get(f"{base}/api/v1/masters/a") as r:
        one = await r.json()
    assert one["state"] == "healthy" and one["url"] == f"{url}/a" and one["up"] is True
    async with http.get(f"{base}/api/v1/masters/zzz") as r:
        assert r.status == 404 and "zzz" in (await r.json())["error"]
    async with http.get(f"{base}/no/such/path") as r:
        assert r.status == 404 and "error" in await r.json()
    async with http.get(f"{base}/healthz") as r:
        assert r.status == 200


def probed_service(tmp_path) -> Service:
    cfg_path = tmp_path / "config.yml"
    write_config(cfg_path, "http://127.0.0.1:1", ["a", "b", "c"])
    return Service(load_config(cfg_path), cfg_path, token=TOKEN)


def test_failed_probe_under_threshold_does_not_readmit_an_ejected_master(tmp_path):
    svc = probed_service(tmp_path)
    a = svc.fleet.get("a")
    for _ in range(svc.config.balancing.outlier_consecutive_failures):
        svc.router.report("a", False, 0.1)
    assert svc.router.is_ejected("a")
    svc.on_probe(a, Outcome(Result.CONNECT_ERROR, 0.01, detail="refused"))
    assert a.health.state is State.HEALTHY  # still under failure_threshold
    assert svc.router.is_ejected("a")  # the failed probe is no reason to route to it again
    svc.on_probe(a, Outcome(Result.SUCCESS, 0.01, payload={"status": "ok"}))
    assert not svc.router.is_ejected("a")  # a healthy probe re-admits it
    svc.store.close()


def test_reported_active_is_forgotten_when_the_master_stops_answering(tmp_path):
    svc = probed_service(tmp_path)
    a = svc.fleet.get("a")
    svc.on_probe(a, Outcome(Result.SUCCESS, 0.01, payload={"status": "ok", "active": True}))
    assert a.reported_active is True
    svc.on_probe(a, Outcome(Result.CONNECT_ERROR, 0.01, detail="refused"))
    assert a.reported_active is None  # a dead master is not "back and active"
    svc.store.close()


async def test_a_master_in_maintenance_and_down_gets_no_traffic_after_a_restart(tmp_path):
    """The store remembers maintenance across restarts; routing must learn it too, although
    the master's failing probes never cause a transition while it is in maintenance."""
    cfg_path = tmp_path / "config.yml"
    async with serve_app(ok_app()) as url, aiohttp.ClientSession() as http:
        cfg_path.write_text(yaml.safe_dump({
            "state_path": str(tmp_path / "state.db"),
            "probe": {"interval": "200ms", "timeout": "100ms"},
            "masters": [{"name": "a", "url": "http://127.0.0.1:1/a"},  # nobody listens
                        {"name": "b", "url": f"{url}/b"}],
            "api": {"token_env": None},
        }))
        before = Service(load_config(cfg_path), cfg_path, token=TOKEN)
        before.store.set_maintenance("a", True)  # as a previous run left it
        await before.close()
        svc = Service(load_config(cfg_path), cfg_path, token=TOKEN)
        async with serving(svc, "127.0.0.1", 0) as server:
            base = f"http://127.0.0.1:{server.port}"
            await wait_ready(http, base, 5)
            async with http.get(f"{base}/api/v1/masters/a") as r:
                assert (await r.json())["state"] == "maintenance"
            chosen = set()
            for i in range(20):
                async with http.get(f"{base}/api/v1/route", params={"key": f"k{i}"}) as r:
                    assert r.status == 200
                    chosen.add((await r.json())["master"])
            assert chosen == {"b"}
            async with http.get(f"{base}/api/v1/balancing") as r:
                balancing = await r.json()
            assert balancing["weights"].get("a", 0) == 0
            assert balancing["masters"]["a"]["state"] == "maintenance"
