"""The /health answer of a master, checked field by field before anything uses it.

A master is outside the exporter's control: what it reports ends up in gauges, in the
balancing arithmetic and in the duty table. A value that is not finite, out of range or of the
wrong type would break a scrape (an overflow in a gauge callback, a 400-digit sample that
Prometheus rejects) or skew routing, so such an answer is refused here, naming the field, and
the probe counts as ``invalid_response``. Fields the exporter does not know stay allowed
(masters may report more); ``null`` in an optional field means "not reported".
"""

from __future__ import annotations

import json
import math
from typing import Any

STATUSES = ("ok", "degraded", "down")
#: Counts above this lose integer precision in a float64 sample.
MAX_COUNT = 2**53
#: (low, high) of each numeric field; all must also be finite.
NUMBER_RANGES: dict[str, tuple[float, float]] = {
    "queue_length": (0, MAX_COUNT),
    "active_messages": (0, MAX_COUNT),
    "cpu_percent": (0.0, 100.0),
    "memory_percent": (0.0, 100.0),
}
MAX_DUTIES = 10_000
MAX_DUTY_CHARS = 256
#: Integer literals longer than this are out of every range; parsed as floats (cheap, bounded).
_MAX_INT_CHARS = 32
_CONSTANTS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_JSON_TYPES: dict[type, str] = {
    bool: "boolean",
    int: "number",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
    type(None): "null",
}


class InvalidHealth(ValueError):
    """The answer is unusable; the message is the probe's detail."""


def _json_type(value: object) -> str:
    for kind, name in _JSON_TYPES.items():  # bool before int: a bool is an int to Python
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _short(value: object, limit: int = 40) -> str:
    text = repr(value) if not isinstance(value, list | dict) else _json_type(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _LongInt(float):
    """An integer literal too long to be any count, kept as a float (infinite past float64)
    that remembers its length for the message."""

    digits: int


def _parse_int(text: str) -> int | float:
    if len(text) <= _MAX_INT_CHARS:
        return int(text)
    value = _LongInt(text)
    value.digits = len(text.lstrip("-"))
    return value


def _show(value: float) -> str:
    if isinstance(value, _LongInt):
        return f"{'negative ' if value < 0 else ''}{value.digits}-digit integer"
    return f"{value:g}"


def decode(body: bytes) -> dict[str, Any]:
    """Strict JSON object: NaN and Infinity literals (which Python's json accepts) refused."""
    constants: list[str] = []

    def constant(name: str) -> float:
        constants.append(name)
        return _CONSTANTS[name]

    try:
        payload = json.loads(body, parse_constant=constant, parse_int=_parse_int)
    except RecursionError:
        raise InvalidHealth("body is not JSON (nested too deep)") from None
    except ValueError:  # UnicodeDecodeError included
        raise InvalidHealth("body is not JSON") from None
    if not isinstance(payload, dict):
        raise InvalidHealth("JSON body is not an object")
    check(payload)
    if constants:  # in a field the exporter does not read; still not JSON
        raise InvalidHealth(f"body is not JSON ({constants[0]} is not a JSON value)")
    return payload


def check(payload: dict[str, Any]) -> None:
    """Raise InvalidHealth naming the first bad field of a decoded answer."""
    status = payload.get("status")
    if not isinstance(status, str) or status not in STATUSES:
        raise InvalidHealth(f"unknown status {_short(status)}")
    for field, (low, high) in NUMBER_RANGES.items():
        value = payload.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidHealth(f"{field} is not a number (got {_json_type(value)})")
        if not (math.isfinite(value) and low <= value <= high):
            raise InvalidHealth(f"{field} out of range: {_show(value)} (allowed {low:g}..{high:g})")
    active = payload.get("active")
    if active is not None and not isinstance(active, bool):
        raise InvalidHealth(f"active is not a boolean (got {_json_type(active)})")
    duties = payload.get("duties")
    if duties is not None:
        if not isinstance(duties, list):
            raise InvalidHealth(f"duties is not an array (got {_json_type(duties)})")
        if len(duties) > MAX_DUTIES:
            raise InvalidHealth(f"duties has {len(duties)} items (limit {MAX_DUTIES})")
        for i, duty in enumerate(duties):
            if not isinstance(duty, str):
                raise InvalidHealth(f"duties[{i}] is not a string (got {_json_type(duty)})")
            if len(duty) > MAX_DUTY_CHARS:
                raise InvalidHealth(f"duties[{i}] longer than {MAX_DUTY_CHARS} characters")
