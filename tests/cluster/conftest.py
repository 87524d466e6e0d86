"""Fixtures of the cluster tests: a real etcd per test, and three replicas over four masters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.cluster.etcd_server import EtcdServer, etcd_server
from tests.cluster.harness import SPECS, ClusterStack

__all__ = ["cluster", "etcd_server"]


@pytest.fixture
async def cluster(tmp_path: Path, etcd_server: EtcdServer) -> AsyncIterator[ClusterStack]:
    """Three replicas (observers 2, quorum 2, lease 2 s) over ``SPECS``, a 1 s cooldown."""
    async with ClusterStack(tmp_path, etcd_server, SPECS, failover={"cooldown": "1s"}) as stack:
        yield stack
