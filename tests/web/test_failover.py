"""Failover through the real exporter process over real master processes, and its API."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import pytest

from tests.processes import StartStack
from tests.support import TOKEN, TOKEN_ENV, get_json, metric_value, wait_for
from tests.web.harness import AUTH as API_AUTH
from tests.web.harness import exporter

AUTH = {"Authorization": f"Bearer {TOKEN}"}
INTERVAL, TIMEOUT, THRESHOLD = 0.5, 0.3, 3


@pytest.fixture
async def fleet(stack: StartStack, http: aiohttp.ClientSession):
    """master-a active (uae), master-b active (usa), master-c standby (uae), master-d standby
    (usa, priority 4): the same-region standby with the better priority must win."""
    specs = [
        ("master-a", "uae", "active", 1),
        ("master-b", "usa", "active", 2),
        ("master-c", "uae", "standby", 3),
        ("master-d", "usa", "standby", 4),
    ]
    started = await stack(
        specs,
        drain={name: 0.0 for name, *_ in specs},
        failover={"enabled": True, "cooldown": "30s", "checkpoint_interval": "300ms"},
        api={"token_env": TOKEN_ENV, "max_body_bytes": 2048},
    )
    await started.ready(http)
    return started.masters, started.urls, started.exporter, started.base, http


async def test_sigkilled_active_master_moves_to_best_standby_with_its_state(fleet):
    masters, urls, _, base, http = fleet
    sent_at = time.time()
    for i in range(25):  # drain rate 0: they stay pending, as in a stalled bot account
        async with http.post(
            f"{urls['master-a']}/messages", json={"id": f"pre-{i}", "chat": f"+97150000{i:04d}"}
        ) as r:
            assert r.status == 202
    checkpoint_age = 'ha_master_checkpoint_age_seconds{master="master-a"}'

    async def checkpointed_after_send() -> bool:
        age = await metric_value(http, base, checkpoint_age)
        return age is not None and time.time() - age > sent_at

    await wait_for(checkpointed_after_send, 10, "a checkpoint of master-a taken after the sends")

    masters["master-a"].kill(signal.SIGKILL)
    killed = time.monotonic()

    async def c_took_over() -> bool:
        h = await get_json(http, f"{urls['master-c']}/health")
        return h["active"] and "master-a" in h["duties"]

    bound = THRESHOLD * INTERVAL + TIMEOUT + INTERVAL  # detection bound + one interval
    await wait_for(c_took_over, bound + 10, "master-c to take over master-a's duties", poll=0.02)
    took = time.monotonic() - killed
    print(f"kill to activation {took:.2f}s (detection bound {bound:.2f}s)")
    assert took <= bound + 0.5, f"kill to activation {took:.2f}s, bound {bound:.2f}s + 0.5s"

    state = await get_json(http, f"{urls['master-c']}/state")
    imported = state["imported"]["master-a"]
    assert {m["id"] for m in imported["pending_messages"]} == {f"pre-{i}" for i in range(25)}
    assert len(imported["sessions"]) >= 25
    d = await get_json(http, f"{urls['master-d']}/health")
    assert d["active"] is False  # exactly one backup took the duty

    history = await get_json(http, f"{base}/api/v1/failovers")
    record = history["items"][0]
    assert (record["master"], record["backup"], record["result"]) == (
        "master-a",
        "master-c",
        "success",
    )
    record = await get_json(http, f"{base}/api/v1/failovers/{record['id']}")  # full record
    steps = [s["step"] for s in record["steps"]]
    assert steps.index("import") < steps.index("verify") < steps.index("activate")
    reasons = {c["name"]: c for c in record["candidates"]}
    assert "master-d" in reasons and "master-b" in reasons  # every candidate explained
    for _ in range(200):
        route = await get_json(http, f"{base}/api/v1/route")
        assert route["master"] != "master-a"
    source = next(s for s in record["steps"] if s["step"] == "fetch")["detail"]["source"]
    assert source in ("live", "checkpoint")
    series = f'ha_failovers_total{{master="master-a",result="success",state_source="{source}"}}'
    assert await metric_value(http, base, series) == 1
    audit = await get_json(http, f"{base}/api/v1/audit?limit=200")
    assert any(e["master"] == "master-a" for e in audit["items"])


async def test_api_errors_are_json_with_the_right_status(fleet):
    _, _, _, base, http = fleet
    cases = [
        ("POST", "/api/v1/failover", {}, {"from": "master-a"}, 401),
        ("POST", "/api/v1/failover", AUTH, {"to": "master-c"}, 400),
        ("POST", "/api/v1/failover", AUTH, {"from": "nobody"}, 404),
        ("POST", "/api/v1/failover", AUTH, {"from": "master-c"}, 409),  # standby: no duties
        ("POST", "/api/v1/failover", AUTH, {"from": "master-a", "pad": "x" * 4096}, 413),
        ("POST", "/api/v1/masters/nobody/maintenance", AUTH, {}, 404),
        ("POST", "/api/v1/masters/master-b/maintenance", AUTH, {"enabled": "yes"}, 400),
        ("POST", "/api/v1/masters/master-b/reset", {}, {}, 401),
        ("GET", "/api/v1/failovers?limit=0", {}, None, 400),
        ("GET", "/api/v1/failovers/999", {}, None, 404),
        ("POST", "/api/v1/failover/pause", {"Authorization": "Bearer wrong"}, None, 401),
    ]
    for method, path, headers, body, status in cases:
        async with http.request(method, base + path, headers=headers, json=body) as r:
            payload = await r.json()
            assert r.status == status, (method, path, r.status, payload)
            assert isinstance(payload.get("error"), str) and payload["error"], payload
    async with http.post(f"{base}/api/v1/failover", headers=AUTH, data=b"{not json") as r:
        assert r.status == 400 and "JSON" in (await r.json())["error"]


async def test_switchover_maintenance_reset_and_pause(fleet):
    _, urls, _, base, http = fleet
    async with http.post(
        f"{base}/api/v1/failover", headers=AUTH, json={"from": "master-b", "to": "master-d"}
    ) as r:
        record = await r.json()
        assert r.status == 200 and record["result"] == "success", record
    b = await get_json(http, f"{urls['master-b']}/health")
    d = await get_json(http, f"{urls['master-d']}/health")
    assert d["active"] and "master-b" in d["duties"] and not b["active"]

    async with http.post(f"{base}/api/v1/failover/pause", headers=AUTH) as r:
        assert (await r.json())["paused"] is True
    assert await metric_value(http, base, "ha_failover_paused") == 1
    async with http.post(f"{base}/api/v1/failover/resume", headers=AUTH) as r:
        assert (await r.json())["paused"] is False

    async with http.post(
        f"{base}/api/v1/masters/master-c/maintenance", headers=AUTH, json={"enabled": True}
    ) as r:
        assert r.status == 200 and (await r.json())["maintenance"] is True
    one = await get_json(http, f"{base}/api/v1/masters/master-c")
    assert one["state"] == "maintenance"
    async with http.post(
        f"{base}/api/v1/masters/master-c/maintenance", headers=AUTH, json={"enabled": False}
    ) as r:
        assert r.status == 200

    async def serving_again() -> bool:
        return (await get_json(http, f"{base}/api/v1/masters/master-c"))["state"] == "healthy"

    await wait_for(serving_again, 10, "master-c healthy after maintenance")
    async with http.post(f"{base}/api/v1/masters/master-c/reset", headers=AUTH) as r:
        assert r.status == 200 and (await r.json())["master"] == "master-c"
    actions = {e["action"] for e in (await get_json(http, f"{base}/api/v1/audit"))["items"]}
    assert {"pause", "resume", "maintenance_on", "maintenance_off", "reset"} <= actions


async def test_restarted_exporter_fences_a_master_that_returns_active(
    stack: StartStack, http: aiohttp.ClientSession
):
    """Split brain after a restart: the failed master comes back believing it is active
    while the exporter is down. The restarted exporter sees no health transition and has no
    undo queued, yet must fence it; the backup keeps the duty."""
    fleet = await stack(
        [("master-a", "uae", "active", 1), ("master-c", "uae", "standby", 3)],
        probe={"interval": "300ms", "timeout": "200ms", "failure_threshold": 2},
        failover={"enabled": True, "cooldown": "30s", "checkpoint_interval": "300ms"},
    )
    await fleet.ready(http)

    async def c_holds_a() -> bool:
        h = await get_json(http, f"{fleet.urls['master-c']}/health")
        return h["active"] and "master-a" in h["duties"]

    async def a_active() -> bool | None:
        try:
            return (await get_json(http, f"{fleet.urls['master-a']}/health"))["active"]
        except aiohttp.ClientError:
            return None

    fleet.masters["master-a"].kill(signal.SIGKILL)
    await wait_for(c_holds_a, 10, "master-c to take over master-a")
    # back (on its old port) while the exporter runs: fenced, the queued undo spent
    await fleet.restart_master("master-a")
    await wait_for(lambda: _is(a_active, False), 10, "master-a fenced on return")

    fleet.exporter.kill(signal.SIGTERM)
    assert await asyncio.to_thread(fleet.exporter.wait, 10) == 0
    # back again, active by its own config, while nobody watches
    await fleet.restart_master("master-a")
    await wait_for(lambda: _is(a_active, True), 10, "master-a claiming active")
    restarted = time.time()
    await fleet.restart_exporter()  # same config and state
    await fleet.ready(http)
    await wait_for(lambda: _is(a_active, False), 10, "the restarted exporter to fence")
    assert await c_holds_a()
    audit = await get_json(http, f"{fleet.base}/api/v1/audit?master=master-a")
    assert any(e["action"] == "fence_returning" and e["ts"] > restarted
               for e in audit["items"]), audit["items"][:5]


async def _is(check, expected: object) -> bool:
    return await check() is expected


async def test_a_refused_failover_is_overridden_explicitly_over_the_api(tmp_path):
    """master-a fails and its only checkpoint is corrupt: POST /api/v1/failover is refused
    (failover.require_state), and goes ahead without state only with allow_state_loss,
    audited under the caller."""
    async with exporter(tmp_path) as api:
        svc = api.svc
        urls = {m.name: m.url for m in svc.config.masters}
        await wait_for(lambda: svc.failover.checkpoint_ts("master-a") is not None, 10,
                       "a checkpoint of master-a")
        async with api.http.post(f"{urls['master-a']}/chaos", json={"mode": "error"}) as r:
            assert r.status == 200
        await wait_for(lambda: svc.fleet.get("master-a").health.state == "failed", 10,
                       "master-a failed")
        ts, checksum, raw = svc.store.checkpoint("master-a")
        forged = json.loads(raw)
        forged["sessions"]["forged"] = {}
        svc.store.save_checkpoint("master-a", ts, checksum, json.dumps(forged).encode())

        status, record = await api.call("POST", "/api/v1/failover", API_AUTH,
                                         json={"from": "master-a"})
        assert status == 409 and record["result"] == "failed", record
        assert "refused by failover.require_state" in record["reason"]
        status, body = await api.call("POST", "/api/v1/failover", API_AUTH,
                                      json={"from": "master-a", "allow_state_loss": "yes"})
        assert status == 400, body
        status, record = await api.call("POST", "/api/v1/failover", API_AUTH,
                                        json={"from": "master-a", "allow_state_loss": True})
        assert status == 200 and record["result"] == "success", record
        assert record["backup"] == "master-c"
        fetch = next(s for s in record["steps"] if s["step"] == "fetch")
        assert fetch["detail"]["source"] == "none"
        health = await get_json(api.http, f"{urls['master-c']}/health")
        assert health["active"] and health["duties"] == ["master-a"]
        state = await get_json(api.http, f"{urls['master-c']}/state")
        assert "master-a" not in state.get("imported", {})  # activated without state
        _, audit = await api.call("GET", "/api/v1/audit?master=master-a")
        actions = {e["action"]: e for e in audit["items"]}
        assert actions["failover_refused"]["detail"]["rule"] == "failover.require_state"
        assert actions["state_lost"]["actor"] == "api"
        assert svc.failover.stats.results[("master-a", "success", "none")] == 1
