"""What the producer client raises."""

from __future__ import annotations

import json
from dataclasses import dataclass


class ClientError(Exception):
    """Base of everything this client raises."""


class RouteUnavailable(ClientError):
    """No master for us right now: the exporter said so (503), the routing table has nobody in
    rotation, or no exporter could be reached and there is no table to route on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ExporterUnreachable(RouteUnavailable):
    """No exporter answered (connection refused, reset, timeout) at any of the client's URLs."""


class RequestRejected(ClientError):
    """A 4xx that retrying cannot fix: a bad region for the exporter, a bad message for a
    master. ``master`` is None when the exporter refused the routing request."""

    def __init__(self, status: int, reason: str, master: str | None = None) -> None:
        where = f"master {master}" if master else "exporter"
        super().__init__(f"{where} refused the request ({status}): {reason}")
        self.status = status
        self.reason = reason
        self.master = master


@dataclass(frozen=True, slots=True)
class Attempt:
    master: str | None  # None when no routing decision was obtained
    error: str


class DeliveryFailed(ClientError):
    """Every attempt failed; the message may still have reached a master (see the package
    docstring)."""

    def __init__(self, message_id: str, attempts: list[Attempt]) -> None:
        tried = "; ".join(f"{a.master or 'routing'}: {a.error}" for a in attempts)
        text = f"message {message_id} not delivered after {len(attempts)} attempts ({tried})"
        super().__init__(text)
        self.message_id = message_id
        self.attempts = attempts


def error_text(body: bytes) -> str:
    """The ``error`` of a JSON error body, or the start of whatever the body is."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:200] or "(empty body)"
    if isinstance(data, dict) and "error" in data:
        return str(data["error"])[:1000]
    return str(data)[:200]
