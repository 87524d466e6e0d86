"""The JSON shapes failover writes to the store and the API serves: steps, candidates, records.

TypedDicts rather than classes because these values are stored as JSON and served as they are:
the types name (and mypy checks) every key without a conversion layer that could drift from the
API's shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NotRequired, Required, TypedDict, cast


class StepEntry(TypedDict):
    """One executed step of a move, in order, in the record's ``steps``. The ``fetch`` step's
    ``detail`` says where the move's state came from (``source``: live, checkpoint or none)
    and what the state rules made of it (``state``), so every record answers "was state
    lost?" on its own."""

    step: str
    status: str  # "ok" or "error"
    backup: str | None
    duration: float  # seconds
    detail: dict[str, Any]


class PlannedStep(TypedDict):
    """One step a dry run would take (``status`` is always "planned")."""

    step: str
    status: str
    backup: NotRequired[str | None]
    detail: NotRequired[dict[str, Any]]


class CandidateEntry(TypedDict, total=False):
    """Why a master was or was not chosen as backup, and what happened when it was tried."""

    name: Required[str]
    role: str
    priority: int
    region: str
    state: str
    queue_length: float | None
    eligible: Required[bool]
    rank: Required[int | None]  # 1 is the best; None when not eligible
    reason: Required[str | None]
    outcome: str  # set once the candidate was tried (or skipped)


class FailoverRecord(TypedDict):
    """One move as stored and served by /api/v1/failovers/{id}."""

    id: int
    started: float
    finished: float | None
    master: str
    backup: str | None
    result: str
    trigger: str
    reason: str
    duration: float | None
    steps: list[StepEntry]  # a dry run's record holds PlannedStep entries
    candidates: list[CandidateEntry]
    kind: str


class HookContext(TypedDict):
    """What a pre-hook body template sees."""

    phase: str
    id: int
    kind: str
    master: str
    backup: str | None
    result: str | None
    trigger: str
    reason: str
    duties: list[str]
    started: float
    candidates: list[str]  # names of the eligible candidates


def as_rows(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``items`` in the store's JSON-column type; TypedDicts are plain dicts at run time."""
    return [cast(dict[str, Any], item) for item in items]
