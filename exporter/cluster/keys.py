"""Where each cluster fact lives in etcd, under the configured prefix.

Names are URL-quoted in keys (a master's name may hold '/').
``members/<member>``, ``leader`` and ``verdicts/<master>/<observer>`` hang on their writer's
lease and vanish with it; ``epoch``, ``facts/*``, ``journal/*`` and ``history/*`` are the
leader's, written only in transactions that hold while it leads.
"""

from __future__ import annotations

from urllib.parse import quote, unquote


class Keys:
    """The key layout for one ``cluster.etcd.prefix``."""

    def __init__(self, prefix: str) -> None:
        self.root = prefix.rstrip("/") + "/"
        self.members = self.root + "members/"
        self.leader = self.root + "leader"
        self.epoch = self.root + "epoch"
        self.verdicts = self.root + "verdicts/"
        self.facts = self.root + "facts/"
        self.journal = self.root + "journal/"
        self.history = self.root + "history/"
        self.audit = self.root + "audit/"

    def member(self, name: str) -> str:
        return self.members + quote(name, safe="")

    def member_of(self, key: str) -> str:
        return unquote(key[len(self.members):])

    def verdict(self, master: str, observer: str) -> str:
        return f"{self.verdicts}{quote(master, safe='')}/{quote(observer, safe='')}"

    def verdict_of(self, key: str) -> tuple[str, str]:
        """(master, observer) of a verdict key; names are quoted, so '/' splits them."""
        master, _, observer = key[len(self.verdicts):].partition("/")
        return unquote(master), unquote(observer)

    def fact(self, name: str) -> str:
        return self.facts + name

    @staticmethod
    def tail(key: str, prefix: str) -> str:
        return key[len(prefix):]
