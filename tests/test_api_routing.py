"""Routing through the real exporter process: zero loss across a failover, rebalancing,
run-time strategy switch, and the API's errors."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest

from exporter.client import Client
from tests.processes import TOKEN, Stack, start_exporter
from tests.support import get_json, metric_value, wait_for

AUTH = {"Authorization": f"Bearer {TOKEN}"}


FAST_PROBES = {
    "interval": "300ms",
    "timeout": "200ms",
    "failure_threshold": 2,
    "recovery_threshold": 2,
}


async def test_zero_loss_across_a_real_failover(tmp_path):
    """5,000 messages through exporter.client while the active master-a is SIGKILLed."""
    stack = Stack(
        tmp_path,
        [
            ("master-a", "uae", "active", 1),
            ("master-b", "usa", "active", 2),
            ("master-c", "uae", "standby", 3),
        ],
        probe=FAST_PROBES,
        failover={"enabled": True, "cooldown": "30s", "checkpoint_interval": "500ms"},
        balancing={
            "strategy": "round_robin",
            "outlier_consecutive_failures": 2,
            "max_ejection_percent": "50%",
            "slow_start": "1s",
        },
    )
    total, kill_after, in_flight = 5000, 1000, 32
    acked: dict[str, str] = {}
    failures: list[str] = []
    try:
        async with aiohttp.ClientSession() as http:
            await stack.ready(http)
            killed_at: float | None = None
            sem = asyncio.Semaphore(in_flight)
            async with Client(
                stack.base, token=TOKEN, attempts=10, backoff=0.05, max_backoff=0.3, timeout=2.0
            ) as client:

                async def send(i: int) -> None:
                    nonlocal killed_at
                    async with sem:
                        try:
                            res = await client.send({"id": f"msg-{i:05d}", "chat": f"c{i % 97}"})
                        except Exception as exc:  # counted as lost, reported below
                            failures.append(f"msg-{i:05d}: {exc}")
                            return
                        acked[f"msg-{i:05d}"] = res["master"]
                        if len(acked) == kill_after and killed_at is None:
                            stack.masters["master-a"].kill(signal.SIGKILL)
                            killed_at = time.monotonic()

                t0 = time.monotonic()
                await asyncio.wait_for(asyncio.gather(*(send(i) for i in range(total))), 120)
                elapsed = time.monotonic() - t0

            async def failed_over() -> dict | None:
                items = (await get_json(http, f"{stack.base}/api/v1/failovers"))["items"]
                return next(
                    (f for f in items if f["master"] == "master-a" and f["result"] == "success"),
                    None,
                )

            record = await wait_for(failed_over, 10, "the failover of master-a")
            assert record["backup"] == "master-c"
            c_health = await get_json(http, f"{stack.urls['master-c']}/health")
            assert c_health["active"] and "master-a" in c_health["duties"]
            for _ in range(300):  # the dead master is never routed to again
                route = await get_json(http, f"{stack.base}/api/v1/route")
                assert route["master"] != "master-a"

            seen: dict[str, list[str]] = {}
            for name in ("master-b", "master-c"):
                ids = (await get_json(http, f"{stack.urls[name]}/messages"))["ids"]
                for mid in ids:
                    seen.setdefault(mid, []).append(name)
            imported = (await get_json(http, f"{stack.urls['master-c']}/state"))["imported"]
            in_checkpoint = {m["id"] for m in imported["master-a"]["pending_messages"]}
    finally:
        stack.stop()

    lost = total - len(acked)
    on_a = [mid for mid, m in acked.items() if m == "master-a"]
    missing = [mid for mid, m in acked.items() if m != "master-a" and m not in seen.get(mid, [])]
    duplicates = sum(len(v) > 1 for v in seen.values()) + sum(mid in seen for mid in on_a)
    print(
        f"zero-loss: sent {total}, acknowledged {len(acked)}, lost {lost}, "
        f"duplicates {duplicates}, acked by master-a {len(on_a)} "
        f"({len(in_checkpoint & set(on_a))} still pending in its transferred checkpoint), "
        f"kill -> failover {record['started'] - time.time() + time.monotonic() - killed_at:.2f}s"
        f" after kill, {elapsed:.1f}s in all"
    )
    assert not failures, failures[:5]
    assert lost == 0
    assert not missing, missing[:5]  # every ack by a live master is in its own record


async def test_rebalancing_shifts_weight_and_restores_it(tmp_path):
    stack = Stack(
        tmp_path,
        [("master-a", "uae", "active", 1), ("master-b", "uae", "active", 1)],
        probe=FAST_PROBES,
        failover={"enabled": False},
        balancing={
            "strategy": "round_robin",
            "rebalance": {"imbalance_ratio": 2.0, "for": "1s", "step": "25%"},
        },
    )
    weight = 'ha_master_routing_weight{master="master-a"}'
    try:
        async with aiohttp.ClientSession() as http:
            await stack.ready(http)
            assert await metric_value(http, stack.base, weight) == 1.0
            async with http.post(
                f"{stack.urls['master-a']}/chaos", json={"mode": "ok", "queue_length": 900}
            ) as r:
                assert r.status == 200
            t0 = time.monotonic()

            async def shifted() -> bool:
                return (await metric_value(http, stack.base, weight) or 1.0) < 1.0

            # for (1 s) + one evaluation (0.3 s) + probe and scrape slack
            await wait_for(shifted, 1.0 + 0.3 + 1.5, "master-a's weight to drop", poll=0.05)
            print(f"rebalance: weight shifted {time.monotonic() - t0:.2f}s after the backlog")
            assert (
                await metric_value(http, stack.base, 'ha_rebalances_total{reason="imbalance"}') >= 1
            )
            async with http.post(
                f"{stack.urls['master-a']}/chaos", json={"mode": "ok", "queue_length": 0}
            ) as r:
                assert r.status == 200

            async def restored() -> bool:
                return await metric_value(http, stack.base, weight) == 1.0

            await wait_for(restored, 15, "master-a's weight to be restored")
            assert (
                await metric_value(http, stack.base, 'ha_rebalances_total{reason="restored"}') >= 1
            )
            audit = await get_json(http, f"{stack.base}/api/v1/audit?master=master-a")
            actions = {e["action"] for e in audit["items"]}
            assert {"rebalance_imbalance", "rebalance_restored"} <= actions
    finally:
        stack.stop()


@pytest.fixture
async def pair(tmp_path):
    stack = Stack(
        tmp_path,
        [("master-a", "uae", "active", 1), ("master-b", "usa", "active", 2)],
        probe=FAST_PROBES,
        failover={"enabled": False},
        api={"token_env": "HA_TEST_TOKEN", "max_body_bytes": 1024},
    )
    try:
        async with aiohttp.ClientSession() as http:
            await stack.ready(http)
            yield stack, http
    finally:
        stack.stop()


async def test_strategy_switch_persists_across_restart(pair):
    stack, http = pair
    async with http.put(
        f"{stack.base}/api/v1/balancing/strategy", headers=AUTH, json={"strategy": "geo"}
    ) as r:
        assert r.status == 200 and (await r.json()) == {
            "strategy": "geo",
            "previous": "round_robin",
        }
    route = await get_json(http, f"{stack.base}/api/v1/route?region=usa")
    assert route == {"master": "master-b", "url": stack.urls["master-b"], "strategy": "geo"}
    stack.exporter.kill(signal.SIGTERM)
    assert await asyncio.to_thread(stack.exporter.wait, 10) == 0
    stack.exporter, _ = start_exporter(stack.tmp, stack.config)
    await stack.ready(http)
    assert (await get_json(http, f"{stack.base}/api/v1/route"))["strategy"] == "geo"


async def test_route_api_errors(pair):
    stack, http = pair
    base = stack.base
    cases = [
        ("PUT", "/api/v1/balancing/strategy", AUTH, {"strategy": "random"}, 400),
        ("PUT", "/api/v1/balancing/strategy", {}, {"strategy": "geo"}, 401),
        ("GET", "/api/v1/route?region=mars", {}, None, 400),
        ("POST", "/api/v1/route/report", AUTH, {"master": "nobody", "ok": True}, 404),
        ("POST", "/api/v1/route/report", AUTH, {"master": "master-a", "ok": "yes"}, 400),
        (
            "POST",
            "/api/v1/route/report",
            AUTH,
            {"master": "master-a", "ok": True, "latency_seconds": -1},
            400,
        ),
        (
            "POST",
            "/api/v1/route/report",
            AUTH,
            {"master": "master-a", "ok": True, "pad": "x" * 2048},
            413,
        ),
        ("POST", "/api/v1/route/report", {}, {"master": "master-a", "ok": True}, 401),
    ]
    for method, path, headers, body, status in cases:
        async with http.request(method, base + path, headers=headers, json=body) as r:
            payload = await r.json()
            assert r.status == status, (method, path, body, r.status, payload)
            assert payload["error"], payload
    for name in ("master-a", "master-b"):
        async with http.post(f"{stack.urls[name]}/chaos", json={"mode": "down"}):
            pass

    async def unroutable() -> dict | None:
        async with http.get(f"{base}/api/v1/route") as r:
            return await r.json() if r.status == 503 else None

    body = await wait_for(unroutable, 10, "503 once every master failed")
    assert "failed" in body["error"]
