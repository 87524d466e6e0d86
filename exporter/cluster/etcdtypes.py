"""The etcd client's vocabulary: what it raises, reads and writes (``etcd.py``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, TypeVar

from aiohttp import hdrs

T = TypeVar("T")

READ_CHUNK = 65_536
#: Of a refusal only this much is read: its message is all we keep.
ERROR_BODY_BYTES = 4096
#: gRPC status codes the gateway passes on.
UNAVAILABLE = 14
LEASE_NOT_FOUND = "requested lease not found"
REQUEST_HEADERS: dict[str, str] = {
    hdrs.CONTENT_TYPE: "application/json",
    hdrs.ACCEPT_ENCODING: "identity",  # a compressed answer is refused, never inflated
}
_INT = re.compile(r"-?[0-9]{1,20}")
_TARGETS = {
    "create": ("CREATE", "create_revision"),
    "mod": ("MOD", "mod_revision"),
    "version": ("VERSION", "version"),
    "value": ("VALUE", "value"),
    "lease": ("LEASE", "lease"),
}
_RESULTS = {"equal": "EQUAL", "greater": "GREATER", "less": "LESS", "not_equal": "NOT_EQUAL"}


class EtcdError(Exception):
    """An etcd call failed: unreachable, timed out, a bad or oversized answer, or refused.
    The message names the call, the endpoint and why."""


class LeaseLost(EtcdError):
    """The lease is gone (expired or revoked): whatever was held under it is lost."""


class Compacted(EtcdError):
    """A watch's start revision was compacted; ``compact_revision`` is the oldest one etcd
    still has (0 if it did not say). The caller must re-read, then watch from there."""

    def __init__(self, message: str, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A put or a delete; a delete's ``kv`` has value b"" and, as etcd sends it, the delete's
    own revision as ``mod_revision``."""

    kind: Literal["put", "delete"]
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class Compare:
    """One txn condition: ``target`` of ``key`` compared to ``value`` (bytes for "value",
    an int otherwise; create revision 0 means "absent")."""

    key: str
    target: Literal["create", "mod", "version", "value", "lease"]
    value: int | bytes
    result: Literal["equal", "greater", "less", "not_equal"] = "equal"

    def __post_init__(self) -> None:
        if self.target not in _TARGETS:
            raise ValueError(f"Compare target {self.target!r}: one of {sorted(_TARGETS)}")
        if self.result not in _RESULTS:
            raise ValueError(f"Compare result {self.result!r}: one of {sorted(_RESULTS)}")
        want_bytes = self.target == "value"
        is_int = isinstance(self.value, int) and not isinstance(self.value, bool)
        if want_bytes != isinstance(self.value, bytes) or (not want_bytes and not is_int):
            kind = "bytes" if want_bytes else "an int"
            raise ValueError(f"Compare on {self.target!r} needs {kind}, not {self.value!r}")


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int


class _Failure(Exception):
    """Why one endpoint failed one call, before the call and the endpoint are named.
    ``retry``: another endpoint may do (connection, timeout, unavailable)."""

    def __init__(self, reason: str, kind: type[EtcdError] = EtcdError, *, retry: bool = False,
                 compact_revision: int = 0) -> None:
        super().__init__(reason)
        self.reason, self.kind, self.retry = reason, kind, retry
        self.compact_revision = compact_revision

    def public(self, where: str) -> EtcdError:
        message = f"{where}: {self.reason}"
        if self.kind is Compacted:
            return Compacted(message, self.compact_revision)
        return self.kind(message)


def _invalid(what: str) -> _Failure:
    return _Failure(f"invalid answer: {what}")


