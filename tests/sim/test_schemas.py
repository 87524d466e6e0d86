"""The simulated master's answers, every endpoint and every status it produces, validated
against docs/master-protocol.yaml (the published file, not the Python it is rendered from),
over a real server on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
import yaml

from exporter.sim import SimulatedMaster, create_app
from exporter.sim.state import MAX_BODY
from tests.support import serve_app

SPEC = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "docs" / "master-protocol.yaml").read_text("utf-8"))
#: Documented answers the simulated master never gives: it requires no epoch header, always
#: answers 200 to a drop, and a 64 MiB import to reach its 413 is not worth the test's time.
NOT_PRODUCED = {("POST", "/state", "428"), ("DELETE", "/state/{source}", "428"),
                ("POST", "/activate", "428"), ("POST", "/deactivate", "428"),
                ("DELETE", "/state/{source}", "404"), ("POST", "/state", "413"),
                ("DELETE", "/state/{source}", "413"), ("POST", "/deactivate", "413")}


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        *_, kind, name = node["$ref"].split("/")
        node = SPEC["components"][kind][name]
    return node


def documented() -> set[tuple[str, str, str]]:
    return {(method.upper(), path, status) for path, ops in SPEC["paths"].items()
            for method, op in ops.items() for status in op["responses"]}


class Checked:
    """Every answer validated against the schema its path, method and status document."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http, self.base = http, base
        self.seen: set[tuple[str, str, str]] = set()

    async def call(self, method: str, path: str, template: str | None = None, *,
                   expect: int, body: Any = None, data: bytes | None = None,
                   headers: dict[str, str] | None = None) -> Any:
        template = template or path
        async with self.http.request(method, self.base + path, json=body, data=data,
                                     headers=headers) as r:
            raw = await r.read()
            assert r.status == expect, (method, path, r.status, raw[:200])
            status = str(r.status)
        if method.lower() not in SPEC["paths"].get(template, {}):  # unknown: an Error
            schema_name = "Error"
        else:
            op = SPEC["paths"][template][method.lower()]
            assert status in op["responses"], f"{method} {template} {status} is undocumented"
            self.seen.add((method, template, status))
            content = _resolve(op["responses"][status]).get("content")
            if content is None:
                assert raw == b"", "an answer documented without a body has one"
                return None
            schema_name = content["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
        data_out = json.loads(raw)
        root = {"$ref": f"#/components/schemas/{schema_name}", "components": SPEC["components"]}
        jsonschema.Draft202012Validator(root).validate(data_out)
        return data_out


@pytest.fixture
async def masters() -> AsyncIterator[tuple[SimulatedMaster, Checked, Checked]]:
    a = SimulatedMaster("master-a", "uae", "active")
    b = SimulatedMaster("master-b", "usa", "standby")
    async with (serve_app(create_app(a)) as ua, serve_app(create_app(b)) as ub,
                aiohttp.ClientSession() as http):
        yield a, Checked(http, ua), Checked(http, ub)


async def test_every_answer_matches_the_published_schemas(masters):
    a, ca, cb = masters
    epoch = {"X-HA-Epoch": "3"}
    await ca.call("GET", "/health", expect=200)
    await cb.call("GET", "/health", expect=200)
    snap = await ca.call("GET", "/state", expect=200)
    async with ca.http.get(f"{ca.base}/state") as r:
        tag = r.headers["ETag"]
    await ca.call("GET", "/state", expect=304, headers={"If-None-Match": tag})

    stored = await cb.call("POST", "/state", data=json.dumps(snap).encode(), expect=200,
                           headers=epoch)
    assert stored["checksum"] == snap["checksum"]
    state_b = await cb.call("GET", "/state", expect=200)  # now with an import
    assert state_b["imported"]["master-a"]["checksum"] == snap["checksum"]
    await cb.call("POST", "/state", body={**snap, "sessions": {}}, expect=400, headers=epoch)
    await cb.call("POST", "/state", data=b"[1, 2", expect=400, headers=epoch)
    await cb.call("POST", "/state", data=b"{}", expect=409, headers={"X-HA-Epoch": "2"})

    await cb.call("POST", "/activate", body={"taken_over": "master-a"}, expect=200,
                  headers=epoch)
    await cb.call("POST", "/activate", body={}, expect=200, headers=epoch)
    await cb.call("POST", "/activate", body={"taken_over": 7}, expect=400, headers=epoch)
    await cb.call("POST", "/activate", data=b" " * (MAX_BODY + 1), expect=413, headers=epoch)
    await cb.call("POST", "/activate", body={}, expect=409, headers={"X-HA-Epoch": "1"})
    await cb.call("POST", "/deactivate", body={"taken_over": "master-a"}, expect=200,
                  headers=epoch)
    await cb.call("POST", "/deactivate", expect=200, headers=epoch)
    await cb.call("POST", "/deactivate", expect=400, headers={"X-HA-Epoch": "three"})
    await cb.call("POST", "/deactivate", expect=409, headers={"X-HA-Epoch": "0"})

    await cb.call("DELETE", "/state/master-a", "/state/{source}", expect=200, headers=epoch)
    await cb.call("DELETE", "/state/master-a", "/state/{source}", expect=200, headers=epoch)
    await cb.call("DELETE", "/state/master-a", "/state/{source}", expect=400,
                  headers={"X-HA-Epoch": "-1"})
    await cb.call("DELETE", "/state/master-a", "/state/{source}", expect=409,
                  headers={"X-HA-Epoch": "2"})

    await ca.call("GET", "/no/such/path", expect=404)
    await ca.call("PUT", "/health", expect=405)

    a.set_chaos("down")  # /health still answers (status down); control calls get 503
    health = await ca.call("GET", "/health", expect=200)
    assert health["status"] == "down"
    for method, path in (("POST", "/activate"), ("POST", "/deactivate"), ("POST", "/state"),
                         ("DELETE", "/state/x")):
        template = "/state/{source}" if path.startswith("/state/") else path
        await ca.call(method, path, template, expect=503, headers=epoch)

    missing = documented() - ca.seen - cb.seen - NOT_PRODUCED
    assert not missing, sorted(missing)
