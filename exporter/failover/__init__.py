"""Failover: move a failed master's duties and state to the best backup, once.

``FailoverManager`` (manager.py) is the policy: what triggers a move, cooldowns, operator
actions. It drives ``MoveEngine`` (engine.py: the steps of one move) with ``Steps`` (journal,
timing, deadlines), ``Undoer`` (rollback, release, fencing), ``Ledger`` (records) and
``Notifier`` (hooks, Alertmanager); ``CrashRecovery`` closes moves a crash left open.
``DutyTable`` owns who holds which duty, and so every master's role.
"""

from exporter.failover.duties import DutyTable
from exporter.failover.errors import (
    Conflict,
    FailoverRejected,
    InvalidRequest,
    Unavailable,
    UnknownMaster,
)
from exporter.failover.manager import FailoverManager
from exporter.failover.moves import DURATION_BUCKETS, EXECUTED

__all__ = [
    "DURATION_BUCKETS", "EXECUTED", "Conflict", "DutyTable", "FailoverManager",
    "FailoverRejected", "InvalidRequest", "Unavailable", "UnknownMaster",
]
