"""From each observer's own view of a master to the one the cluster holds (Sentinel's ODOWN).

Each replica probes its shard and publishes a ``Verdict`` per master (its SDOWN: subjective).
A master is failed cluster-wide only when ``quorum`` of its observers say so (ODOWN), so that
one replica cut off from a master, or from the network, cannot fail it over alone.

``aggregate`` rules:

* Only verdicts of the master's *current* observers count: a verdict left behind by a member
  that no longer observes the master (the shard moved, the member left) is ignored, as is one
  whose ``observer`` differs from the name it is filed under.
* The effective quorum is min(quorum, number of current observers), at least 1, so that a
  cluster shrunk below ``quorum`` members can still fail a master.
* Failed when at least the effective quorum of current observers say failed; ``verdict`` is
  then the failed verdict of the first such observer by name.
* Otherwise the state is the most favourable among the non-failed current observers' verdicts
  (healthy > degraded > recovering > anything else non-failed), ties broken by observer name
  ascending, and ``verdict`` is that observer's: a replica that reaches the master is the one
  whose ``active``/``duties`` are worth believing.
* With no non-failed verdict and no quorum (no verdict at all, or failed ones short of the
  quorum) the cluster has no usable view: the state is ``UNOBSERVED`` and ``verdict`` is None.
  ``State`` has no "unknown"; ``UNOBSERVED`` is "healthy", what the fleet assumes of a master
  it has not probed yet (``HealthMachine``'s initial state), so nothing fails over on silence.
  ``seen_by``/``failed_by`` still tell silence from health.

Pure: no I/O, the caller reads and writes the JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from exporter.fleet.states import State

MAX_BYTES = 4096  # a published verdict, as JSON
MAX_REASON = 200  # characters
MAX_DUTIES = 1000  # entries
MAX_DUTY = 200  # characters per duty
MAX_QUEUE = 1 << 40
QUEUE_SLACK = 16  # messages: a queue under this never makes a verdict change on its own

# Every state an observer can publish: maintenance is an operator's decision, not a view.
VERDICT_STATES = frozenset(s.value for s in State if s is not State.MAINTENANCE)
UNOBSERVED = State.HEALTHY.value
_RANK = {State.HEALTHY.value: 0, State.DEGRADED.value: 1, State.RECOVERING.value: 2}
_FIELDS = ("active", "duties", "reason", "state", "up")


def _check_duties(duties: object) -> tuple[str, ...] | None:
    if duties is None:
        return None
    if not isinstance(duties, list | tuple):
        raise ValueError("duties: not a list or null")
    if len(duties) > MAX_DUTIES:
        raise ValueError(f"duties: {len(duties)} entries, more than {MAX_DUTIES}")
    for duty in duties:
        if not isinstance(duty, str):
            raise ValueError("duties: an entry is not a string")
        if len(duty) > MAX_DUTY:
            raise ValueError(f"duties: an entry of {len(duty)} characters, more than {MAX_DUTY}")
    return tuple(duties)


def published_queue(last: int | None, queue: float | None) -> int | None:
    """The queue length an observer publishes, given the one it published ``last``: the new
    figure once it has more than doubled or halved, with ``QUEUE_SLACK`` messages of slack,
    else ``last`` again. A verdict (an etcd write) changes when a queue really moves, not
    when it wobbles; peers route and rebalance on figures within about a factor of two."""
    if queue is None or queue != queue:
        return None
    q = int(min(max(queue, 0), MAX_QUEUE))
    if last is None or q > 2 * last + QUEUE_SLACK or 2 * q + QUEUE_SLACK < last:
        return q
    return last


def _check_queue(queue: object) -> int | None:
    if queue is None:
        return None
    if isinstance(queue, bool) or not isinstance(queue, int) or not 0 <= queue <= MAX_QUEUE:
        raise ValueError(f"queue: not null or an integer 0 to {MAX_QUEUE}")
    return queue


@dataclass(frozen=True, slots=True)
class Verdict:
    """One observer's view of one master, as that observer publishes it.

    ``active`` is what the master's /health said of itself (None: unknown, e.g. unreachable).
    Checked at construction too, so that ``to_json`` never publishes what peers would refuse."""

    observer: str
    state: str
    up: bool
    active: bool | None
    duties: tuple[str, ...] | None
    reason: str
    queue: int | None = None  # the master's queue length, ``published_queue`` (None: unknown)

    def __post_init__(self) -> None:
        if not self.observer:
            raise ValueError("observer: empty")
        if self.state not in VERDICT_STATES:
            raise ValueError(f"state: {self.state!r} is not one of {sorted(VERDICT_STATES)}")
        if len(self.reason) > MAX_REASON:
            raise ValueError(f"reason: {len(self.reason)} characters, more than {MAX_REASON}")
        _check_duties(self.duties)
        _check_queue(self.queue)

    @property
    def failed(self) -> bool:
        return self.state == State.FAILED

    def to_json(self) -> bytes:
        """Compact JSON with sorted keys; the observer is the key it is filed under, not a
        field, so that no replica can speak for another. ValueError past ``MAX_BYTES``."""
        raw = json.dumps(
            {
                "active": self.active,
                "duties": None if self.duties is None else list(self.duties),
                "queue": self.queue,
                "reason": self.reason,
                "state": str(self.state),
                "up": self.up,
            },
            ensure_ascii=False,
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        if len(raw) > MAX_BYTES:
            raise ValueError(f"verdict: {len(raw)} bytes as JSON, more than {MAX_BYTES}")
        return raw

    @classmethod
    def from_json(cls, observer: str, raw: bytes) -> Verdict:
        """Parse a peer's verdict strictly: ValueError naming the field at fault. Unknown
        fields are ignored, so that a newer replica's additions do not silence it."""
        if len(raw) > MAX_BYTES:
            raise ValueError(f"verdict: {len(raw)} bytes, more than {MAX_BYTES}")
        try:
            doc: Any = json.loads(bytes(raw).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"verdict: not UTF-8 ({e.reason})") from None
        except (ValueError, RecursionError) as e:
            raise ValueError(f"verdict: not JSON ({e})") from None
        if not isinstance(doc, dict):
            raise ValueError("verdict: not a JSON object")
        for name in _FIELDS:
            if name not in doc:
                raise ValueError(f"{name}: missing")
        state, up, active, reason = doc["state"], doc["up"], doc["active"], doc["reason"]
        if not isinstance(state, str):
            raise ValueError("state: not a string")
        if not isinstance(up, bool):
            raise ValueError("up: not a boolean")
        if active is not None and not isinstance(active, bool):
            raise ValueError("active: not a boolean or null")
        if not isinstance(reason, str):
            raise ValueError("reason: not a string")
        return cls(observer, state, up, active, _check_duties(doc["duties"]), reason,
                   _check_queue(doc.get("queue")))


@dataclass(frozen=True, slots=True)
class ClusterView:
    """What the cluster holds true of one master; ``verdict`` is the view ``state`` came from
    (None when no observer gave a usable one)."""

    state: str
    failed_by: tuple[str, ...]
    seen_by: tuple[str, ...]
    quorum: int
    verdict: Verdict | None

    @property
    def failed(self) -> bool:
        return self.state == State.FAILED


def effective_quorum(quorum: int, observers: int) -> int:
    """min(quorum, observers), at least 1: a quorum larger than the observers could never be
    met, and 0 would fail a master on no word at all."""
    return max(1, min(quorum, observers))


def aggregate(
    verdicts: Mapping[str, Verdict], observers: Sequence[str], quorum: int
) -> ClusterView:
    """The cluster's view of one master from its observers' verdicts (rules: module docstring)."""
    current = set(observers)
    counted = {
        name: verdict
        for name, verdict in verdicts.items()
        if name in current and verdict.observer == name
    }
    needed = effective_quorum(quorum, len(current))
    seen_by = tuple(sorted(counted))
    failed_by = tuple(name for name in seen_by if counted[name].failed)
    if len(failed_by) >= needed:
        return ClusterView(State.FAILED.value, failed_by, seen_by, needed, counted[failed_by[0]])
    serving = [name for name in seen_by if not counted[name].failed]
    if not serving:
        return ClusterView(UNOBSERVED, failed_by, seen_by, needed, None)
    best = min(serving, key=lambda name: (_RANK.get(counted[name].state, len(_RANK)), name))
    chosen = counted[best]
    return ClusterView(str(chosen.state), failed_by, seen_by, needed, chosen)
