"""Requirements checked without changing the master: /health, GET /state, errors.

The snapshot's checksum is verified with the exporter's own ``parse_snapshot``: a master passes
exactly when the exporter would accept its state in a failover.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from exporter.conformance.core import (
    HEALTH_CAP,
    STATE_CAP,
    Client,
    Failed,
    Report,
    require,
    validate,
)
from exporter.failover.protocol import MasterCallError, Snapshot, parse_snapshot

log = logging.getLogger(__name__)

UNKNOWN_PATH = "/ha-exporter-conformance/no-such-path"

READ_ONLY: tuple[tuple[str, str], ...] = (
    ("health.answers", f"GET /health answers 200 with a JSON object within {HEALTH_CAP >> 10} "
                       "KiB"),
    ("health.schema", "GET /health matches the Health schema (status; figures finite and in "
                      "range)"),
    ("health.activity", "GET /health reports active and duties"),
    ("state.answers", "GET /state answers 200 with a JSON object"),
    ("state.schema", "GET /state matches the Snapshot schema"),
    ("state.checksum", "GET /state checksum is sha256 of the canonical JSON (the exporter's "
                       "check)"),
    ("state.etag", "GET /state honours If-None-Match when it sends an ETag (optional ETag)"),
    ("errors.unknown-path", "an unknown path answers 404 with a JSON error"),
    ("errors.wrong-method", "a method a path does not serve answers 405 (or 404) with a JSON "
                            "error"),
)
WHAT = dict(READ_ONLY)


@dataclass
class Observed:
    """What the read-only checks learnt, for the destructive ones."""

    health: dict[str, Any] | None = None
    snapshot: dict[str, Any] | None = None

    @property
    def name(self) -> str | None:
        """The master's own name: /health's name, else its snapshot's master."""
        for value in ((self.health or {}).get("name"), (self.snapshot or {}).get("master")):
            if isinstance(value, str) and value:
                return value
        return None


def verify_snapshot(raw: bytes, where: str) -> Snapshot:
    """The exporter's own verification of a snapshot; Failed with its reason."""
    try:
        return parse_snapshot(raw, "master", where)
    except MasterCallError as exc:
        raise Failed(f"{where}: {exc.reason}") from None


async def read_health(client: Client, validated: bool = True) -> dict[str, Any]:
    """GET /health as a JSON object, validated against the Health schema unless told not."""
    answer = (await client.call("GET", "/health", cap=HEALTH_CAP)).expect(200)
    data = answer.json()
    require(isinstance(data, dict), f"GET /health: body is not a JSON object: {answer.excerpt()}")
    if validated:
        validate("Health", data, "GET /health")
    return data


async def check_health(report: Report, client: Client, seen: Observed) -> None:
    async def answers() -> dict[str, Any]:
        return await read_health(client, validated=False)

    raw = await report.check("health.answers", WHAT["health.answers"], answers)
    if raw is None:
        for rid in ("health.schema", "health.activity"):
            report.skip(rid, WHAT[rid], "no usable /health answer")
        return

    async def schema() -> dict[str, Any]:
        validate("Health", raw, "GET /health")
        return raw

    seen.health = await report.check("health.schema", WHAT["health.schema"], schema)

    async def activity() -> bool:
        missing = [k for k in ("active", "duties") if raw.get(k) is None]
        require(not missing, f"GET /health lacks {' and '.join(missing)}: the exporter "
                             "cannot see who serves a duty (split brain goes unnoticed)")
        return True

    await report.check("health.activity", WHAT["health.activity"], activity)


async def check_state(report: Report, client: Client, seen: Observed) -> None:
    answer = None

    async def answers() -> bytes:
        nonlocal answer
        answer = (await client.call("GET", "/state", cap=STATE_CAP)).expect(200)
        kind = answer.headers.get("Content-Type", "").split(";")[0].strip()
        require(kind == "application/json", f"Content-Type is {kind or 'missing'}, "
                                            "expected application/json")
        data = answer.json()
        require(isinstance(data, dict), f"body is not a JSON object: {answer.excerpt()}")
        return answer.body

    raw = await report.check("state.answers", WHAT["state.answers"], answers)
    if raw is None or answer is None:
        for rid in ("state.schema", "state.checksum", "state.etag"):
            report.skip(rid, WHAT[rid], "no usable /state answer")
        return
    first = answer

    async def schema() -> dict[str, Any]:
        data: dict[str, Any] = first.valid("Snapshot")
        return data

    seen.snapshot = await report.check("state.schema", WHAT["state.schema"], schema)

    async def checksum() -> bool:
        verify_snapshot(raw, "GET /state")
        return True

    await report.check("state.checksum", WHAT["state.checksum"], checksum)

    async def etag() -> bool:
        tag = first.headers.get("ETag")
        if tag is None:
            return True
        again = await client.call("GET", "/state", headers={"If-None-Match": tag},
                                  cap=STATE_CAP)
        if again.status == 200:  # the state changed in between: a new tag is due
            require(again.headers.get("ETag") != tag,
                    f"If-None-Match {tag} answered 200 with the same ETag, expected 304")
            return True
        again.expect(304)
        require(not again.body, "304 with a body")
        return True

    await report.check("state.etag", WHAT["state.etag"], etag)


async def check_errors(report: Report, client: Client) -> None:
    async def unknown_path() -> bool:
        (await client.call("GET", UNKNOWN_PATH)).expect(404).valid("Error")
        return True

    await report.check("errors.unknown-path", WHAT["errors.unknown-path"], unknown_path)

    async def wrong_method() -> bool:
        (await client.call("PUT", "/health", body={})).expect(405, 404).valid("Error")
        return True

    await report.check("errors.wrong-method", WHAT["errors.wrong-method"], wrong_method)


async def run_read_only(report: Report, client: Client) -> Observed:
    """Every non-destructive requirement, in order; what they saw."""
    seen = Observed()
    await check_health(report, client, seen)
    await check_state(report, client, seen)
    await check_errors(report, client)
    return seen
