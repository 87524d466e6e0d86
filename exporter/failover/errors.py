"""Why failover refuses a request. The web layer maps each kind to its HTTP status."""

from __future__ import annotations


class FailoverRejected(Exception):
    """A request failover refuses; ``str(exc)`` says why, for the operator."""


class UnknownMaster(FailoverRejected):
    """No master by that name."""


class Conflict(FailoverRejected):
    """Not possible in the fleet's current state (standby, already running, not eligible)."""


class InvalidRequest(FailoverRejected):
    """The request contradicts itself (e.g. the same master as source and target)."""


class Unavailable(FailoverRejected):
    """The exporter cannot act now (shutting down)."""
