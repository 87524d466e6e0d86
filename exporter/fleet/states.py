"""The fleet's vocabulary: health states, probe results and what one probe found.

Kept apart from the machine and the events so that every layer can name them without pulling
in behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class State(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    FAILED = "failed"
    RECOVERING = "recovering"
    MAINTENANCE = "maintenance"


STATES: tuple[State, ...] = tuple(State)
SERVING = frozenset({State.HEALTHY, State.DEGRADED})


class Result(StrEnum):
    SUCCESS = "success"
    TIMEOUT = "timeout"
    CONNECT_ERROR = "connect_error"
    HTTP_ERROR = "http_error"
    INVALID_RESPONSE = "invalid_response"
    UNHEALTHY = "unhealthy"


RESULTS: tuple[Result, ...] = tuple(Result)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one probe found; ``detail`` is the human reason shown in logs and the API."""

    result: Result
    latency: float
    degraded: bool = False
    detail: str = ""
    payload: dict[str, Any] | None = None
