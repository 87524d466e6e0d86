"""What a replica tells /metrics about the cluster (``exporter.metrics.cluster``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClusterFigures:
    member: str
    members: int
    leader: bool
    epoch: int
    probed: int
    observer_failed: Mapping[str, bool]  # this replica's own verdict on each master it probes
