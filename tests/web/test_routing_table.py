"""GET /api/v1/routing-table: shape, conditional reads, the long-poll watch and its bounds on a
real in-process exporter; then end to end with processes: a producer keeps delivering with
every exporter process stopped, and picks up what changed once one answers again."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from exporter.client import Client, ClientError
from exporter.routing import RoutingTable
from tests.processes import Processes, StartStack, exporter_proc, started
from tests.support import TOKEN, get_json, master_entry, wait_for, wait_ready, write_config
from tests.web.harness import AUTH, Api, exporter

PATH = "/api/v1/routing-table"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with exporter(tmp_path) as api:
        api.svc.router.table.queue_refresh = 3600  # queue figures alone never move a version
        yield api


async def get(api: Api, query: str = "", **kw: Any) -> tuple[int, Mapping[str, str], bytes]:
    async with api.http.get(f"{api.base}{PATH}{query}", **kw) as r:
        return r.status, r.headers.copy(), await r.read()


async def maintenance(api: Api, name: str, on: bool) -> None:
    status, body = await api.call("POST", f"/api/v1/masters/{name}/maintenance", AUTH,
                                  json={"enabled": on})
    assert status == 200, body


async def test_the_table_its_etag_and_conditional_reads(api: Api) -> None:
    status, headers, body = await get(api)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    table = RoutingTable.model_validate_json(body)
    assert headers["ETag"] == f'"{table.version}"' and headers["Cache-Control"] == "no-cache"
    assert [m.name for m in table.masters] == ["master-a", "master-b", "master-c"]
    assert table.strategy == "round_robin" and not table.panic and table.no_route is None
    c = table.masters[2]
    assert (c.role, c.effective_weight, c.region) == ("standby", 0.0, "uae")
    assert {m.name: m.effective_weight for m in table.masters} == \
        api.svc.router.effective_weights()
    assert (await get(api, headers={"If-None-Match": headers["ETag"]}))[0] == 304
    t0 = time.monotonic()
    status, headers, body = await get(api, f"?version={table.version}")  # no wait: at once
    assert (status, body, headers["ETag"]) == (304, b"", f'"{table.version}"')
    assert time.monotonic() - t0 < 0.5
    assert (await get(api, f"?version={table.version - 1}"))[0] == 200


async def test_a_watch_answers_a_health_change_within_a_deadline_and_304_without(
    api: Api,
) -> None:
    version = RoutingTable.model_validate_json((await get(api))[2]).version
    watch = asyncio.create_task(get(api, f"?wait=20s&version={version}"))
    await asyncio.sleep(0.3)
    assert not watch.done() and api.svc.router.table.waiting == 1
    changed = time.monotonic()
    await maintenance(api, "master-c", True)  # the standby: a health change, nothing drains
    status, headers, body = await asyncio.wait_for(watch, 2)
    took = time.monotonic() - changed
    assert status == 200 and took < 1.0, took
    table = RoutingTable.model_validate_json(body)
    assert table.version > version and headers["ETag"] == f'"{table.version}"'
    c = table.masters[2]
    assert (c.state, c.effective_weight) == ("maintenance", 0.0)
    for query, low in ((f"?wait=500ms&version={table.version}", 0.45),
                       (f"?wait=0.3&version={table.version}", 0.25)):  # plain seconds too
        t0 = time.monotonic()
        status, headers, body = await get(api, query)
        waited = time.monotonic() - t0
        assert (status, body) == (304, b"") and low <= waited < 2.0, (query, waited)
        assert headers["ETag"] == f'"{table.version}"'
    assert api.svc.router.table.waiting == 0
    print(f"\nwatch: answered {took * 1000:.1f} ms after the change")


@pytest.mark.parametrize(("query", "says"), [
    ("?wait=abc&version=1", "wait: invalid duration"),
    ("?wait=61s&version=1", "wait: at most 60s"),
    ("?wait=2m&version=1", "wait: at most 60s"),
    ("?wait=-1&version=1", "wait:"),
    ("?wait=1e3&version=1", "wait:"),
    ("?wait=&version=1", "wait:"),
    ("?wait=30s", "version: required with wait"),
    ("?version=abc", "version: must be a whole number"),
    ("?version=-3", "version: must be a whole number"),
    (f"?version={2**63}", "version: must be a whole number"),
    ("?version=" + "9" * 400, "version: must be a whole number"),
])
async def test_bad_parameters_are_400_naming_them(api: Api, query: str, says: str) -> None:
    status, body = await api.call("GET", PATH + query)
    assert status == 400 and body["error"].startswith(says), (query, status, body)


async def test_watchers_beyond_the_cap_get_503_and_waiting_costs_no_polling(api: Api) -> None:
    feed = api.svc.router.table
    feed.max_waiters = 40
    builds = 0
    source = feed._source

    def counted() -> Any:
        nonlocal builds
        builds += 1
        return source()

    feed._source = counted  # type: ignore[method-assign]
    version = feed.current().version
    watches = [asyncio.create_task(get(api, f"?wait=20s&version={version}")) for _ in range(40)]
    await wait_for(lambda: feed.waiting == 40, 5, "40 watchers waiting")
    before = builds
    await asyncio.sleep(1.0)  # a second of forty idle watches: no rebuild, no polling
    assert builds == before
    status, body = await api.call("GET", f"{PATH}?wait=20s&version={version}")
    assert status == 503 and "too many table watchers" in body["error"], body
    status, _ = await api.call("GET", f"{PATH}?wait=20s&version={version - 1}")
    assert status == 200  # a changed table needs no slot: answered at once
    changed = time.monotonic()
    status, _ = await api.call("PUT", "/api/v1/balancing/strategy", AUTH,
                               json={"strategy": "priority"})
    assert status == 200
    answers = await asyncio.wait_for(asyncio.gather(*watches), 3)
    took = time.monotonic() - changed
    assert {a[0] for a in answers} == {200} and took < 1.5, took
    assert len({a[2] for a in answers}) == 1 and builds == before + 1  # one rebuild for all
    assert feed.waiting == 0
    print(f"\n40 watchers answered {took * 1000:.0f} ms after one change, one rebuild")


# ---- end to end with processes ---------------------------------------------------------------

FAST_PROBES = {"interval": "300ms", "timeout": "200ms", "failure_threshold": 2,
               "recovery_threshold": 2, "jitter": "10%"}
SPECS = [("master-a", "uae", "active", 1), ("master-b", "uae", "active", 1),
         ("master-c", "usa", "active", 2)]
SECTIONS: dict[str, Any] = {
    "probe": FAST_PROBES,
    "failover": {"enabled": False},
    "balancing": {"strategy": "round_robin", "slow_start": "1s"},
}
RATE = 200.0  # messages/s offered by the producer (pacing only)
STOPPED_FOR = 6.0


class RecordingClient(Client):
    """Remembers every decision send() made, with its monotonic time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decisions: list[tuple[float, str]] = []

    async def route(self, key: str | None = None, region: str | None = None) -> dict:
        decision = await super().route(key, region)
        self.decisions.append((time.monotonic(), str(decision["master"])))
        return decision


def rotation(client: Client) -> set[str]:
    table = client.table
    return {m.name for m in table.masters if m.effective_weight > 0} if table else set()


async def test_a_producer_keeps_delivering_with_every_exporter_stopped(
    stack: StartStack, processes: Processes, http: aiohttp.ClientSession, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two exporter processes (replicas over the same masters); the producer is given both.
    SIGKILL the first: the client moves to the second. SIGSTOP the second: no exporter answers,
    and the producer keeps delivering on its last table; meanwhile master-b starts refusing
    (chaos down), which the client meets by ejecting it locally for ``eject_for`` (1 s) at a
    time. SIGCONT: the exporter probes master-b failed, the client takes the new table, and no
    message is routed to master-b after it, though the local ejection lapses meanwhile (the
    last phase outlasts it): the table keeps it out. Every send succeeds, and every
    acknowledged id is in its master's own record."""
    fleet = await stack(SPECS, **SECTIONS)
    await fleet.ready(http)
    replica_dir = tmp_path / "replica"
    replica_dir.mkdir()
    config = write_config(replica_dir, [master_entry(n, fleet.urls[n], g, role, p)
                                        for n, g, role, p in SPECS], **SECTIONS)
    replica = await started(processes.add(exporter_proc(replica_dir, config)))
    await wait_ready(http, await replica.listening())
    first, second = fleet.exporter, replica
    assert first is not None and first.url and second.url

    client = RecordingClient([first.url, second.url], token=TOKEN, attempts=6, timeout=1.0,
                             backoff=0.02, max_backoff=0.2, watch_wait=2.0, stale_after=2.0,
                             eject_for=1.0)
    acked: dict[str, str] = {}
    failures: dict[str, str] = {}
    done_at: list[tuple[float, int]] = []  # (time, attempts) of every acknowledged send
    marks: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()

    async def one(i: int) -> None:
        mid = f"msg-{i:06d}"
        try:
            res = await client.send({"id": mid, "chat": f"c{i % 31}"})
        except ClientError as exc:
            failures[mid] = str(exc)
            return
        acked[mid] = res["master"]
        done_at.append((time.monotonic(), res["attempts"]))

    async def produce() -> None:
        t0, i, inflight = time.monotonic(), 0, set()
        while not stop.is_set():
            pace = t0 + i / RATE - time.monotonic()
            if pace > 0:
                await asyncio.sleep(pace)
            task = asyncio.create_task(one(i))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            i += 1
        await asyncio.gather(*inflight)

    async def phase(name: str, seconds: float) -> None:
        marks[name] = time.monotonic()
        end = marks[name] + seconds
        while time.monotonic() < end:
            samples.append({"t": time.monotonic(), **client.stats()})
            await asyncio.sleep(0.1)

    async with client:
        producer = asyncio.create_task(produce())
        try:
            with caplog.at_level(logging.INFO, logger="exporter.client"):
                await phase("all up", 1.5)
                first.kill(signal.SIGKILL)
                marks["first killed"] = time.monotonic()
                await wait_for(lambda: client.stats()["exporter"] == second.url, 10,
                               "the client on the second exporter")
                await phase("second only", 1.0)
                version = client.stats()["table_version"]
                second.kill(signal.SIGSTOP)
                await phase("all stopped", 1.0)
                async with http.post(f"{fleet.urls['master-b']}/chaos",
                                     json={"mode": "down"}) as r:
                    assert r.status == 200
                await phase("master-b down", STOPPED_FOR - 1.0)
                stopped = {k: v for k, v in client.stats().items() if k.startswith(
                    ("table", "exporter", "reports", "locally"))}
                second.kill(signal.SIGCONT)
                marks["resumed"] = time.monotonic()
                await wait_for(lambda: "master-b" not in rotation(client), 15,
                               "the client's table without master-b")
                marks["table says"] = time.monotonic()
                await phase("after", 1.5)
        finally:
            stop.set()
            await asyncio.wait_for(producer, 30)
        final = client.stats()

    stop_start, stop_end = marks["all stopped"], marks["resumed"]
    during = sorted(t for t, _ in done_at if stop_start <= t <= stop_end)
    gaps = [b - a for a, b in zip([stop_start, *during], [*during, stop_end], strict=True)]
    to_b_stopped = sum(1 for t, m in client.decisions
                       if marks["master-b down"] <= t <= stop_end and m == "master-b")
    to_b_after = [t for t, m in client.decisions if t > marks["table says"] and m == "master-b"]
    ages = [s["table_age_seconds"] or 0.0 for s in samples if stop_start <= s["t"] <= stop_end]
    attempts = Counter(a for _, a in done_at)
    print(f"\nexporters stopped {stop_end - stop_start:.1f}s: {len(during)} messages delivered "
          f"meanwhile (longest gap {max(gaps):.2f}s), {to_b_stopped} decisions to master-b "
          f"while it refused (retried elsewhere); table age up to {max(ages):.1f}s; "
          f"client then: {stopped}; new table {marks['table says'] - stop_end:.2f}s after "
          f"SIGCONT; sent {len(acked) + len(failures)}, acknowledged {len(acked)}, lost "
          f"{len(failures)}; attempts {dict(sorted(attempts.items()))}; "
          f"by master {dict(Counter(acked.values()))}; reports {final['reports_sent']} sent, "
          f"{final['reports_dropped']} dropped")

    assert not failures, list(failures.items())[:5]
    assert stopped["table_version"] == version and not stopped["exporter_up"]
    assert len(during) >= 0.7 * RATE * STOPPED_FOR and max(gaps) < 1.0, (len(during), max(gaps))
    assert max(ages) > 2.0 and "routing on a table" in caplog.text
    assert stopped["reports_dropped"] > 0
    assert to_b_stopped > 0  # the last table still had master-b: tried, then the next one
    assert any(s["locally_ejected"] == ["master-b"] for s in samples
               if stop_start <= s["t"] <= stop_end)
    assert not to_b_after, len(to_b_after)
    assert final["table_version"] != version and final["exporter_up"]
    assert final["reports_sent"] > stopped["reports_sent"]  # reports flow again
    for name in ("master-a", "master-b", "master-c"):
        ids = set((await get_json(http, f"{fleet.urls[name]}/messages"))["ids"])
        mine = {mid for mid, m in acked.items() if m == name}
        assert mine <= ids, (name, sorted(mine - ids)[:5])
