"""Who leads: one leader key on a member's lease, taken in a transaction on its create
revision, and the fencing epoch each new leader raises.

The epoch lives in its own key and only grows: a new leader writes the larger of it and its
own store's epoch (a single node's persisted counter) plus one, in a transaction that holds
only while the leader key is still its own. Masters refuse control calls with a lower epoch
(docs/protocol.md), so a leader that was paused or cut off cannot act once another has.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from exporter.cluster.etcd import Compare, Etcd, EtcdError, KeyValue, Put
from exporter.cluster.keys import Keys

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Leader:
    member: str
    url: str
    revision: int  # create revision of the leader key
    lease: int


def read_leader(kv: KeyValue | None) -> Leader | None:
    if kv is None:
        return None
    try:
        body = json.loads(kv.value)
        return Leader(str(body["member"]), str(body["url"]), kv.create_revision, kv.lease)
    except (ValueError, KeyError, TypeError):
        log.warning("cluster: the leader key holds no valid leader; waiting for its lease")
        return None


class Election:
    def __init__(self, etcd: Etcd, keys: Keys, member: str, url: str) -> None:
        self.etcd = etcd
        self.keys = keys
        self.member = member
        self.url = url

    async def campaign(self, lease: int) -> int | None:
        """Take the leader key if nobody holds it; the key's create revision when taken."""
        body = json.dumps({"member": self.member, "url": self.url}).encode()
        done = await self.etcd.txn([Compare(self.keys.leader, "create", 0)],
                                   [Put(self.keys.leader, body, lease)])
        return done.revision if done.succeeded else None

    async def raise_epoch(self, revision: int, floor: int) -> int | None:
        """The next fencing epoch, written while the leader key created at ``revision`` is
        still there; None when it is not (or etcd refused)."""
        try:
            kv = await self.etcd.get(self.keys.epoch)
            current = int(kv.value) if kv is not None else 0
            epoch = max(current, floor) + 1
            done = await self.etcd.txn(
                [Compare(self.keys.leader, "create", revision),
                 Compare(self.keys.epoch, "mod", kv.mod_revision if kv is not None else 0)],
                [Put(self.keys.epoch, str(epoch).encode())])
        except (EtcdError, ValueError) as exc:
            log.warning("cluster: raising the fencing epoch failed: %s", exc)
            return None
        return epoch if done.succeeded else None
