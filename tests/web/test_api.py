"""The API's cross-cutting rules, over a real exporter app on 127.0.0.1 and simulated masters
(tests.web.harness): every mutating request needs the token, reads do not, and request bodies
are strict.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.web.harness import AUTH, MUTATING, TOKEN, Api, exporter

NO_TOKEN: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer not-the-token-42"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": "Bearer"},
    {"Authorization": TOKEN},
]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with exporter(tmp_path) as a:
        yield a


def audit_actions(api: Api) -> list[str]:
    return [e["action"] for e in api.svc.store.list_audit(limit=100, before=None, master=None)]


async def test_every_mutating_request_without_the_token_is_401(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    mutating = api.routes(MUTATING)
    assert {
        ("POST", "/-/reload"),
        ("POST", "/api/v1/failover"),
        ("POST", "/api/v1/failover/pause"),
        ("POST", "/api/v1/failover/resume"),
        ("POST", "/api/v1/masters/master-a/maintenance"),
        ("POST", "/api/v1/masters/master-a/reset"),
        ("POST", "/api/v1/route/report"),
        ("PUT", "/api/v1/balancing/strategy"),
    } <= set(mutating), mutating
    before = audit_actions(api)
    # every mutating method on every path, routed for it or not
    checked = 0
    with caplog.at_level(logging.WARNING, logger="exporter.web"):
        for path in api.paths():
            for method in MUTATING:
                for headers in NO_TOKEN:
                    status, body = await api.call(method, path, headers, json={})
                    assert (status, body) == (401, {"error": "missing or invalid bearer token"}), (
                        method, path, headers)
                    checked += 1
    assert checked >= len(mutating) * len(NO_TOKEN)
    assert audit_actions(api) == before  # nothing was done
    assert api.svc.failover is not None and not api.svc.failover.paused
    assert "rejected POST /api/v1/failover/pause" in caplog.text
    assert TOKEN not in caplog.text and "not-the-token-42" not in caplog.text
    # with the token, a method the path does not serve is a JSON 405, not a pass
    status, body = await api.call("DELETE", "/api/v1/failover", AUTH)
    assert status == 405 and body["error"]


async def test_reads_need_no_token(api: Api) -> None:
    reads = api.routes(("GET",))
    assert ("GET", "/") in reads and ("GET", "/metrics") in reads, reads
    for method, path in reads:
        status, body = await api.call(method, path)
        expected = 404 if path == "/api/v1/failovers/1" else 200  # no failover yet
        assert status == expected, (path, status, body)


async def test_unknown_body_key_is_400_naming_it_on_every_mutating_route(api: Api) -> None:
    before = audit_actions(api)
    for method, path in api.routes(MUTATING):
        status, body = await api.call(method, path, AUTH, json={"unexpected": 1})
        assert status == 400, (method, path, status, body)
        assert "body.unexpected: unexpected field" in body["error"], (path, body)
    valid_plus_extra = [
        ("POST", "/api/v1/failover", {"from": "master-a", "extra": 1}, "body.extra"),
        ("POST", "/api/v1/masters/master-b/maintenance", {"enabled": True, "drain": False},
         "body.drain"),
        ("POST", "/api/v1/route/report", {"master": "master-a", "ok": True, "latency": 1},
         "body.latency"),
        ("PUT", "/api/v1/balancing/strategy", {"strategy": "geo", "Strategy": "geo"},
         "body.Strategy"),
    ]
    for method, path, payload, named in valid_plus_extra:
        status, body = await api.call(method, path, AUTH, json=payload)
        assert (status, body) == (400, {"error": f"{named}: unexpected field"}), path
    assert audit_actions(api) == before
    assert api.svc.router.strategy == "round_robin"


async def test_missing_or_mistyped_field_is_400_naming_it(api: Api) -> None:
    cases = [
        ("POST", "/api/v1/failover", {}, "body.from: required field missing"),
        ("POST", "/api/v1/failover", {"from": ""}, "body.from: "),
        ("POST", "/api/v1/failover", {"from": "master-a", "to": 3}, "body.to: "),
        ("POST", "/api/v1/route/report", {"ok": True}, "body.master: required field missing"),
        ("POST", "/api/v1/route/report", {"master": "master-a"},
         "body.ok: required field missing"),
        ("POST", "/api/v1/route/report", {"master": "master-a", "ok": "yes"}, "body.ok: "),
        ("POST", "/api/v1/route/report", {"master": "master-a", "ok": True,
                                          "latency_seconds": -1}, "body.latency_seconds: "),
        ("POST", "/api/v1/masters/master-b/maintenance", {"enabled": "yes"}, "body.enabled: "),
        ("PUT", "/api/v1/balancing/strategy", {}, "body.strategy: required field missing"),
        ("PUT", "/api/v1/balancing/strategy", {"strategy": "random"},
         "body.strategy: unknown strategy 'random'"),
    ]
    for method, path, payload, message in cases:
        status, body = await api.call(method, path, AUTH, json=payload)
        assert status == 400 and body["error"].startswith(message), (path, payload, body)
    for raw in (b"[1, 2]", b'"text"', b"{not json"):
        status, body = await api.call("POST", "/api/v1/failover/pause", AUTH, data=raw)
        assert status == 400 and "JSON" in body["error"], (raw, body)
    status, body = await api.call("POST", "/api/v1/route/report", AUTH,
                                  json={"master": "master-a", "ok": True, "pad": "x" * 2048})
    assert status == 413 and "1024 bytes" in body["error"]


async def test_valid_bodies_and_domain_errors(api: Api) -> None:
    """What was accepted before still is (optional fields optional, no body where none is
    needed); failover's refusals come back with their statuses."""
    ok = [
        ("POST", "/api/v1/failover", {"from": "master-b", "to": None}),
        ("POST", "/api/v1/route/report", {"master": "master-a", "ok": True}),
        ("POST", "/api/v1/route/report", {"master": "master-a", "ok": False,
                                          "latency_seconds": 2}),
        ("POST", "/api/v1/failover/pause", None),
        ("POST", "/api/v1/failover/resume", {}),
        ("POST", "/api/v1/masters/master-c/maintenance", {"enabled": True}),
        ("POST", "/api/v1/masters/master-c/maintenance", {"enabled": False}),
        ("POST", "/api/v1/masters/master-c/reset", None),
        ("PUT", "/api/v1/balancing/strategy", {"strategy": "geo"}),
    ]
    for method, path, payload in ok:
        status, body = await api.call(method, path, AUTH, json=payload)
        assert status == 200, (path, payload, status, body)
    assert api.svc.router.strategy == "geo"
    refused = [
        ("POST", "/api/v1/failover", {"from": "nobody"}, 404),
        ("POST", "/api/v1/failover", {"from": "master-c"}, 409),  # standby: no duties
        ("POST", "/api/v1/masters/nobody/reset", None, 404),
        ("POST", "/api/v1/route/report", {"master": "nobody", "ok": True}, 404),
    ]
    for method, path, payload, expected in refused:
        status, body = await api.call(method, path, AUTH, json=payload)
        assert status == expected and body["error"], (path, payload, status, body)


async def test_insecure_no_auth_without_a_token_lets_writes_through(tmp_path: Path) -> None:
    async with exporter(tmp_path, token=None, insecure_no_auth=True) as api:
        status, body = await api.call("POST", "/api/v1/failover/pause")
        assert status == 200 and body["paused"] is True


async def test_insecure_no_auth_does_not_override_a_configured_token(tmp_path: Path) -> None:
    async with exporter(tmp_path, insecure_no_auth=True) as api:
        assert (await api.call("POST", "/api/v1/failover/pause"))[0] == 401
        assert (await api.call("POST", "/api/v1/failover/pause", AUTH))[0] == 200


async def test_integer_parameters_are_range_checked(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """Ids are SQLite integers: past 2**63-1 the store would overflow, so the API refuses."""
    huge = str(2**63)
    bad = [
        f"/api/v1/failovers?before={huge}", f"/api/v1/audit?before={huge}",
        "/api/v1/failovers?before=0", "/api/v1/failovers?before=-5",
        "/api/v1/audit?before=1e3", "/api/v1/audit?before=%D9%A1",  # an Arabic-Indic one
        "/api/v1/failovers?limit=501", "/api/v1/audit?limit=+5", "/api/v1/audit?limit=",
        f"/api/v1/failovers/{huge}", f"/api/v1/failovers/{'9' * 400}", "/api/v1/failovers/0",
        "/api/v1/failovers/-1", "/api/v1/failovers/1_0",
    ]
    with caplog.at_level(logging.DEBUG, logger="exporter"):
        for path in bad:
            status, body = await api.call("GET", path)
            assert status == 400 and "must be a whole number between" in body["error"], (
                path, status, body)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert (await api.call("GET", f"/api/v1/failovers/{2**63 - 1}"))[0] == 404
    assert (await api.call("GET", f"/api/v1/audit?before={2**63 - 1}&limit=500"))[0] == 200


@pytest.mark.parametrize("deep", [b"[" * 100_000 + b"]" * 100_000,
                                  b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
                                  b"[" * 100_000])
async def test_deeply_nested_bodies_are_400_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, deep: bytes
) -> None:
    async with exporter(tmp_path, max_body_bytes=1 << 20) as api:
        with caplog.at_level(logging.DEBUG):
            for method, path in api.routes(MUTATING):
                status, body = await api.call(method, path, AUTH, data=deep)
                assert (status, body) == (400, {"error": "body nested too deep (limit 32 levels)"})
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        # a body within the bound is parsed as before
        shallow = b'{"enabled": true, "x": ' + b"[" * 30 + b"]" * 30 + b"}"
        status, body = await api.call("POST", "/api/v1/masters/master-c/maintenance", AUTH,
                                      data=shallow)
        assert (status, body) == (400, {"error": "body.x: unexpected field"})
        # brackets inside strings are text, not nesting
        status, body = await api.call("POST", "/api/v1/failover", AUTH,
                                      json={"from": "[{" * 100})
        assert status == 404, body


@pytest.mark.parametrize("latency", ["9" * 400, "1e308", "1e400", "3600.5", "-0.5", "NaN"])
async def test_out_of_range_latency_is_400_naming_the_field(api: Api, latency: str) -> None:
    raw = f'{{"master": "master-a", "ok": true, "latency_seconds": {latency}}}'.encode()
    status, body = await api.call("POST", "/api/v1/route/report", AUTH, data=raw)
    assert status == 400 and body["error"].startswith("body.latency_seconds: "), body
    ok = b'{"master": "master-a", "ok": true, "latency_seconds": 3600}'
    assert (await api.call("POST", "/api/v1/route/report", AUTH, data=ok))[0] == 200


async def test_maintenance_needs_enabled_explicitly(api: Api) -> None:
    """An empty body or a typo must not drain a master."""
    path = "/api/v1/masters/master-b/maintenance"
    for payload, named in ((None, "body.enabled: required field missing"),
                           ({}, "body.enabled: required field missing"),
                           ({"enable": False}, "body.enable: unexpected field")):
        status, body = await api.call("POST", path, AUTH, json=payload)
        assert status == 400 and named in body["error"], (payload, body)
    assert api.svc.store.maintenance() == {}
    assert "maintenance_on" not in audit_actions(api)
    # an unknown master is a 404 whatever the body
    assert (await api.call("POST", "/api/v1/masters/nobody/maintenance", AUTH, json={}))[0] == 404


async def test_a_body_that_never_arrives_is_408(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("exporter.web.jsonapi.BODY_TIMEOUT", 0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    try:
        writer.write(b"POST /api/v1/route/report HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"ma")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 408 "), head
