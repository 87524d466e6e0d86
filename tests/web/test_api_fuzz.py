"""A fuzz pass over the whole HTTP surface of a real exporter (tests.web.harness: Service and
``running(...)`` on 127.0.0.1 in front of simulated masters).

Every route of the app's router, with its own method or another, random path parameters and
query strings, random, malformed, huge-number and deeply nested JSON bodies, with and without
the token, and raw request lines the HTTP parser must refuse. The property: never a 5xx, and
every error is JSON with an "error" string. Afterwards the service still probes its masters
and /metrics answers.

Hypothesis runs derandomized (the same requests every run) in a worker thread with blocking
sockets, while the exporter serves on the test's event loop.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import wait_for
from tests.web.harness import AUTH, Api, concrete, exporter, split_response

EXAMPLES = 1000
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
NAMES = ("master-a", "master-b", "master-c", "nobody", "", "..", "<script>")
QUERY_KEYS = ("limit", "before", "master", "key", "region", "wait", "version", "x")
BODY_KEYS = ("from", "to", "enabled", "master", "ok", "latency_seconds", "strategy", "enable")
STRATEGY_NAMES = ("round_robin", "geo", "least_loaded", "weighted", "random")
#: Bodies up to this size reach the handlers (a 100k-deep array is 200 KB).
MAX_BODY = 1 << 18

text = st.text(max_size=24)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, 2**64, 10**400]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.floats(), text,
                    st.sampled_from(NAMES + STRATEGY_NAMES))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(BODY_KEYS) | text, inner,
                                            max_size=4)),
    max_leaves=12,
)


def _deep(kind: str, depth: int) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b"[" * depth  # unterminated


#: Bodies each route accepts, so that the pass also reaches what happens after validation
#: (a route not named here takes no body).
VALID_BODIES: dict[str, list[dict[str, Any]]] = {
    "/api/v1/failover": [{"from": "master-a"}, {"from": "master-b", "to": "master-c"}],
    "/api/v1/masters/{name}/maintenance": [{"enabled": True}, {"enabled": False}],
    "/api/v1/route/report": [{"master": "master-a", "ok": False, "latency_seconds": 0.2},
                             {"master": "master-b", "ok": True}],
    "/api/v1/balancing/strategy": [{"strategy": "geo"}, {"strategy": "round_robin"}],
}
ANY_VALID = [b for bodies in VALID_BODIES.values() for b in bodies]

bodies = st.one_of(
    st.none(),
    st.sampled_from(ANY_VALID).map(lambda d: json.dumps(d).encode()),
    st.dictionaries(st.sampled_from(BODY_KEYS), scalars, max_size=4).map(
        lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(_deep, st.sampled_from(["array", "object", "open"]),
              st.sampled_from([2, 33, 1000, 100_000])),
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b"null", b"NaN", b'{"latency_seconds": 1e999}',
                     b'{"master": "master-a", "ok": true, "latency_seconds": ' + b"9" * 400
                     + b"}"]),
)


@dataclass(frozen=True)
class Req:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes | None


@st.composite
def api_requests(draw: st.DrawFn, routes: list[tuple[str, str]]) -> Req:
    """A request to one of the app's routes: a third well-formed (the route's method, a real
    master, the token, a body some route accepts), the rest fuzzed around the edges."""
    route_method, canonical = draw(st.sampled_from(routes))
    if draw(st.integers(0, 2)) == 0:
        path = concrete(canonical, {"name": draw(st.sampled_from(NAMES[:3])),
                                    "id": str(draw(st.integers(1, 5)))})
        valid = VALID_BODIES.get(canonical)
        body = json.dumps(draw(st.sampled_from(valid))).encode() if valid else None
        return Req(route_method, path, dict(AUTH), body)
    values = {
        "name": draw(st.sampled_from(NAMES) | text),
        "id": draw(numbers.map(str) | text),
    }
    path = concrete(canonical, {k: quote(v, safe="") or "x" for k, v in values.items()})
    if draw(st.integers(0, 9)) == 0:
        path += "/" + quote(draw(text), safe="")
    query = draw(st.dictionaries(st.sampled_from(QUERY_KEYS) | text,
                                 numbers.map(str) | text | st.sampled_from(NAMES), max_size=4))
    target = path + ("?" + urlencode(query) if query else "")
    method = route_method if draw(st.integers(0, 3)) else draw(st.sampled_from(METHODS))
    headers = dict(AUTH) if draw(st.integers(0, 3)) else {}
    if draw(st.booleans()):
        headers["Content-Type"] = draw(st.sampled_from(
            ["application/json", "text/plain", "application/x-www-form-urlencoded"]))
    body = draw(bodies) if method not in ("GET", "HEAD") else None
    return Req(method, target, headers, body)


raw_requests = st.builds(
    lambda method, target, version, headers: (
        method + b" " + target + b" " + version + b"\r\n"
        + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
        + b"Connection: close\r\n\r\n"),
    st.sampled_from([b"GET", b"POST", b"G(T", b"", b"\x16\x03\x01"]) | st.binary(max_size=8),
    st.sampled_from([b"/metrics", b"/", b"*", b"http://x/", b"/%zz", b"/" + b"a" * 5000])
    | st.binary(max_size=40),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTX/1.1", b""]),
    st.lists(st.tuples(st.sampled_from([b"X-A", b"Host", b"Bad Name", b""])
                       | st.binary(max_size=12),
                       st.binary(max_size=24)), max_size=3),
)


def send(port: int, req: Req) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(req.method, req.target, body=req.body, headers=req.headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def send_raw(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    assert raw, f"no answer at all to {data[:200]!r}"
    return split_response(raw)


def check(status: int, headers: dict[str, str], body: bytes, what: Any, head: bool) -> None:
    assert status < 500, (what, status, body[:300])
    if status >= 400 and not head:
        assert headers.get("content-type", "").startswith("application/json"), (what, headers)
        error = json.loads(body).get("error")
        assert isinstance(error, str) and error, (what, status, body[:300])
    assert headers.get("x-content-type-options") == "nosniff", (what, headers)


def fuzz(port: int, routes: list[tuple[str, str]]) -> int:
    """Run the hypothesis pass (blocking); the number of requests sent."""
    sent = 0
    budget = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                      suppress_health_check=list(HealthCheck))

    @budget
    @given(req=api_requests(routes))
    def api_call(req: Req) -> None:
        nonlocal sent
        sent += 1
        check(*send(port, req), req, req.method == "HEAD")

    @settings(budget, max_examples=EXAMPLES // 4)
    @given(data=raw_requests)
    def raw_call(data: bytes) -> None:
        nonlocal sent
        sent += 1
        check(*send_raw(port, data), data[:200], data.startswith(b"HEAD "))

    api_call()
    raw_call()
    return sent


async def probes_of(api: Api, master: str) -> float:
    async with api.http.get(f"{api.base}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    pattern = re.compile(rf'^ha_master_probes_total\{{[^}}]*master="{master}"[^}}]*\}} (\S+)$',
                         re.M)
    return sum(float(v) for v in pattern.findall(text))


async def test_no_request_gets_a_5xx_or_a_non_json_error(tmp_path: Path) -> None:
    async with exporter(tmp_path, max_body_bytes=MAX_BODY) as api:
        routes = [(r.method, r.resource.canonical) for r in api.app.router.routes()
                  if r.resource is not None]
        assert len(routes) >= 20, routes
        started = time.monotonic()
        sent = await asyncio.to_thread(fuzz, api.port, routes)
        took = time.monotonic() - started
        assert sent >= EXAMPLES, sent
        assert took < 30, f"the fuzz pass took {took:.1f}s for {sent} requests"
        # still probing, still serving
        before = await probes_of(api, "master-b")
        await wait_for(lambda: _grew(api, before), 5, "master-b probed again")
        async with api.http.get(f"{api.base}/metrics") as r:
            assert r.status == 200


async def _grew(api: Api, before: float) -> bool:
    return await probes_of(api, "master-b") > before
