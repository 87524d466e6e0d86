"""The fleet: one record per master, its health machine, and the events they produce."""

from exporter.fleet.duties import reported_holders
from exporter.fleet.events import EventBus, RoleChanged, Sample, Transition, log_transition
from exporter.fleet.health import HealthMachine
from exporter.fleet.runtime import PROBE_BUCKETS, Fleet, MasterRuntime
from exporter.fleet.states import RESULTS, SERVING, STATES, Outcome, Result, State

__all__ = [
    "PROBE_BUCKETS", "RESULTS", "SERVING", "STATES", "EventBus", "Fleet", "HealthMachine",
    "MasterRuntime", "Outcome", "Result", "RoleChanged", "Sample", "State", "Transition",
    "log_transition", "reported_holders",
]
