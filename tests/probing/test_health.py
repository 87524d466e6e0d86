"""The /health answer checked at the boundary: a known-answer table of bad and good payloads."""

from __future__ import annotations

import json
import math

import pytest

from exporter.fleet import Result
from exporter.probing.health import MAX_COUNT, MAX_DUTIES, InvalidHealth, check, decode
from exporter.probing.prober import classify
from exporter.sim import SimulatedMaster

HUGE_INT = "1" + "0" * 399

# (body, detail the probe must report). Every one is invalid_response.
INVALID: list[tuple[str, str]] = [
    ('{"status": "ok", "queue_length": 1e200}', "queue_length out of range: 1e+200"),
    (
        f'{{"status": "ok", "queue_length": {HUGE_INT}}}',
        "queue_length out of range: 400-digit integer",
    ),
    (
        f'{{"status": "ok", "active_messages": -{HUGE_INT}}}',
        "active_messages out of range: negative 400-digit integer",
    ),
    ('{"status": "ok", "queue_length": 100000000000000000000}', "queue_length out of range: 1e+20"),
    ('{"status": "ok", "queue_length": -5}', "queue_length out of range: -5"),
    ('{"status": "ok", "queue_length": NaN}', "queue_length out of range: nan"),
    ('{"status": "ok", "queue_length": Infinity}', "queue_length out of range: inf"),
    ('{"status": "ok", "queue_length": -Infinity}', "queue_length out of range: -inf"),
    ('{"status": "ok", "queue_length": true}', "queue_length is not a number (got boolean)"),
    ('{"status": "ok", "queue_length": "lots"}', "queue_length is not a number (got string)"),
    ('{"status": "ok", "queue_length": [1]}', "queue_length is not a number (got array)"),
    (
        f'{{"status": "ok", "active_messages": {MAX_COUNT + 1}}}',
        "active_messages out of range: 9.0072e+15",
    ),
    ('{"status": "ok", "active_messages": -0.5}', "active_messages out of range: -0.5"),
    ('{"status": "ok", "cpu_percent": 100.5}', "cpu_percent out of range: 100.5"),
    ('{"status": "ok", "cpu_percent": "50%"}', "cpu_percent is not a number (got string)"),
    ('{"status": "ok", "memory_percent": -0.1}', "memory_percent out of range: -0.1"),
    ('{"status": "ok", "memory_percent": 1e309}', "memory_percent out of range: inf"),
    ('{"status": "ok", "memory_percent": false}', "memory_percent is not a number (got boolean)"),
    ('{"status": "ok", "active": "yes"}', "active is not a boolean (got string)"),
    ('{"status": "ok", "active": 1}', "active is not a boolean (got number)"),
    (f'{{"status": "ok", "active": {HUGE_INT}}}', "active is not a boolean (got number)"),
    ('{"status": "ok", "duties": "master-a"}', "duties is not an array (got string)"),
    ('{"status": "ok", "duties": {"a": 1}}', "duties is not an array (got object)"),
    ('{"status": "ok", "duties": ["a", 1]}', "duties[1] is not a string (got number)"),
    ('{"status": "ok", "duties": ["a", null]}', "duties[1] is not a string (got null)"),
    (json.dumps({"status": "ok", "duties": ["x" * 257]}), "duties[0] longer than 256 characters"),
    (
        json.dumps({"status": "ok", "duties": ["d"] * (MAX_DUTIES + 1)}),
        "duties has 10001 items (limit 10000)",
    ),
    ('{"queue_length": 1}', "unknown status None"),
    ('{"status": "weird"}', "unknown status 'weird'"),
    ('{"status": ["ok"]}', "unknown status array"),
    ('{"status": {"a": 1}}', "unknown status object"),
    ('{"status": 1}', "unknown status 1"),
    ('{"status": "ok", "extra": NaN}', "body is not JSON (NaN is not a JSON value)"),
    ('{"status": "ok", "extra": [-Infinity]}', "body is not JSON (-Infinity is not a JSON value)"),
    ('{"status": "down", "queue_length": -5}', "queue_length out of range: -5"),
    ("[1]", "JSON body is not an object"),
    ("<html>", "body is not JSON"),
    ('{"status": "ok"', "body is not JSON"),
    ("[" * 200_000 + "]" * 200_000, "body is not JSON (nested too deep)"),
    (
        '{"status": "ok", "x": ' + "[" * 200_000 + "]" * 200_000 + "}",
        "body is not JSON (nested too deep)",
    ),
]


@pytest.mark.parametrize(("body", "detail"), INVALID, ids=[d for _, d in INVALID])
def test_bad_answer_is_invalid_response_naming_the_field(body, detail):
    outcome = classify(200, body.encode(), 0.01, 0.5)
    assert outcome.result is Result.INVALID_RESPONSE, outcome
    assert outcome.detail.startswith(detail), outcome.detail
    assert outcome.payload is None
    assert len(outcome.detail) < 120


def test_undecodable_bytes_are_invalid_response():
    outcome = classify(200, b"\xff\xfe\x00garbage", 0.01, 0.5)
    assert outcome.result is Result.INVALID_RESPONSE
    assert outcome.detail == "body is not JSON"


def test_a_long_status_is_quoted_short():
    outcome = classify(200, json.dumps({"status": "x" * 100_000}).encode(), 0.01, 0.5)
    assert outcome.result is Result.INVALID_RESPONSE
    assert outcome.detail.startswith("unknown status 'xxx") and len(outcome.detail) < 60


VALID: list[dict[str, object]] = [
    {"status": "ok"},
    {
        "status": "ok",
        "queue_length": 0,
        "active_messages": 0,
        "cpu_percent": 0,
        "memory_percent": 0,
    },
    {"status": "ok", "queue_length": MAX_COUNT, "active_messages": float(MAX_COUNT)},
    {"status": "degraded", "queue_length": 3.0, "cpu_percent": 100, "memory_percent": 100.0},
    {"status": "ok", "queue_length": None, "cpu_percent": None, "active": None, "duties": None},
    {"status": "ok", "active": False, "duties": []},
    {"status": "ok", "active": True, "duties": ["x" * 256] * MAX_DUTIES},
    {"status": "ok", "name": "m", "region": "uae", "build": {"v": [1, 2]}, "uptime": 1e300},
    {"status": "down", "queue_length": 12},
]


@pytest.mark.parametrize("payload", VALID, ids=range(len(VALID)))
def test_good_answer_is_kept_whole(payload):
    outcome = classify(200, json.dumps(payload).encode(), 0.01, 0.5)
    expected = Result.UNHEALTHY if payload["status"] == "down" else Result.SUCCESS
    assert outcome.result is expected, outcome
    assert outcome.payload == payload  # unknown fields stay


def test_what_the_simulated_master_reports_stays_valid():
    """Idle, loaded past 100% cpu pull, and down: every answer of the simulated master passes."""
    master = SimulatedMaster("sim-a", "uae", seed=7)
    seen_cpu: list[float] = []
    for i in range(300):
        if i == 100:
            master.backlog = 50_000
        if i == 250:
            master.mode = "down"
        master.step(0.5)
        answer = master.health()
        check(decode(json.dumps(answer).encode()))
        seen_cpu.append(answer["cpu_percent"])
    assert max(seen_cpu) > 80  # the load really drove cpu up towards its clamp


def test_decode_refuses_constants_anywhere_but_returns_plain_numbers():
    with pytest.raises(InvalidHealth):
        decode(b'{"status": "ok", "nested": {"deep": [NaN]}}')
    payload = decode(b'{"status": "ok", "queue_length": 12, "cpu_percent": 5.5}')
    assert payload["queue_length"] == 12 and isinstance(payload["queue_length"], int)
    assert math.isclose(payload["cpu_percent"], 5.5)
