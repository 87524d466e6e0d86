"""Self-fencing: a replica stops acting before etcd can have expired its lease, and acts again
once a keep-alive (or a new grant) succeeds."""

from __future__ import annotations

import time
from pathlib import Path

from exporter.cluster.etcd import Etcd
from exporter.cluster.lease import MemberLease
from tests.cluster.etcd_server import EtcdServer
from tests.support import wait_for

TTL = 3.0


async def test_the_lease_is_in_doubt_before_etcd_could_expire_it_then_back(
    tmp_path: Path, etcd_server: EtcdServer,
) -> None:
    async with Etcd([etcd_server.endpoint], timeout=0.5) as etcd:
        changes: list[int | None] = []
        lease = MemberLease(etcd, TTL, changes.append)
        lease.start()
        try:
            await wait_for(lease.valid, 5, "a granted lease")
            first = lease.id
            etcd_server.pause()  # etcd frozen: keep-alives go unanswered
            frozen = time.monotonic()
            try:
                await wait_for(lambda: not lease.valid(), TTL + 2, "the lease in doubt")
                doubt = time.monotonic() - frozen
            finally:
                etcd_server.resume()
            # etcd counts the TTL from the last keep-alive it received, before the freeze:
            # it cannot expire the lease sooner than TTL after the freeze began
            assert doubt < TTL, f"still acting {doubt:.2f}s into a {TTL}s lease"
            assert changes[-1] is None
            await wait_for(lease.valid, 10, "the lease confirmed again")
            assert changes[-1] == lease.id and lease.id is not None
            if lease.id == first:  # kept alive: etcd never expired it
                assert await etcd.keepalive(first) > 0
        finally:
            await lease.stop()
        assert lease.id is None
