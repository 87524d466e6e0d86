"""Routing through the real exporter process, end to end (issue 4): zero loss across a real
failover, threshold-driven rebalancing, the run-time strategy switch, and the API's errors.

Every process is real (`ha-exporter master`, `ha-exporter run`) on 127.0.0.1; every wait is a
condition with a deadline; the only sleeps pace the producer.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Awaitable
from typing import Any

import aiohttp
import pytest

from exporter.client import Client, ClientError, DeliveryFailed, RequestRejected, RouteUnavailable
from tests.processes import Stack, StartStack
from tests.support import TOKEN, TOKEN_ENV, get_json, metric_value, wait_for

AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST_PROBES = {
    "interval": "300ms",
    "timeout": "200ms",
    "failure_threshold": 2,
    "recovery_threshold": 2,
    "jitter": "10%",
}
INTERVAL, JITTER = 0.3, 0.1


class RecordingClient(Client):
    """exporter.client.Client that remembers every routing decision with the wall-clock time
    its request was *sent*: a decision requested after time T was made after T, so it can be
    compared with the exporter's own failover timestamps."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decisions: list[tuple[float, str]] = []

    async def route(self, key: str | None = None, region: str | None = None) -> dict:
        sent = time.time()
        decision = await super().route(key, region)
        self.decisions.append((sent, str(decision["master"])))
        return decision


async def _chaos(http: aiohttp.ClientSession, url: str, **body: Any) -> None:
    async with http.post(f"{url}/chaos", json=body) as r:
        assert r.status == 200, await r.text()


# ---- 1. zero loss across a real failover ------------------------------------------------------

TOTAL, KILL_AFTER, IN_FLIGHT, RATE = 5000, 1000, 32, 1000.0  # RATE: messages/s, pacing only


async def test_zero_loss_across_a_real_failover(
    stack: StartStack, http: aiohttp.ClientSession
) -> None:
    """5,000 messages through exporter.client while the active master-a is SIGKILLed.

    "Delivered" means a master answered 2xx to POST /messages (the client returned success).
    "Processed" means taken into a live master's state: in master-b's or master-c's accepted
    set (GET /messages), or pending in master-a's transferred checkpoint (master-c imported it
    and serves master-a's duty); a copy held only in dead master-a's memory is not processed.
    Asserted: every send is acknowledged (0 lost from the producer's view); every id a live
    master acknowledged is in that master's GET /messages; the failover to master-c succeeded
    and master-c says it is active with master-a's duty; no routing decision requested after
    the failover started named master-a; the checkpoint's watermark splits master-a's
    acknowledgements exactly (seq <= watermark: in the checkpoint; above: not); the client
    re-sent exactly those above it to master-c, so every acknowledged id is processed (0 lost,
    master-a's acknowledgements after its checkpoint included) and none is processed twice."""
    fleet = await stack(
        [
            ("master-a", "uae", "active", 1),
            ("master-b", "usa", "active", 2),
            ("master-c", "uae", "standby", 3),
        ],
        # master-a never drains (exact checkpoint accounting); the others keep up with traffic
        # so they stay healthy rather than degraded.
        drain={"master-a": 0.0, "master-b": 5000.0, "master-c": 5000.0},
        probe=FAST_PROBES,
        failover={"enabled": True, "cooldown": "30s", "checkpoint_interval": "1s"},
        balancing={
            "strategy": "round_robin",
            "outlier_consecutive_failures": 3,
            "max_ejection_percent": "50%",
            "slow_start": "1s",
        },
    )
    acked: dict[str, str] = {}  # id -> master that answered 2xx
    seqs: dict[str, Any] = {}  # id -> the seq master-a gave it
    attempts: Counter[int] = Counter()
    failures: dict[str, str] = {}
    killed_at: float | None = None  # wall clock, comparable with the exporter's records
    await fleet.ready(http)

    async def success_record() -> dict | None:
        items = (await get_json(http, f"{fleet.base}/api/v1/failovers"))["items"]
        return next(
            (i for i in items if i["master"] == "master-a" and i["result"] == "success"),
            None,
        )

    async def watch() -> tuple[float, dict]:
        """When the success record first became visible, from the test's side."""
        record = await wait_for(success_record, 60, "the failover of master-a", 0.05)
        return time.time(), record

    sem = asyncio.Semaphore(IN_FLIGHT)
    client = RecordingClient(
        fleet.base, token=TOKEN, attempts=8, timeout=2.0, backoff=0.05, max_backoff=0.3
    )
    async with client:

        async def send(i: int, t0: float) -> None:
            nonlocal killed_at
            mid = f"msg-{i:05d}"
            pace = t0 + i / RATE - time.monotonic()
            if pace > 0:
                await asyncio.sleep(pace)
            async with sem:
                try:
                    res = await client.send({"id": mid, "chat": f"c{i % 97}"})
                except ClientError as exc:
                    failures[mid] = str(exc)
                    return
            acked[mid] = res["master"]
            if res["master"] == "master-a":
                seqs[mid] = res["response"].get("seq")
            attempts[res["attempts"]] += 1
            if len(acked) >= KILL_AFTER and killed_at is None:
                fleet.masters["master-a"].kill(signal.SIGKILL)
                killed_at = time.time()

        watcher = asyncio.create_task(watch())
        try:
            t0 = time.monotonic()
            producer = asyncio.gather(*(send(i, t0) for i in range(TOTAL)))
            await asyncio.wait_for(producer, 60)
            elapsed, ended = time.monotonic() - t0, time.time()
            appeared, record = await watcher

            async def replayed_all() -> bool:  # the client's own watch may have done it already
                await client.sync()
                return client.stats()["held"].get("master-a", 0) == 0

            await wait_for(replayed_all, 30, "the replay of master-a's acknowledgements", 0.2)
        finally:
            watcher.cancel()

    assert killed_at is not None
    assert record["backup"] == "master-c", record
    assert record["finished"] < ended, "the failover ended after the producer did"
    full = await get_json(http, f"{fleet.base}/api/v1/failovers/{record['id']}")
    fetch = next(s for s in full["steps"] if s["step"] == "fetch")
    # master-a is dead, so its state can only have come from the last checkpoint
    assert fetch["detail"]["source"] == "checkpoint", fetch
    c_health = await get_json(http, f"{fleet.urls['master-c']}/health")
    assert c_health["active"] is True and "master-a" in c_health["duties"], c_health

    routed_after = [m for sent, m in client.decisions if sent > record["started"]]
    assert routed_after, "no message was routed after the failover started"
    assert "master-a" not in routed_after, Counter(routed_after)
    for _ in range(100):  # and not later either, once the producer has stopped
        route = await get_json(http, f"{fleet.base}/api/v1/route")
        assert route["master"] in ("master-b", "master-c"), route

    holders: dict[str, set[str]] = {}
    for name in ("master-b", "master-c"):
        for mid in (await get_json(http, f"{fleet.urls[name]}/messages"))["ids"]:
            holders.setdefault(mid, set()).add(name)
    imported = (await get_json(http, f"{fleet.urls['master-c']}/state"))["imported"]
    checkpoint = {m["id"] for m in imported["master-a"]["pending_messages"]}
    watermark = imported["master-a"]["watermark"]

    on_a = {mid for mid, m in acked.items() if m == "master-a"}
    processed = Counter({mid: len(live) for mid, live in holders.items()})  # b and c
    processed.update(checkpoint)  # master-c holds these in its import of master-a's state
    for mid in on_a | checkpoint:  # what master-a is known to have accepted
        holders.setdefault(mid, set()).add("master-a")
    lost = TOTAL - len(acked)
    missing = sorted(
        mid for mid, m in acked.items() if m != "master-a" and m not in holders.get(mid, ())
    )
    uncovered = on_a - checkpoint
    unprocessed = sorted(mid for mid in acked if processed[mid] == 0)
    duplicates = sorted(mid for mid, n in processed.items() if n > 1)
    replayed = client.replayed["master-a"]
    print(
        f"\nzero-loss: sent {TOTAL}, acknowledged {len(acked)}, lost {lost}, "
        f"processed nowhere {len(unprocessed)}, processed twice {len(duplicates)}; "
        f"acknowledged by master-a {len(on_a)}: "
        f"{len(on_a & checkpoint)} in the transferred checkpoint (watermark {watermark}, "
        f"age {fetch['detail'].get('checkpoint_age', float('nan')):.2f}s at the fetch), "
        f"{len(uncovered)} acknowledged after it, {replayed} re-sent to master-c "
        f"(client stats {client.stats()}); "
        f"kill -> failover started "
        f"{record['started'] - killed_at:.2f}s, success {record['finished'] - killed_at:.2f}s "
        f"(seen by the test {appeared - killed_at:.2f}s); {len(routed_after)} routing decisions "
        f"after the failover started, {routed_after.count('master-a')} to master-a; "
        f"attempts per message "
        f"{dict(sorted(attempts.items()))}; {elapsed:.1f}s in all"
    )
    if duplicates:
        print("processed twice:", {mid: sorted(holders[mid]) for mid in duplicates[:10]})
    assert not failures, list(failures.items())[:5]
    assert lost == 0
    assert not missing, missing[:5]  # every ack by a live master is in its own record
    # the checkpoint holds only ids that were sent; one acknowledged elsewhere is a duplicate
    assert checkpoint <= acked.keys(), sorted(checkpoint - acked.keys())[:5]
    # the watermark is exact: it splits master-a's acknowledgements at the checkpoint
    assert isinstance(watermark, int) and all(isinstance(seqs[mid], int) for mid in on_a)
    assert {mid for mid in on_a if seqs[mid] <= watermark} == on_a & checkpoint
    assert {mid for mid in on_a if seqs[mid] > watermark} == uncovered
    assert replayed == len(uncovered), (replayed, len(uncovered))  # exactly those re-sent
    assert uncovered <= holders.keys() and all("master-c" in holders[m] for m in uncovered)
    assert not unprocessed, unprocessed[:5]  # 0 lost, acknowledged-but-not-checkpointed too
    assert not duplicates, duplicates[:5]


# ---- 2. rebalancing -------------------------------------------------------------------------


async def test_rebalancing_shifts_weight_away_and_restores_it(
    stack: StartStack, http: aiohttp.ClientSession
) -> None:
    """A 2,000-message backlog on master-a shifts its routing weight away within ``for`` plus
    one evaluation (plus probe slack); clearing it restores the weight. 2,000 is above the
    simulated master's degraded mark (1,000), so the health machine also halves the weight:
    the shift is attributed to rebalancing by the rebalance factor and the counters."""
    for_, degraded_weight = 1.0, 0.5
    fleet = await stack(
        [
            ("master-a", "uae", "active", 1),
            ("master-b", "uae", "active", 1),
            ("master-c", "usa", "active", 2),
        ],
        probe=FAST_PROBES,
        failover={"enabled": False},
        balancing={
            "strategy": "round_robin",
            "degraded_weight": degraded_weight,
            "slow_start": "1s",
            "rebalance": {"imbalance_ratio": 2.0, "for": "1s", "step": "25%"},
        },
    )
    weight = 'ha_master_routing_weight{master="master-a"}'
    imbalance = 'ha_rebalances_total{reason="imbalance"}'
    restored = 'ha_rebalances_total{reason="restored"}'
    await fleet.ready(http)

    async def weight_of_a() -> float | None:
        return await metric_value(http, fleet.base, weight)

    # slow start may still be ramping right after readiness
    await wait_for(lambda: _eq(weight_of_a(), 1.0), 5, "master-a at its base weight")
    base_imbalance = await metric_value(http, fleet.base, imbalance) or 0.0
    base_restored = await metric_value(http, fleet.base, restored) or 0.0

    await _chaos(http, fleet.urls["master-a"], mode="ok", queue_length=2000)
    t0 = time.monotonic()

    async def shifted() -> bool:
        return (await metric_value(http, fleet.base, imbalance) or 0.0) > base_imbalance

    # the probe must see the backlog (one interval + jitter), the next evaluation starts
    # the clock, ``for`` passes, the evaluation after it shifts; plus scrape slack
    bound = INTERVAL * (1 + JITTER) + INTERVAL + for_ + INTERVAL + 0.4
    await wait_for(shifted, bound, "an imbalance rebalance of master-a", poll=0.05)
    took = time.monotonic() - t0
    info = (await get_json(http, f"{fleet.base}/api/v1/balancing"))["masters"]
    assert info["master-a"]["rebalance_factor"] < 1.0, info["master-a"]
    assert info["master-b"]["rebalance_factor"] == 1.0, info["master-b"]
    a_weight = await weight_of_a()
    assert a_weight is not None and a_weight < 1.0
    # below what degradation alone would leave: the rebalancer took weight away
    await wait_for(lambda: _lt(weight_of_a(), degraded_weight), 2, "a weight below degraded")
    routed = Counter(
        [(await get_json(http, f"{fleet.base}/api/v1/route"))["master"] for _ in range(60)]
    )
    # weight <= 0.375 against 1 + 1: at most 16% of smooth round robin's picks, 10 of 60
    assert routed["master-a"] <= 12, routed

    await _chaos(http, fleet.urls["master-a"], mode="ok", queue_length=0)
    t1 = time.monotonic()
    await wait_for(lambda: _eq(weight_of_a(), 1.0), 10, "master-a's weight restored")
    back = time.monotonic() - t1
    assert (await metric_value(http, fleet.base, restored) or 0.0) > base_restored
    audit = await get_json(http, f"{fleet.base}/api/v1/audit?master=master-a&limit=100")
    actions = Counter(e["action"] for e in audit["items"])
    assert actions["rebalance_imbalance"] >= 1 and actions["rebalance_restored"] >= 1
    print(
        f"\nrebalance: shifted {took:.2f}s after the backlog (bound {bound:.2f}s), "
        f"restored {back:.2f}s after it cleared; audit {dict(actions)}"
    )


async def _eq(value: Awaitable[float | None], expected: float) -> bool:
    return (await value) == expected


async def _lt(value: Awaitable[float | None], bound: float) -> bool:
    got = await value
    return got is not None and got < bound


# ---- 3. strategy switch and the API's errors -------------------------------------------------


Pair = tuple[Stack, aiohttp.ClientSession]


@pytest.fixture
async def pair(stack: StartStack, http: aiohttp.ClientSession) -> Pair:
    fleet = await stack(
        [("master-a", "uae", "active", 1), ("master-b", "usa", "active", 2)],
        probe=FAST_PROBES,
        failover={"enabled": False},
        balancing={"strategy": "round_robin", "slow_start": "1s"},
        api={"token_env": TOKEN_ENV, "max_body_bytes": 1024},
    )
    await fleet.ready(http)
    return fleet, http


async def test_strategy_switch_applies_at_once_and_survives_a_restart(pair: Pair) -> None:
    """PUT /api/v1/balancing/strategy changes the next decision, is audited, and is persisted:
    after SIGTERM (clean exit within 10 s) and a start with the same config and state_path,
    the route API still answers with the switched strategy, not the configured one."""
    stack, http = pair
    async with http.put(
        f"{stack.base}/api/v1/balancing/strategy", headers=AUTH, json={"strategy": "geo"}
    ) as r:
        assert r.status == 200
        assert await r.json() == {"strategy": "geo", "previous": "round_robin"}
    route = await get_json(http, f"{stack.base}/api/v1/route?region=usa")
    assert route == {"master": "master-b", "url": stack.urls["master-b"], "strategy": "geo"}
    assert (await get_json(http, f"{stack.base}/api/v1/balancing"))["strategy"] == "geo"
    audit = await get_json(http, f"{stack.base}/api/v1/audit")
    assert any(e["action"] == "strategy" for e in audit["items"]), audit

    old = stack.exporter
    old.kill(signal.SIGTERM)
    assert await asyncio.to_thread(old.wait, 10) == 0, old.output()[-2000:]
    await stack.restart_exporter()  # same config and state_path; closes the old one's log
    await stack.ready(http)
    route = await get_json(http, f"{stack.base}/api/v1/route?region=uae")
    assert route == {"master": "master-a", "url": stack.urls["master-a"], "strategy": "geo"}
    assert (await get_json(http, f"{stack.base}/api/v1/balancing"))["strategy"] == "geo"


async def test_route_api_errors_are_json_with_the_right_status(pair: Pair) -> None:
    """Bad requests get the contract's JSON errors; with every master failed the route API
    answers 503 with a reason, and the client turns that into RouteUnavailable."""
    stack, http = pair
    base = stack.base
    report = "/api/v1/route/report"
    strategy = "/api/v1/balancing/strategy"
    wrong = {"Authorization": "Bearer not-the-token"}
    cases: list[tuple[str, str, dict, Any, int]] = [
        ("PUT", strategy, AUTH, {"strategy": "random"}, 400),
        ("PUT", strategy, AUTH, {}, 400),
        ("PUT", strategy, AUTH, "not an object", 400),
        ("PUT", strategy, {}, {"strategy": "geo"}, 401),
        ("PUT", strategy, wrong, {"strategy": "geo"}, 401),
        ("GET", "/api/v1/route?region=mars", {}, None, 400),
        ("POST", report, AUTH, {"master": "nobody", "ok": True}, 404),
        ("POST", report, AUTH, {"master": "master-a", "ok": "yes"}, 400),
        ("POST", report, AUTH, {"ok": True}, 400),
        ("POST", report, AUTH, {"master": "master-a", "ok": True, "latency_seconds": -1}, 400),
        ("POST", report, AUTH, {"master": "master-a", "ok": True, "latency_seconds": "1"}, 400),
        ("POST", report, AUTH, [1, 2], 400),
        ("POST", report, AUTH, {"master": "master-a", "ok": True, "pad": "x" * 2048}, 413),
        ("POST", report, {}, {"master": "master-a", "ok": True}, 401),
    ]
    for method, path, headers, body, status in cases:
        async with http.request(method, base + path, headers=headers, json=body) as r:
            assert r.content_type == "application/json", (method, path, body)
            payload = await r.json()
            assert r.status == status, (method, path, body, r.status, payload)
            assert isinstance(payload["error"], str) and payload["error"], payload
    async with http.post(
        base + report, headers={**AUTH, "Content-Type": "application/json"}, data=b"{not json"
    ) as r:
        assert r.status == 400 and "JSON" in (await r.json())["error"]
    async with http.put(base + strategy, json={"strategy": "priority"}) as r:
        assert r.status == 401
    # nothing above changed the strategy
    assert (await get_json(http, f"{base}/api/v1/route"))["strategy"] == "round_robin"

    async with Client(base, attempts=2, backoff=0) as client:
        with pytest.raises(RequestRejected) as rejected:
            await client.route(region="mars")
        assert rejected.value.status == 400 and rejected.value.master is None

        for name in ("master-a", "master-b"):
            await _chaos(http, stack.urls[name], mode="down")

        async def unroutable() -> dict | None:
            async with http.get(f"{base}/api/v1/route") as r:
                return await r.json() if r.status == 503 else None

        body = await wait_for(unroutable, 10, "503 once every master failed")
        assert "failed" in body["error"] and body["strategy"] == "round_robin", body
        with pytest.raises(RouteUnavailable) as unavailable:
            await client.route()
        assert "failed" in unavailable.value.reason
        with pytest.raises(DeliveryFailed) as undelivered:
            await client.send({"id": "m-1"})
        assert [a.master for a in undelivered.value.attempts] == [None, None]
